"""The arrowhead system of hierarchical models: Schur complement, Newton step, draws.

When the local variables of different entities (products, counties, series) are
conditionally independent given the global ones, the Hessian ``H`` of the negative
log joint in the unconstrained space is an arrowhead matrix::

        [ H_gg   C^T ]        C    = H_lg, one (k, G) block C_i per entity
    H = [            ]        H_ll = diag(B_1, ..., B_P), B_i of shape (k, k)
        [ C     H_ll ]

Everything the shard algorithms need from ``H`` is computed block by block:

* the Schur complement ``S = H_gg - sum_i C_i^T B_i^{-1} C_i`` ``(G, G)``, a sum of
  one term per shard (:func:`factor_arrowhead`, :func:`sum_schur_parts`);
* ``log det H = log det S + sum_i log det B_i``;
* the Newton step ``H d = -grad``: ``S dg = -grad_g + sum_i C_i^T B_i^{-1} grad_i``
  (:func:`newton_reduce`), then ``dl_i = -B_i^{-1} (grad_i + C_i dg)``
  (:func:`newton_local_step`);
* draws from ``N(x*, H^{-1})``: ``dg = S^{-1/2} z`` (:func:`laplace_global_draws`),
  then ``l_i = l_i* - B_i^{-1} C_i dg + chol(B_i^{-1}) z_i``
  (:func:`laplace_local_draws`), with ``z_i`` keyed by the entity's global id
  (:func:`entity_noise`), so the draws do not depend on how entities are split.

The shard functions are pure JAX, the driver functions pure NumPy/SciPy; none of
them knows about workers. ``G`` is the number of global parameters, ``P`` the
number of entities (of one shard), ``k`` the unconstrained local parameters per
entity, ``D`` the number of draws.

References:
    Rue, H., Martino, S. & Chopin, N. (2009). Approximate Bayesian inference for
    latent Gaussian models by using integrated nested Laplace approximations. JRSS B
    71(2), 319-392 (block structure and Schur complements).
    Golub, G. H. & Van Loan, C. F. (2013). Matrix Computations, 4th ed., Sec. 4.2
    (block Cholesky factorisation and the Schur complement).
    Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed., Sec. 10.3
    (Levenberg-Marquardt).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

__all__ = [
    "ArrowheadFactor",
    "entity_noise",
    "factor_arrowhead",
    "factor_tangent",
    "laplace_global_draws",
    "laplace_local_draws",
    "levenberg_marquardt_step",
    "LevenbergMarquardtSystem",
    "newton_local_step",
    "newton_reduce",
    "sum_schur_parts",
    "trust_region_step",
    "unit_curvature_where_flat",
]


class ArrowheadFactor(NamedTuple):
    """One shard's factorisation of its rows of the arrowhead Hessian.

    Attributes:
        schur: ``(G, G)`` this shard's term ``H_gg^s - sum_i C_i^T B_i^{-1} C_i``.
        log_det_local: ``sum_i log det B_i`` (scalar; ``nan`` if a block is not
            positive definite).
        num_not_positive_definite: blocks ``B_i`` whose Cholesky factor failed.
        local_inverse: ``(P, k, k)`` ``B_i^{-1}``, or ``None`` when ``k = 0``.
        local_inverse_cholesky: ``(P, k, k)`` lower Cholesky factors of
            ``B_i^{-1}``, or ``None``.
        cross: ``(P, k, G)`` the blocks ``C_i = H_{l_i g}``, or ``None``.
    """

    schur: jax.Array
    log_det_local: jax.Array
    num_not_positive_definite: jax.Array
    local_inverse: jax.Array | None
    local_inverse_cholesky: jax.Array | None
    cross: jax.Array | None


def factor_arrowhead(
    hess_global, hess_cross, local_blocks, *, damping: float = 0.0, num_shards: int = 1
) -> ArrowheadFactor:
    """Factor one shard's rows of the arrowhead Hessian.

    Args:
        hess_global: ``(G, G)`` this shard's ``H_gg`` (global sites scaled by
            ``1/num_shards``, so the shards' terms add up to the full ``H_gg``).
        hess_cross: ``(P, k, G)`` the blocks ``C_i``.
        local_blocks: ``(P, k, k)`` the blocks ``B_i`` (symmetrised here), or
            ``None`` when the shard has no local parameters (``k = 0``).
        damping: Levenberg damping ``lam >= 0``: ``lam I`` is added to every
            ``B_i`` and ``lam / num_shards I`` to ``H_gg``, so the shards' terms
            add up to the Schur complement of ``H + lam I``.
        num_shards: S, the number of shards whose terms are summed.

    Returns:
        :class:`ArrowheadFactor`.

    Examples:
        >>> import numpy as np
        >>> f = factor_arrowhead(np.eye(1) * 3.0, np.ones((2, 1, 1)),
        ...                      np.full((2, 1, 1), 2.0))
        >>> float(f.schur[0, 0])  # 3 - 2 * (1 * 1/2 * 1)
        2.0
    """
    hgg = jnp.asarray(hess_global)
    if damping:
        hgg = hgg + (damping / num_shards) * jnp.eye(hgg.shape[0], dtype=hgg.dtype)
    if local_blocks is None or np.shape(local_blocks)[-1] == 0:
        zero = jnp.zeros((), hgg.dtype)
        return ArrowheadFactor(hgg, zero, jnp.zeros((), jnp.int32), None, None, None)
    blocks = jnp.asarray(local_blocks, hgg.dtype)
    cross = jnp.asarray(hess_cross, hgg.dtype)
    return ArrowheadFactor(*_factor_blocks(hgg, cross, blocks, float(damping)))


@jax.jit
def _factor_blocks(hgg, cross, blocks, damping):
    """The local blocks' part of :func:`factor_arrowhead`, one compiled call (the
    damping an argument: no new compilation per damping)."""
    blocks = 0.5 * (blocks + jnp.swapaxes(blocks, -1, -2))
    blocks = blocks + damping * jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
    chol = jnp.linalg.cholesky(blocks)
    not_pd = jnp.sum(~jnp.all(jnp.isfinite(chol), axis=(-1, -2)))
    binv = jnp.linalg.inv(blocks)
    schur = hgg - jnp.einsum("pkg,pkj,pjh->gh", cross, binv, cross)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
    return schur, log_det, not_pd, binv, jnp.linalg.cholesky(binv), cross


def factor_tangent(
    factor: ArrowheadFactor, d_hess_global, d_hess_cross, d_local_blocks
):
    """Directional derivative of one shard's Schur term and ``sum_i log det B_i``.

    Given the derivatives ``dH_gg``, ``dC_i``, ``dB_i`` of the shard's Hessian blocks
    along a direction ``v`` (third derivatives of the log joint contracted with
    ``v``), ``dS_s = dH_gg - sum_i (dC_i^T B_i^{-1} C_i + C_i^T B_i^{-1} dC_i) +
    sum_i C_i^T B_i^{-1} dB_i B_i^{-1} C_i`` and ``d log det B_i = tr(B_i^{-1} dB_i)``.
    Summed over shards, ``d log det H = tr(S^{-1} dS) + sum_i tr(B_i^{-1} dB_i)``:
    the gradient of the Laplace approximation's log determinant (Rue, Martino &
    Chopin 2009, Sec. 3) with the arrowhead structure kept.

    Args:
        factor: this shard's :class:`ArrowheadFactor` at the point (undamped).
        d_hess_global: ``(G, G)`` derivative of this shard's ``H_gg``.
        d_hess_cross: ``(P, k, G)`` derivatives of the ``C_i``.
        d_local_blocks: ``(P, k, k)`` derivatives of the ``B_i``, or ``None`` when
            ``k = 0``.

    Returns:
        ``(d_schur (G, G), d_log_det_local)``.

    Examples:
        >>> import numpy as np
        >>> f = factor_arrowhead(np.eye(1) * 3.0, np.ones((1, 1, 1)),
        ...                      np.full((1, 1, 1), 2.0))
        >>> ds, dl = factor_tangent(f, np.zeros((1, 1)), np.zeros((1, 1, 1)),
        ...                         np.ones((1, 1, 1)))
        >>> float(ds[0, 0]), float(dl)  # S = 3 - 1/B: dS = dB / B^2; d log B = 1/2
        (0.25, 0.5)
    """
    dgg = jnp.asarray(d_hess_global)
    if factor.local_inverse is None or d_local_blocks is None:
        return dgg, jnp.zeros((), dgg.dtype)
    binv = factor.local_inverse
    dc = jnp.asarray(d_hess_cross, binv.dtype)
    db = jnp.asarray(d_local_blocks, binv.dtype)
    return _factor_tangent_blocks(binv, factor.cross, dgg.astype(binv.dtype), dc, db)


@jax.jit
def _factor_tangent_blocks(binv, cross, dgg, dc, db):
    db = 0.5 * (db + jnp.swapaxes(db, -1, -2))
    binv_c = jnp.einsum("pkj,pjg->pkg", binv, cross)  # B_i^{-1} C_i
    mixed = jnp.einsum("pkg,pkh->gh", dc, binv_c)
    d_schur = dgg - mixed - mixed.T + jnp.einsum("pkg,pkj,pjh->gh", binv_c, db, binv_c)
    d_log_det = jnp.einsum("pkj,pjk->", binv, db)
    return d_schur, d_log_det


def unit_curvature_where_flat(hess_cross, local_blocks):
    """Give unit curvature to the local coordinates the log joint does not depend on.

    A local coordinate whose row of the Hessian is zero (in its block ``B_i`` and in
    ``C_i``) does not enter the log joint at all: NumPyro's ``obs_mask`` imputation,
    for one, declares ``<site>_unobserved`` over the whole plate and masks out the
    observed rows. The posterior is flat (improper) along such a coordinate, and
    ``B_i`` is singular there. Setting its diagonal entry to 1 leaves every other
    coordinate's Laplace approximation unchanged (the coordinate is decoupled from
    them) and adds ``log 1 = 0`` to ``log det B_i``; its draws are the mode plus
    standard normal noise and mean nothing, as in MCMC, where such a coordinate
    wanders freely.

    Args:
        hess_cross: ``(P, k, G)`` the blocks ``C_i``.
        local_blocks: ``(P, k, k)`` the blocks ``B_i``.

    Returns:
        ``(blocks (P, k, k), num_flat)``: the blocks with unit curvature on the flat
        coordinates, and how many coordinates were flat (int scalar array).

    Examples:
        >>> import numpy as np
        >>> blocks = np.array([[[2.0, 0.0], [0.0, 0.0]]])  # the 2nd coordinate is flat
        >>> b, n = unit_curvature_where_flat(np.zeros((1, 2, 1)), blocks)
        >>> np.asarray(b)[0].tolist(), int(n)
        ([[2.0, 0.0], [0.0, 1.0]], 1)
    """
    blocks = jnp.asarray(local_blocks)
    return _unit_curvature(jnp.asarray(hess_cross, blocks.dtype), blocks)


@jax.jit
def _unit_curvature(cross, blocks):
    flat = jnp.all(blocks == 0, axis=-1) & jnp.all(cross == 0, axis=-1)  # (P, k)
    eye = jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
    blocks = blocks + flat[..., :, None].astype(blocks.dtype) * eye
    return blocks, jnp.sum(flat)


def newton_reduce(factor: ArrowheadFactor, grad_local):
    """``sum_i C_i^T B_i^{-1} grad_i`` ``(G,)``: a shard's term of the globals' right
    hand side in the Newton system (``0.0`` when ``k = 0``).

    Args:
        factor: this shard's :class:`ArrowheadFactor`.
        grad_local: ``(P, k)`` gradient of the negative log joint in the locals.

    Returns:
        ``(G,)`` array, or the scalar ``0.0`` when the shard has no locals.
    """
    if factor.local_inverse is None:
        return 0.0
    gl = jnp.asarray(grad_local, factor.local_inverse.dtype)
    return _newton_reduce(factor.cross, factor.local_inverse, gl)


@jax.jit
def _newton_reduce(cross, binv, gl):
    return jnp.einsum("pkg,pk->g", cross, jnp.einsum("pkj,pj->pk", binv, gl))


def newton_local_step(factor: ArrowheadFactor, grad_local, delta_global):
    """The locals' Newton step given the globals' one: ``-B_i^{-1} (grad_i + C_i dg)``.

    Args:
        factor: this shard's :class:`ArrowheadFactor`.
        grad_local: ``(P, k)`` gradient in the locals.
        delta_global: ``(G,)`` the globals' step.

    Returns:
        ``(P, k)`` step of the locals (``(P, 0)`` when ``k = 0``).
    """
    if factor.local_inverse is None:
        return jnp.zeros((np.shape(grad_local)[0], 0))
    binv = factor.local_inverse
    gl = jnp.asarray(grad_local, binv.dtype)
    dg = jnp.asarray(delta_global, binv.dtype)
    return _newton_local_step(binv, factor.cross, gl, dg)


@jax.jit
def _newton_local_step(binv, cross, gl, dg):
    rhs = gl + jnp.einsum("pkg,g->pk", cross, dg)
    return -jnp.einsum("pkj,pj->pk", binv, rhs)


def entity_noise(rng_key, entity_ids, num_draws: int, k: int):
    """Standard normal noise of each entity, keyed by its global id.

    Entity ``e`` gets ``normal(fold_in(rng_key, e), (num_draws, k))``, so the noise
    of an entity does not depend on which shard holds it.

    Args:
        rng_key: a JAX key.
        entity_ids: ``(P,)`` integer global ids of the shard's entities.
        num_draws: D.
        k: values per entity.

    Returns:
        ``(P, D, k)`` float array (JAX's default float type).
    """
    return _entity_noise(rng_key, jnp.asarray(entity_ids), int(num_draws), int(k))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _entity_noise(rng_key, ids, num_draws, k):
    return jax.vmap(
        lambda i: jax.random.normal(jax.random.fold_in(rng_key, i), (num_draws, k))
    )(ids)


def laplace_local_draws(factor: ArrowheadFactor, local_mode, delta_global, noise):
    """Draws of a shard's locals given draws of the globals around the mode.

    ``l_i = l_i* - B_i^{-1} C_i dg + chol(B_i^{-1}) z_i``: the conditional of the
    Gaussian ``N(x*, H^{-1})`` given the globals.

    Args:
        factor: this shard's :class:`ArrowheadFactor`.
        local_mode: ``(P, k)`` the locals at the mode.
        delta_global: ``(D, G)`` draws of ``g - g*``.
        noise: ``(P, D, k)`` standard normal noise (:func:`entity_noise`).

    Returns:
        ``(D, P, k)`` unconstrained draws of the locals (``(D, P, 0)`` when
        ``k = 0``).
    """
    dg = jnp.asarray(delta_global)
    if factor.local_inverse is None:
        return jnp.zeros((dg.shape[0], np.shape(local_mode)[0], 0))
    binv = factor.local_inverse
    return _local_draws(
        binv,
        factor.cross,
        factor.local_inverse_cholesky,
        jnp.asarray(local_mode, binv.dtype),
        dg.astype(binv.dtype),
        jnp.asarray(noise, binv.dtype),
    )


@jax.jit
def _local_draws(binv, cross, binv_chol, local_mode, dg, z):
    shift = jnp.einsum("pkj,pjg,dg->dpk", binv, cross, dg)
    spread = jnp.einsum("pkj,pdj->dpk", binv_chol, z)
    return local_mode[None] - shift + spread


# ----------------------------------------------------------------- driver side
def sum_schur_parts(parts, num_global: int) -> np.ndarray:
    """The Schur complement ``S`` ``(G, G)`` float64: the shards' terms added and
    symmetrised.

    Args:
        parts: one ``(G, G)`` term per shard (:attr:`ArrowheadFactor.schur`).
        num_global: G.
    """
    schur = np.sum([np.asarray(p, np.float64) for p in parts], axis=0)
    schur = np.asarray(schur, np.float64).reshape(num_global, num_global)
    return 0.5 * (schur + schur.T)


def levenberg_marquardt_step(eigenvalues, eigenvectors, rhs, damping: float):
    """``(S + lam I)^{-1} rhs`` from the eigendecomposition ``S = V diag(e) V^T``.

    Args:
        eigenvalues: ``(G,)`` ``e``.
        eigenvectors: ``(G, G)`` ``V``.
        rhs: ``(G,)`` right-hand side.
        damping: ``lam``; ``e + lam`` must be positive.

    Returns:
        ``(G,)`` float64 step of the globals.
    """
    rhs = np.asarray(rhs, np.float64)
    if rhs.size == 0:
        return np.zeros(0)
    v = np.asarray(eigenvectors)
    return v @ ((v.T @ rhs) / (np.asarray(eigenvalues) + damping))


class LevenbergMarquardtSystem:
    """The damped systems ``(S + lam I) d = rhs`` of one Schur complement.

    A well-conditioned positive definite ``S`` (the usual case near a mode) is
    solved by Cholesky factors, one per damping ``lam`` (``G^3 / 3`` flops each);
    otherwise (Cholesky fails, or the estimated reciprocal condition number is
    below ``rcond``) by one eigendecomposition (about ``9 G^3`` flops), whose
    smallest eigenvalue sets the damping floor that makes ``S + lam I`` positive
    definite. On the elasticity benchmark (``G`` about 530) the driver spent more
    time in the eigendecompositions of Newton's Schur complements than the workers
    spent on their Hessians.

    Args:
        schur: ``(G, G)`` symmetric ``S``.
        rcond: Cholesky is used when LAPACK's estimate of ``1 / cond_1(S)``
            (``dpocon``) is above this.

    Attributes:
        floor: the smallest damping allowed: 0 for a well-conditioned positive
            definite ``S``, else ``1.01 |e_min| + 1e-10 max(|e_max|, 1)`` when
            ``e_min <= 1e-10 max(|e_max|, 1)``.
        smallest: the smallest eigenvalue (``None`` on the Cholesky path).

    References:
        Golub, G. H. & Van Loan, C. F. (2013). Matrix Computations, 4th ed., Sec.
        4.2 (Cholesky) and Sec. 3.5.4 (condition estimation).

    Examples:
        >>> import numpy as np
        >>> system = LevenbergMarquardtSystem(np.diag([2.0, 4.0]))
        >>> system.solve(np.array([2.0, 4.0]), 0.0).round(12).tolist(), system.floor
        ([1.0, 1.0], 0.0)
        >>> system.solve(np.array([3.0, 5.0]), 1.0).round(12).tolist()
        [1.0, 1.0]
        >>> round(system.largest(), 12)
        4.0
    """

    def __init__(self, schur, rcond: float = 1e-8):
        self.schur = np.asarray(schur, np.float64)
        n = self.schur.shape[0]
        self.floor = 0.0
        self.smallest = None
        self._eig = self._basis = None
        self._largest = None
        self._chol = None  # (lam, lower Cholesky factor of S + lam I)
        if n == 0:
            return
        try:
            chol = linalg.cholesky(self.schur, lower=True)
            anorm = float(np.max(np.sum(np.abs(self.schur), axis=0)))
            estimate, info = linalg.lapack.dpocon(chol.T, anorm)
            if info != 0 or not estimate > rcond:
                raise linalg.LinAlgError("ill-conditioned")
            self._chol = (0.0, chol)
        except (linalg.LinAlgError, ValueError):
            self._eig, self._basis = linalg.eigh(self.schur)
            eig = self._eig
            self.smallest = float(eig[0])
            self._largest = float(eig[-1])
            if eig[0] <= 1e-10 * max(abs(eig[-1]), 1.0):
                self.floor = 1.01 * abs(eig[0]) + 1e-10 * max(abs(eig[-1]), 1.0)

    def largest(self) -> float:
        """The largest eigenvalue of ``S`` (computed once, on first use)."""
        if self._largest is None:
            n = self.schur.shape[0]
            self._largest = (
                float(linalg.eigvalsh(self.schur, subset_by_index=[n - 1, n - 1])[0])
                if n
                else 1.0
            )
        return self._largest

    def solve(self, rhs, damping: float) -> np.ndarray:
        """``(S + damping I)^{-1} rhs`` ``(G,)`` float64; ``damping >= floor``."""
        rhs = np.asarray(rhs, np.float64)
        if rhs.size == 0:
            return np.zeros(0)
        if self._eig is not None:
            return levenberg_marquardt_step(self._eig, self._basis, rhs, damping)
        if self._chol[0] != damping:
            n = self.schur.shape[0]
            self._chol = (
                damping,
                linalg.cholesky(self.schur + damping * np.eye(n), lower=True),
            )
        return linalg.cho_solve((self._chol[1], True), rhs)


def trust_region_step(eigenvalues, eigenvectors, rhs, radius: float):
    """The step of the globals that minimises the reduced quadratic model within a
    trust region: ``min_d  -rhs . d + d^T S d / 2``  subject to  ``|d| <= radius``.

    With ``S = V diag(e) V^T``, the solution is ``d = (S + lam I)^{-1} rhs`` with
    ``lam >= max(0, -e_min)``: ``lam = 0`` when ``S`` is positive definite and the
    Newton step lies inside the region, else the ``lam`` that puts ``d`` on its
    boundary (a scalar root in the eigenbasis, Moré & Sorensen 1983). In the
    "hard case" (``rhs`` orthogonal to the eigenvector of a negative ``e_min``) the
    step is completed along that eigenvector up to the boundary.

    Args:
        eigenvalues: ``(G,)`` ``e``, ascending (as :func:`scipy.linalg.eigh` gives).
        eigenvectors: ``(G, G)`` ``V``.
        rhs: ``(G,)`` right-hand side (minus the reduced gradient).
        radius: the trust radius (Euclidean norm of the step), positive.

    Returns:
        ``(step (G,), lam)``, float64.

    References:
        Moré, J. J. & Sorensen, D. C. (1983). Computing a trust region step. SIAM J.
        Sci. Stat. Comput. 4(3), 553-572.
        Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed., Sec. 4.3.

    Examples:
        >>> import numpy as np
        >>> e, v = np.array([-1.0, 2.0]), np.eye(2)
        >>> d, lam = trust_region_step(e, v, np.array([0.0, 1.2]), radius=0.5)
        >>> np.round(d, 6).tolist(), round(lam, 6)  # hard case: on the boundary
        ([0.3, 0.4], 1.0)
    """
    rhs = np.asarray(rhs, np.float64)
    if rhs.size == 0:
        return np.zeros(0), 0.0
    e = np.asarray(eigenvalues, np.float64)
    v = np.asarray(eigenvectors, np.float64)
    b = v.T @ rhs
    radius = float(radius)
    scale = max(float(np.max(np.abs(e))), 1.0)
    if e[0] > 1e-12 * scale:
        newton = b / e
        if np.linalg.norm(newton) <= radius:
            return v @ newton, 0.0
    low = max(0.0, -float(e[0]))

    def norm(lam):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.linalg.norm(b / (e + lam)))

    # lam just above -e_min: if the step is still inside the region, hard case
    tiny = 1e-12 * scale
    if norm(low + tiny) <= radius:
        lam = low + tiny
        d = b / (e + lam)
        rest = radius**2 - float(d @ d)
        if e[0] < 0 and rest > 0:
            d[0] += np.sqrt(rest) * (1.0 if d[0] >= 0 else -1.0)
        return v @ d, lam
    high = low + float(np.linalg.norm(b)) / radius + tiny
    for _ in range(200):  # bisection on a monotone function: 1e-60 of the bracket
        mid = 0.5 * (low + high)
        if norm(mid) > radius:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(high, 1e-300):
            break
    return v @ (b / (e + high)), high


def laplace_global_draws(schur: np.ndarray, noise: np.ndarray):
    """Draws of ``g - g*`` from ``N(0, S^{-1})``, the covariance and ``log det S``.

    With ``S = L L^T`` (Cholesky), ``dg = L^{-T} z`` has covariance ``S^{-1}``.

    Args:
        schur: ``(G, G)`` symmetric positive definite Schur complement.
        noise: ``(D, G)`` standard normal ``z``.

    Returns:
        ``(delta (D, G), covariance (G, G), log_det_schur)``, float64.

    Raises:
        numpy.linalg.LinAlgError: ``schur`` is not positive definite.

    Examples:
        >>> import numpy as np
        >>> d, cov, logdet = laplace_global_draws(np.array([[4.0]]), np.ones((1, 1)))
        >>> float(d[0, 0]), float(cov[0, 0]), round(logdet, 4)  # 1/2, 1/4, log 4
        (0.5, 0.25, 1.3863)
    """
    schur = np.asarray(schur, np.float64)
    num_global = schur.shape[0]
    noise = np.asarray(noise, np.float64)
    if num_global == 0:
        return np.zeros((noise.shape[0], 0)), np.zeros((0, 0)), 0.0
    chol = linalg.cholesky(schur, lower=True)
    log_det = 2.0 * float(np.sum(np.log(np.diag(chol))))
    cov = linalg.cho_solve((chol, True), np.eye(num_global))
    delta = linalg.solve_triangular(chol.T, noise.T, lower=False).T
    return delta, cov, log_det
