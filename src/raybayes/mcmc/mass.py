"""Low-rank plus diagonal mass matrices adapted from draws and gradients (nutpie's).

The inverse mass matrix has the form

    Sigma = diag(s) (I + U (Lambda - I) U^T) diag(s)

with ``s`` a ``(d,)`` scale, ``U`` a ``(d, k)`` matrix of orthonormal columns and
``Lambda`` a ``(k,)`` vector of eigenvalues. :func:`fisher_low_rank` estimates it
from posterior draws and the gradients of the log density at those draws, by
minimising the Fisher divergence between the preconditioned posterior and a
standard normal (Seyboldt, Carlson & Carpenter; nutpie). Every operation that HMC
needs costs ``O(d k)``, so it scales to ``d`` in the hundreds of thousands.

HMC with inverse mass matrix ``Sigma`` on ``x`` is HMC with the identity on ``y``,
``x = m + L y`` with ``L = diag(s) (I + U (Lambda^(1/2) - I) U^T)``
(``L L^T = Sigma``). :func:`from_unit`, :func:`to_unit` and :func:`grad_from_unit`
are that map, its inverse and the gradient's map back, so a NUTS kernel samples the
transformed density and keeps its own step-size (and diagonal) adaptation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from raybayes.checkpoint import register_state_type

__all__ = [
    "LowRankMass",
    "fisher_low_rank",
    "identity_mass",
    "from_unit",
    "to_unit",
    "grad_from_unit",
    "inverse_mass_matrix",
]


@register_state_type  # a checkpoint of a low-rank run holds it (arrays, no pickle)
class LowRankMass(NamedTuple):
    """A low-rank plus diagonal inverse mass matrix and the centre of its map.

    Attributes:
        mean: ``(d,)`` centre ``m`` of the map ``x = m + L y`` (the draws' mean).
        scale: ``(d,)`` diagonal scale ``s > 0``.
        vectors: ``(d, k)`` orthonormal columns ``U`` (zero columns pad to a fixed
            ``k``, so that a jitted kernel compiles once).
        values: ``(k,)`` eigenvalues ``Lambda > 0`` (1 for the padding columns).
    """

    mean: np.ndarray
    scale: np.ndarray
    vectors: np.ndarray
    values: np.ndarray

    @property
    def rank(self) -> int:
        """Number of eigenvalues that differ from 1 (the padding excluded)."""
        return int(np.sum(np.asarray(self.values) != 1.0))


def identity_mass(dim: int, max_rank: int, dtype=np.float32) -> LowRankMass:
    """The identity map (``m = 0``, ``s = 1``, no eigenvectors), padded to ``max_rank``.

    Examples:
        >>> identity_mass(3, 2).vectors.shape
        (3, 2)
    """
    return LowRankMass(
        np.zeros(dim, dtype),
        np.ones(dim, dtype),
        np.zeros((dim, max_rank), dtype),
        np.ones(max_rank, dtype),
    )


def fisher_low_rank(
    draws,
    grads,
    *,
    max_rank: int = 16,
    cutoff: float = 2.0,
    gamma: float = 1e-5,
    dtype=np.float32,
) -> LowRankMass:
    """Nutpie's low-rank plus diagonal inverse mass matrix from draws and gradients.

    1. Diagonal: ``s_j^2 = sd(x_j) / sd(g_j)``, the diagonal that minimises the
       Fisher divergence of a Gaussian approximation (exact for any Gaussian with a
       diagonal covariance).
    2. In the coordinates scaled by ``s``, the span of the draws' and of the
       gradients' principal directions (thin SVDs, then a QR of both bases).
    3. In that subspace, the SPD geometric mean ``A`` of the draws' covariance and
       the inverse of the gradients' covariance (``A C_g A = C_x``; each regularised
       as ``C / gamma + I``), which is the exact covariance for a Gaussian.
    4. The eigenvectors of ``A`` whose eigenvalues lie outside
       ``[1 / cutoff, cutoff]`` (the others are taken as 1), at most ``max_rank``
       of them (the largest ``|log lambda|``).

    Args:
        draws: ``(n, d)`` unconstrained draws (rows), ``n >= 3``, e.g. pooled over
            chains from the end of a warmup window.
        grads: ``(n, d)`` gradients at those draws, of the log density or of the
            potential energy (the sign does not matter).
        max_rank: most eigenvectors kept, ``k`` (the output is padded to it).
        cutoff: eigenvalues in ``[1 / cutoff, cutoff]`` are set to 1; ``> 1``.
        gamma: regularisation of the projected covariances, ``> 0``.
        dtype: dtype of the returned arrays.

    Returns:
        A :class:`LowRankMass` with ``vectors`` of shape ``(d, max_rank)``.

    Raises:
        ValueError: shapes differ, fewer than 3 draws, non-finite values, or a bad
            ``max_rank``, ``cutoff`` or ``gamma``.

    References:
        Seyboldt, A., Carlson, E. & Carpenter, B. (2026). Low-rank mass-matrix
        adaptation by minimising the Fisher divergence (Algorithm 1), as in nutpie:
        https://github.com/pymc-devs/nutpie

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> cov = np.array([[1.0, 0.99], [0.99, 1.0]])
        >>> x = rng.multivariate_normal([0, 0], cov, size=500)
        >>> g = -x @ np.linalg.inv(cov)
        >>> Sigma = inverse_mass_matrix(fisher_low_rank(x, g, max_rank=2))
        >>> bool(np.allclose(Sigma, cov, atol=0.05))
        True
    """
    x = np.asarray(draws, np.float64)
    g = np.asarray(grads, np.float64)
    if x.ndim != 2 or x.shape != g.shape:
        raise ValueError(
            f"draws {x.shape} and grads {g.shape} must both be (n, d) arrays of "
            "one shape."
        )
    n, d = x.shape
    if n < 3:
        raise ValueError(f"fisher_low_rank needs at least 3 draws, got {n}.")
    for name, v in (("draws", x), ("grads", g)):
        bad = ~np.isfinite(v)
        if bad.any():
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite value(s) (e.g. at row "
                f"{int(np.argwhere(bad)[0][0])}); pass finite draws and gradients."
            )
    if not (isinstance(max_rank, (int, np.integer)) and max_rank >= 0):
        raise ValueError(f"max_rank={max_rank!r} must be an integer >= 0, e.g. 16.")
    if not cutoff > 1.0:
        raise ValueError(f"cutoff={cutoff!r} must be > 1, e.g. 2.")
    if not gamma > 0.0:
        raise ValueError(f"gamma={gamma!r} must be > 0, e.g. 1e-5.")
    mean = x.mean(0)
    xc = x - mean
    gc = g - g.mean(0)
    sd_x = np.sqrt(np.mean(xc * xc, 0))
    sd_g = np.sqrt(np.mean(gc * gc, 0))
    scale = np.sqrt(np.clip(sd_x, 1e-20, None) / np.clip(sd_g, 1e-20, None))
    scale = np.clip(np.where(np.isfinite(scale), scale, 1.0), 1e-10, 1e10)
    # Columns are points, scaled by 1/n as in nutpie (so C / gamma weighs n).
    xs = (xc / scale).T / n
    gs = (gc * scale).T / n
    ux = np.linalg.svd(xs, full_matrices=False)[0]
    ug = np.linalg.svd(gs, full_matrices=False)[0]
    q = np.linalg.qr(np.concatenate([ux, ug], axis=1))[0]
    px, pg = q.T @ xs, q.T @ gs
    eye = np.eye(q.shape[1])
    cx = px @ px.T / gamma + eye
    cg = pg @ pg.T / gamma + eye
    vals, vecs = np.linalg.eigh(_spd_mean(cx, cg))
    # Eigenvalues near or below 0 (or not finite) are rounding errors of the SPD mean
    # when the two covariances differ by many orders of magnitude: such
    # directions are left at 1 rather than giving a singular mass matrix.
    keep = np.isfinite(vals) & (vals > 1e-8) & ((vals > cutoff) | (vals < 1.0 / cutoff))
    order = np.argsort(-np.abs(np.log(vals[keep])))[:max_rank]
    vals, vecs = vals[keep][order], (q @ vecs[:, keep])[:, order]
    k = vals.size
    out_vecs = np.zeros((d, max_rank))
    out_vals = np.ones(max_rank)
    out_vecs[:, :k] = vecs
    out_vals[:k] = vals
    return LowRankMass(
        mean.astype(dtype),
        scale.astype(dtype),
        out_vecs.astype(dtype),
        out_vals.astype(dtype),
    )


def _spd_mean(a, b):
    """The SPD ``M`` with ``M b M = a``: ``b^-1/2 (b^1/2 a b^1/2)^1/2 b^-1/2``."""
    w, v = np.linalg.eigh(b)
    b_half = (v * np.sqrt(w)) @ v.T
    b_inv_half = (v / np.sqrt(w)) @ v.T
    w2, v2 = np.linalg.eigh(b_half @ a @ b_half)
    mid = (v2 * np.sqrt(np.clip(w2, 0.0, None))) @ v2.T
    m = b_inv_half @ mid @ b_inv_half
    return 0.5 * (m + m.T)


def _apply(pre, v, power):
    """``(I + U (Lambda^power - I) U^T) v`` for ``v`` of shape ``(d,)``."""
    import jax.numpy as jnp

    coef = jnp.power(pre.values, power) - 1.0
    return v + pre.vectors @ (coef * (pre.vectors.T @ v))


def from_unit(pre: LowRankMass, y):
    """``x = m + L y``, ``L = diag(s) (I + U (Lambda^(1/2) - I) U^T)``; jittable.

    Args:
        pre: the :class:`LowRankMass` (NumPy or JAX leaves).
        y: ``(d,)`` point in the unit coordinates.

    Returns:
        ``(d,)`` point in the model's unconstrained coordinates.

    Examples:
        >>> float(from_unit(identity_mass(2, 1), np.ones(2, np.float32))[0])
        1.0
    """
    return pre.mean + pre.scale * _apply(pre, y, 0.5)


def to_unit(pre: LowRankMass, x):
    """The inverse of :func:`from_unit`.

    ``y = (I + U (Lambda^(-1/2) - I) U^T) (x - m) / s``.

    Examples:
        >>> float(to_unit(identity_mass(2, 1), np.ones(2, np.float32))[0])
        1.0
    """
    return _apply(pre, (x - pre.mean) / pre.scale, -0.5)


def grad_from_unit(pre: LowRankMass, grad_y):
    """Gradient in ``x`` from the gradient in ``y``: ``L^-T grad_y``.

    Examples:
        >>> float(grad_from_unit(identity_mass(2, 1), np.ones(2, np.float32))[1])
        1.0
    """
    return _apply(pre, grad_y, -0.5) / pre.scale


def inverse_mass_matrix(pre: LowRankMass) -> np.ndarray:
    """The dense ``(d, d)`` inverse mass matrix ``L L^T`` (for checks; ``O(d^2)``).

    Examples:
        >>> inverse_mass_matrix(identity_mass(2, 1)).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    s = np.asarray(pre.scale, np.float64)
    u = np.asarray(pre.vectors, np.float64)
    lam = np.asarray(pre.values, np.float64)
    inner = np.eye(s.size) + (u * (lam - 1.0)) @ u.T
    return s[:, None] * inner * s[None, :]
