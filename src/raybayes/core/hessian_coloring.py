"""The global columns of a shard's Hessian with fewer Hessian-vector products.

The arrowhead Laplace approximation needs ``H[:, j]`` for every global parameter
``j``: ``H_gg`` ``(G, G)`` and ``H_lg`` ``(P, k, G)``. Computed one Hessian-vector
product (HVP) per column, that is ``G`` passes over every row of the shard. In
hierarchical models most globals are *plated* (``gamma[t, c]``: an effect per
period and category), and two such columns often touch disjoint rows of ``H``:
``gamma[t, c]`` reaches only the locals of the products in category ``c``. Such
structurally orthogonal columns can share one probe, and one HVP then returns all
of them (Curtis, Powell & Reid 1974; Coleman & Moré 1984).

The sparsity pattern is not traced. The candidate groups come from the model's
plates, and membership is found numerically (a form of the "direct determination"
of Newsam & Ramsdell 1983):

1. **Candidates.** For every global site with more than one element: the whole
   site as one group, then the groups along each axis of the site (the columns
   that differ only in their index on that axis), fewest groups first. Scalar
   sites are probed alone.
2. **Two probes per group.** Group ``K`` is probed with ``sum_j w1_j e_j`` and
   ``sum_j w2_j e_j``, with random weights whose ratios ``w2_j / w1_j`` are well
   apart. A row ``r`` of the result that belongs to a single column ``j`` of ``K``
   has ``y2[r] / y1[r] = w2_j / w1_j``: the ratio names the column, and
   ``H[r, j] = y1[r] / w1_j``. A row that mixes several columns matches no ratio,
   and the group is rejected (its columns are then probed one by one). The first
   group of every candidate is tried first; the first candidate without a
   conflict is kept for that site.
3. **Dense rows by symmetry.** Rows of the globals probed alone (scales,
   hyper-means: they touch every column) are left out of the test, and
   ``H[d, j]`` is taken from ``H[j, d]`` of the single column ``d``.
4. **Verification.** Every evaluation also computes ``H u`` for one random ``u``
   and compares it with the assembled columns; if they disagree, the columns are
   recomputed one by one (and coloring is switched off for this shard).

After the first evaluation the owner of every row is known, and later Hessians of
the same shard (Newton steps, then the Laplace approximation) take one probe per
group. For the elasticity model (``gamma`` of 156 periods x 10 categories, 17
other globals) that is 166 HVPs for 1,577 columns at a time.

References:
    Curtis, A. R., Powell, M. J. D. & Reid, J. K. (1974). On the estimation of
    sparse Jacobian matrices. IMA J. Appl. Math. 13, 117-119.
    Newsam, G. N. & Ramsdell, J. D. (1983). Estimation of sparse Jacobian
    matrices. SIAM J. Algebraic Discrete Methods 4(3), 404-417.
    Coleman, T. F. & Moré, J. J. (1984). Estimation of sparse Hessian matrices and
    graph coloring problems. Math. Programming 28, 243-270.
    Gebremedhin, A. H., Manne, F. & Pothen, A. (2005). What color is your
    Jacobian? Graph coloring for computing derivatives. SIAM Review 47(4), 629-705.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ColoredGlobalHessian", "candidate_groupings"]

_NONE, _CONFLICT = -1, -2


def candidate_groupings(offset: int, shape: Sequence[int]) -> list[list[np.ndarray]]:
    """Candidate groupings of the columns of one global site, fewest groups first.

    Args:
        offset: position of the site's first element in the flat global vector.
        shape: its unconstrained shape.

    Returns:
        A list of groupings; each is a list of int arrays of flat global indices
        that together cover the site. Empty for a site of size 1.
    """
    shape = tuple(int(n) for n in shape)
    size = int(np.prod(shape, dtype=int))
    if size <= 1:
        return []
    index = offset + np.arange(size).reshape(shape)
    found = [[index.ravel()]]
    axes = sorted(
        (a for a in range(len(shape)) if 1 < shape[a] < size), key=lambda a: -shape[a]
    )
    for a in axes:
        moved = np.moveaxis(index, a, -1).reshape(-1, shape[a])
        found.append(list(moved))
    return found


def _weights(m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probe weights ``(w1, w2)`` of a group of ``m`` columns; the ratios
    ``w2/w1`` lie in ``(1, 2)``, at least ``0.4/m`` apart."""
    rng = np.random.default_rng(seed)
    w1 = rng.uniform(1.0, 2.0, m)
    ratios = 1.0 + (rng.permutation(m) + 0.5 + rng.uniform(-0.3, 0.3, m)) / m
    return w1, w1 * ratios


def _owners(y1, y2, w1, w2, tol):
    """Owner of every row (position in the group, ``_NONE`` or ``_CONFLICT``)."""
    ratios = w2 / w1
    order = np.argsort(ratios)
    sorted_r = ratios[order]
    owner = np.full(y1.shape, _NONE, dtype=np.int64)
    nz = (y1 != 0) | (y2 != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = y2[nz] / y1[nz]
    pos = np.clip(np.searchsorted(sorted_r, rho), 1, len(sorted_r) - 1)
    left, right = sorted_r[pos - 1], sorted_r[pos]
    pick = np.where(np.abs(rho - left) <= np.abs(rho - right), pos - 1, pos)
    if len(sorted_r) == 1:
        pick = np.zeros_like(pos)
    ok = np.isfinite(rho) & (np.abs(rho - sorted_r[pick]) <= tol * sorted_r[pick])
    owner[nz] = np.where(ok, order[pick], _CONFLICT)
    return owner


@dataclass
class _Group:
    columns: np.ndarray
    w1: np.ndarray
    w2: np.ndarray
    owner: np.ndarray | None = None  # per row of the probe output, once known


class ColoredGlobalHessian:
    """Global Hessian columns of one shard by grouped Hessian-vector products.

    Args:
        site_layout: ``[(offset, unconstrained_shape), ...]`` of every global site
            in the flat global vector.
        num_global: ``G``.
        dtype: the dtype of the HVPs (sets the tolerance of the tests).

    Attributes:
        last_num_hvp: HVPs of the last :meth:`__call__` (``G`` without coloring).
        enabled: ``False`` once a verification failed (then every column is
            probed alone).
    """

    def __init__(
        self,
        site_layout: Sequence[tuple[int, Sequence[int]]],
        num_global: int,
        dtype=np.float64,
    ):
        self.hvp_columns: Callable | None = None
        self.site_layout = [(int(o), tuple(s)) for o, s in site_layout]
        self.num_global = int(num_global)
        # The ratio of two probes of one column is exact up to the rounding of
        # sums over many rows (cancellation: ~1e-12 seen in float64).
        eps = np.finfo(dtype).eps
        self.ratio_tol = 1e-8 if eps < 1e-10 else 1e-4
        self.verify_tol = np.sqrt(eps) * 10
        self.groups: list[_Group] | None = None
        self.singles: np.ndarray | None = None
        self.enabled = any(int(np.prod(s, dtype=int)) > 1 for _, s in self.site_layout)
        self.last_num_hvp = 0

    # ------------------------------------------------------------ evaluation
    def _probe(self, tangents):
        self.last_num_hvp += len(tangents)
        hg, hl = self.hvp_columns(np.asarray(tangents))
        hg = np.asarray(hg, np.float64)
        hl = np.asarray(hl, np.float64)
        return hg, hl.reshape(len(tangents), -1), hl.shape[1:]

    def _dense(self):
        hg, hl, lshape = self._probe(np.eye(self.num_global))
        return hg.T, hl.T.reshape(*lshape, self.num_global)

    def _tangent(self, columns, weights):
        t = np.zeros(self.num_global)
        t[columns] = weights
        return t

    def _choose_groups(self):
        """Try the first group of every candidate of every site (two probes each)."""
        trials, tangents = [], []
        singles = []
        for offset, shape in self.site_layout:
            cands = candidate_groupings(offset, shape)
            if not cands:
                singles.extend(range(offset, offset + int(np.prod(shape, dtype=int))))
                continue
            for grouping in cands:
                first = grouping[0]
                w1, w2 = _weights(len(first), seed=len(trials))
                trials.append((offset, grouping, w1, w2))
                tangents += [self._tangent(first, w1), self._tangent(first, w2)]
        hg, hl, _ = self._probe(np.stack(tangents))
        single_mask = np.zeros(self.num_global, bool)
        single_mask[singles] = True
        chosen: dict[int, tuple] = {}
        for i, (offset, grouping, w1, w2) in enumerate(trials):
            if offset in chosen:
                continue
            y1 = np.concatenate([hg[2 * i], hl[2 * i]])
            y2 = np.concatenate([hg[2 * i + 1], hl[2 * i + 1]])
            owner = _owners(y1, y2, w1, w2, self.ratio_tol)
            owner[: self.num_global][single_mask] = _NONE  # dense rows: by symmetry
            if not np.any(owner == _CONFLICT):
                chosen[offset] = (grouping, w1, w2)
        groups = []
        for offset, shape in self.site_layout:
            size = int(np.prod(shape, dtype=int))
            if size <= 1:
                continue
            if offset not in chosen:
                singles.extend(range(offset, offset + size))
                continue
            grouping, w1, w2 = chosen[offset]
            for j, cols in enumerate(grouping):
                if j == 0:
                    groups.append(_Group(cols, w1, w2))
                else:
                    a, b = _weights(len(cols), seed=1000 + len(groups))
                    groups.append(_Group(cols, a, b))
        self.singles = np.asarray(sorted(singles), dtype=np.int64)
        self.groups = groups

    def _rediscover(self, hvp_columns, seed):
        """Forget the owners and evaluate again with two probes per group."""
        for g in self.groups:
            g.owner = None
        num = self.last_num_hvp
        out = self(hvp_columns, seed)
        self.last_num_hvp += num
        return out

    def __call__(self, hvp_columns: Callable, seed: int = 0):
        """``H_gg (G, G)`` and ``H_lg (P, k, G)`` of the shard (NumPy float64).

        Args:
            hvp_columns: ``tangents (n, G) -> (h_global (n, G), h_local (n, P, k))``,
                the HVPs of the negative shard log joint at the current point.
            seed: seed of the verification vector ``u``.

        Raises:
            Nothing of its own: a failed verification falls back to one HVP per
            column, with a ``RuntimeWarning``.
        """
        self.hvp_columns = hvp_columns
        self.last_num_hvp = 0
        G = self.num_global
        if not self.enabled:
            return self._dense()
        if self.groups is None:
            self._choose_groups()
            if not self.groups:
                self.enabled = False
                return self._dense()
        u = np.random.default_rng(seed).standard_normal(G)
        known = all(g.owner is not None for g in self.groups)
        tangents = [np.eye(G)[self.singles]] if len(self.singles) else []
        for g in self.groups:
            tangents.append(self._tangent(g.columns, g.w1)[None])
            if not known:
                tangents.append(self._tangent(g.columns, g.w2)[None])
        tangents.append(u[None])
        hg, hl, lshape = self._probe(np.concatenate(tangents))
        rows = G + hl.shape[1]
        single_mask = np.zeros(G, bool)
        single_mask[self.singles] = True
        cols = np.zeros((rows, G))  # H[:, j], rows: globals then flattened locals
        n_s = len(self.singles)
        cols[:G, self.singles] = hg[:n_s].T
        cols[G:, self.singles] = hl[:n_s].T
        redo = []
        pos = n_s
        for g in self.groups:
            y1 = np.concatenate([hg[pos], hl[pos]])
            if known:
                owner = g.owner
                pos += 1
                stale = (owner == _NONE) & (y1 != 0)
                stale[:G] &= ~single_mask
                if np.any(stale):  # an entry that was 0 at the first point
                    return self._rediscover(hvp_columns, seed)
            else:
                y2 = np.concatenate([hg[pos + 1], hl[pos + 1]])
                pos += 2
                owner = _owners(y1, y2, g.w1, g.w2, self.ratio_tol)
                owner[:G][single_mask] = _NONE
                if np.any(owner == _CONFLICT):
                    redo.append(g)
                    continue
                g.owner = owner
            r = np.flatnonzero(owner >= 0)
            cols[r, g.columns[owner[r]]] = y1[r] / g.w1[owner[r]]
        if redo:  # groups with a conflict: one HVP per column
            self.groups = [g for g in self.groups if g not in redo]
            extra = np.concatenate([g.columns for g in redo])
            self.singles = np.union1d(self.singles, extra)
            eg, el, _ = self._probe(np.eye(G)[extra])
            cols[:G, extra] = eg.T
            cols[G:, extra] = el.T
            single_mask[extra] = True
        # rows of globals probed alone: H[d, j] = H[j, d]
        cols[self.singles, :] = cols[:G, self.singles].T
        hgg = cols[:G]
        hlg = cols[G:]
        check_g, check_l = hg[-1], hl[-1]
        est = np.concatenate([hgg @ u, hlg @ u])
        actual = np.concatenate([check_g, check_l])
        scale = np.concatenate([np.abs(hgg) @ np.abs(u), np.abs(hlg) @ np.abs(u)])
        bound = self.verify_tol * (scale + 1e-12 * max(float(scale.max(initial=0)), 1))
        if not np.all(np.abs(est - actual) <= bound):
            if known:  # the pattern may have grown since the owners were found
                return self._rediscover(hvp_columns, seed)
            warnings.warn(
                "grouped Hessian-vector products did not reproduce H u for a random "
                "u; computing the global Hessian columns one at a time for this "
                "shard from now on.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.enabled = False
            num = self.last_num_hvp
            out = self._dense()
            self.last_num_hvp += num
            return out
        return hgg, hlg.reshape(*lshape, G)
