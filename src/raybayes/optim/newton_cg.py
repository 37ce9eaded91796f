"""Vector-free Newton-CG: trust-region Newton steps from exact Hessian-vector products,
preconditioned by a kept arrowhead factor.

:func:`~raybayes.optim.find_map_newton` builds the full arrowhead Hessian at every
step it refreshes it, and each full Hessian is ``G_colors + k`` Hessian-vector
products (HVPs) over every row (167 for the elasticity model, whose ``G = 1,577``
week x category effects make the colouring wide). Newton-CG (truncated Newton)
needs only ``H v`` for a few vectors per step: the trust-region subproblem
``min_s g.s + s.H s / 2, |s|_M <= radius`` is solved approximately by
preconditioned conjugate gradients, stopped at the boundary, at negative curvature
or at a relative residual ``eta`` (Steihaug 1983; Toint 1981). Every CG iteration
is one sharded HVP of the full objective: each worker computes its rows of
``H p`` for its locals and its term of ``(H p)_g``.

The preconditioner ``M`` is the arrowhead Hessian itself, computed once (or, when
CG needs many iterations, refreshed, at most ``max_hessians`` times) and kept: its
exact local blocks ``B_i`` and cross blocks ``C_i`` stay on the workers, and the
driver keeps the eigendecomposition of its Schur complement ``S`` with the
eigenvalues replaced by their absolute values (floored), so that ``M`` is positive
definite where the Hessian is not. Applying ``M^{-1}`` to a residual ``r`` is the
arrowhead solve: the workers return ``sum_i C_i^T B_i^{-1} r_i``, the driver solves
``S z_g = r_g - sum_i C_i^T B_i^{-1} r_i``, and the workers set
``z_i = B_i^{-1} (r_i - C_i z_g)``. Near the mode ``M`` is close to ``H``, so CG
converges in a few iterations, and the Laplace approximation computes the one
Hessian it needs at the mode anyway.

One CG iteration is two round trips between the driver and the S shards (each
message ``O(G)``):

1. ``H p``: the driver sends the globals of ``p``; each worker forms its locals of
   ``p`` and returns its term of ``(H p)_g``, of ``p_l . (H p)_l`` and of
   ``sum_i C_i^T B_i^{-1} (H p)_i``; the driver forms ``alpha``, the globals of
   the new residual ``r + alpha H p`` and, as the reduction is linear in ``r``,
   its reduced right-hand side ``sum_i C_i^T B_i^{-1} r_i``, and solves ``z_g``;
2. step and preconditioner: the driver sends ``alpha`` and ``z_g``; each worker
   updates its locals of ``s`` and ``r``, forms its locals of ``z`` and returns
   its part of ``r . z``.

The trust region is measured in the ``M``-norm, whose recurrences need no extra
messages (Conn, Gould & Toint 2000, Sec. 7.5.1). The outer loop is a trust-region
method on the full objective: a step whose actual decrease disagrees with the
quadratic model is backtracked along (each trial one evaluation) and the radius
set from the accepted length.

References:
    Steihaug, T. (1983). The conjugate gradient method and trust regions in large
    scale optimization. SIAM J. Numer. Anal. 20(3), 626-637.
    Toint, Ph. L. (1981). Towards an efficient sparsity exploiting Newton method for
    minimization. In Sparse Matrices and Their Uses, Academic Press, 57-88.
    Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed., Ch. 7
    (Algorithm 7.2, CG-Steihaug; Sec. 7.1, forcing sequences).
    Conn, A. R., Gould, N. I. M. & Toint, Ph. L. (2000). Trust-Region Methods. SIAM,
    Sec. 7.5.1 (the preconditioned Steihaug-Toint algorithm and its norms).
    Rue, H., Martino, S. & Chopin, N. (2009). Approximate Bayesian inference for
    latent Gaussian models by using integrated nested Laplace approximations. JRSS B
    71(2), 319-392 (the arrowhead structure and its Schur complement).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg
from threadpoolctl import threadpool_limits

from raybayes.config import reject_unknown_arguments
from raybayes.core import arrowhead
from raybayes.errors import ConfigurationError
from raybayes.optim.newton import (
    NewtonMAPResult,
    NewtonObjective,
    _damped_hessian,
    _max_abs,
    _start,
)
from raybayes.optim.result import map_result_fields
from raybayes.progress import progress_lines

__all__ = ["NewtonCGMAPResult", "find_map_newton_cg"]

#: Armijo constant of the backtracking along a rejected step.
_C1 = 1e-4


@dataclass
class NewtonCGMAPResult(NewtonMAPResult):
    """:class:`~raybayes.optim.NewtonMAPResult` of :func:`find_map_newton_cg`.

    ``num_hessians`` counts the full arrowhead Hessians built for the
    preconditioner (the expensive part: ``hessian_vector_products`` each).

    Attributes:
        num_cg_steps: CG iterations in all, one sharded Hessian-vector product each.
        cg_steps: CG iterations of each outer step (rejected ones included).
        timings_s: wall time, in seconds, by part: ``"warmup"`` (L-BFGS),
            ``"profile"`` (the locals' Newton steps with the globals fixed),
            ``"hessian"`` (full Hessians and their factorisation on the workers),
            ``"factor"`` (the Schur complement's Cholesky factor, or its
            eigendecomposition where it is indefinite, on the driver),
            ``"hvp"`` (CG's Hessian-vector products), ``"precondition"`` (CG's
            steps and preconditioner solves), ``"evaluate"`` (the objective at
            trial points) and ``"accept"``.
        round_trips: driver-workers round trips of the Newton-CG phase (one call
            of every shard each).
        kept_hessian_distance: an upper bound on the distance from the point where
            the workers' kept Hessian was built to the MAP, in that Hessian's norm
            ``|d|_H = sqrt(d.H d)`` (posterior standard deviations of the Laplace
            approximation): the sum of the accepted steps' lengths since. ``inf``
            when that Hessian cannot serve as a Laplace precision (its local
            blocks were damped, or its Schur complement is not positive definite).
            :func:`~raybayes.optim.laplace` reuses the kept Hessian instead of
            building one at the MAP when this is at most its
            ``hessian_reuse_tol``.
        kept_hessian_globals: ``(G,)`` the globals at which the kept Hessian was
            built (``None`` without one).
    """

    num_cg_steps: int = 0
    cg_steps: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    round_trips: int = 0
    kept_hessian_distance: float = math.inf
    kept_hessian_globals: np.ndarray | None = None


class _Clock:
    """Wall time by part, and the driver's round trips."""

    def __init__(self):
        self.timings = {
            k: 0.0
            for k in (
                "warmup",
                "profile",
                "hessian",
                "factor",
                "hvp",
                "precondition",
                "evaluate",
                "accept",
            )
        }
        self.round_trips = 0

    def run(self, part, fn, *args, trips=1):
        t0 = time.perf_counter()
        out = fn(*args)
        self.timings[part] += time.perf_counter() - t0
        self.round_trips += trips
        return out


class _Preconditioner:
    """The driver's half of ``M^{-1}``: ``S`` itself (Cholesky) where it is positive
    definite and well conditioned, else ``S_M = V diag(|e|, floored) V^T``.

    The Cholesky factor costs a tenth of the eigendecomposition (0.12 s against
    2-2.5 s at ``G = 1,577`` on one core), and near the mode, where the Hessian is
    rebuilt, ``S`` is positive definite. The dense algebra runs on one BLAS
    thread: on a loaded machine OpenBLAS's threads wait on each other (the same
    eigendecomposition took 21 s on two threads).
    """

    def __init__(self, schur: np.ndarray, floor: float):
        G = schur.shape[0]
        self.chol = None
        self.basis, self.eig = np.zeros((0, 0)), np.zeros(0)
        self.positive_definite, self.smallest = True, 0.0
        if not G:
            return
        with threadpool_limits(1, user_api="blas"):
            try:
                chol = linalg.cho_factor(schur, lower=True)
                pivots = np.diag(chol[0]) ** 2
                scale = max(float(np.max(np.abs(np.diag(schur)))), 1e-300)
                if np.min(pivots) > floor * scale:
                    self.chol = chol
                    self.smallest = float(np.min(pivots))  # >= the smallest e
                    return
            except linalg.LinAlgError:
                pass
            e, self.basis = linalg.eigh(schur, driver="evd")
        scale = max(float(np.max(np.abs(e))), 1e-300)
        self.smallest = float(e[0])
        self.positive_definite = self.smallest > 0
        self.eig = np.maximum(np.abs(e), floor * scale)

    def describe(self) -> str:
        if self.chol is not None:
            return "S positive definite (Cholesky)"
        return f"smallest eigenvalue of S {self.smallest:.3e}"

    def solve(self, rhs):
        if rhs.size == 0:
            return np.zeros(0)
        if self.chol is not None:
            return linalg.cho_solve(self.chol, rhs)
        return self.basis @ ((self.basis.T @ rhs) / self.eig)


def _boundary(sms, smp, pmp, radius):
    """``tau >= 0`` with ``|s + tau p|_M = radius`` (the positive root)."""
    c = sms - radius**2
    disc = max(smp * smp - pmp * c, 0.0)
    return (-smp + math.sqrt(disc)) / pmp if pmp > 0 else 0.0


@threadpool_limits.wrap(limits=1, user_api="blas")  # the driver's solves with S
def _steihaug(objective, clock, pre, x_global, grad_g, radius, eta, max_cg):
    """The preconditioned Steihaug-Toint CG solve of ``H s = -g``, ``|s|_M <= radius``.

    Returns:
        ``dict(s_g, model, slope, norm, iterations, reason, rz0)``: the globals of
        the step (the locals stay on the workers as their direction), the model's
        change ``g.s + s.H s / 2``, ``g.s``, ``|s|_M``, CG iterations and why CG
        stopped.
    """
    G = grad_g.shape[0]
    r_g = grad_g.copy()
    s_g, hs_g, hp_g = np.zeros(G), np.zeros(G), np.zeros(G)
    red = clock.run("precondition", objective.cg_start)
    z_g = pre.solve(r_g - red)
    rz = float(r_g @ z_g) + clock.run("precondition", objective.cg_precondition, z_g)
    rz0 = rz
    if radius is None:  # the preconditioned Newton step's length
        radius = math.sqrt(max(rz0, 0.0))
    p_g = -z_g
    sms = smp = 0.0
    pmp = rz
    beta = None
    tau, reason, iterations = 0.0, "max_cg_steps", 0
    if not rz0 > 0:
        reason = "zero gradient"
    else:
        while iterations < int(max_cg):
            iterations += 1
            hp_g, php_l, red_hp = clock.run(
                "hvp", objective.cg_hvp, x_global, p_g, beta
            )
            kappa = float(p_g @ hp_g) + php_l
            if not np.isfinite(kappa):
                reason = "non-finite curvature"
                break
            if kappa <= 0:
                tau, reason = _boundary(sms, smp, pmp, radius), "negative curvature"
                break
            alpha = rz / kappa
            if sms + 2 * alpha * smp + alpha * alpha * pmp >= radius**2:
                tau, reason = _boundary(sms, smp, pmp, radius), "trust-region boundary"
                break
            s_g += alpha * p_g
            hs_g += alpha * hp_g
            r_g += alpha * hp_g
            red = red + alpha * red_hp  # sum_i C_i^T B_i^{-1} r_i: linear in r
            z_g = pre.solve(r_g - red)
            rz_new = float(r_g @ z_g) + clock.run(
                "precondition", objective.cg_step, alpha, z_g
            )
            sms = sms + 2 * alpha * smp + alpha * alpha * pmp
            if math.sqrt(max(rz_new, 0.0)) <= eta * math.sqrt(rz0):
                reason = "converged"
                break
            beta = rz_new / rz
            smp = beta * (smp + alpha * pmp)
            pmp = rz_new + beta * beta * pmp
            p_g = -z_g + beta * p_g
            rz = rz_new
    if tau:
        s_g = s_g + tau * p_g
        hs_g = hs_g + tau * hp_g
        sms = sms + 2 * tau * smp + tau * tau * pmp
    gs_l, shs_l = clock.run("precondition", objective.cg_finish, tau)
    slope = float(grad_g @ s_g) + gs_l
    model = slope + 0.5 * (float(s_g @ hs_g) + shs_l)
    return dict(
        s_g=s_g,
        model=model,
        slope=slope,
        norm=math.sqrt(max(sms, 0.0)),
        iterations=iterations,
        reason=reason,
        radius=radius,
    )


def find_map_newton_cg(
    objective: NewtonObjective,
    *,
    init: np.ndarray | None = None,
    gtol: float = 1e-6,
    max_steps: int = 500,
    warmup_steps: int = 500,
    tol: float = 1e-8,
    radius: float | None = None,
    profile_steps: int = 5,
    max_cg_steps: int = 50,
    max_hessians: int = 3,
    refresh_ratio: float = 1.0,
    eigenvalue_floor: float = 1e-6,
    batch_size: int = 16,
    progress_bar: bool = True,
    assemble: bool = True,
    **unknown,
) -> NewtonCGMAPResult:
    """Maximise the log joint by trust-region Newton-CG steps (Steihaug-Toint),
    preconditioned by a kept arrowhead Hessian.

    See the module docstring for the method and its messages. Up to
    ``warmup_steps`` iterations of vector-free L-BFGS run first (to a relative
    decrease of the loss below ``tol``), then up to ``profile_steps`` Newton steps
    of every shard's locals with the globals fixed; the preconditioner is the
    arrowhead Hessian at that point. An outer step costs one CG solve (a few
    sharded Hessian-vector products) and one evaluation of the objective. The
    full Hessian is rebuilt (at most ``max_hessians`` times in all) only when two
    steps in a row were rejected, or when CG has spent on the kept one more
    Hessian-vector products than ``refresh_ratio`` times a Hessian's and its last
    solve took more than 10 iterations: a rent-or-buy rule that spends at most
    about as much on a stale preconditioner as a fresh one costs.

    Args:
        objective: a :class:`~raybayes.optim.NewtonObjective` (its workers hold
            the locals, the kept factor and the CG vectors).
        init: ``(objective.size,)`` starting point (unconstrained, driver layout);
            zeros by default.
        gtol: stop when the largest absolute gradient component (negative log
            joint, unconstrained space) is at most this.
        max_steps: at most this many accepted Newton-CG steps (each a few
            Hessian-vector products; at 10,000 products of the elasticity model
            100 steps were still in the indefinite region the warm-up leaves).
        warmup_steps: at most this many L-BFGS iterations first (0: none).
        tol: relative decrease of the loss that ends the L-BFGS warm-up.
        radius: initial trust radius in the ``M``-norm; ``None`` (default): the
            length of the first preconditioned Newton step ``|M^{-1} g|_M``.
        profile_steps: Newton steps of the locals given the globals after the
            warm-up (on the workers, ``k`` Hessian-vector products each; 0: none).
        max_cg_steps: CG iterations (Hessian-vector products) per outer step.
        max_hessians: full arrowhead Hessians built for the preconditioner, at
            most (at least 1).
        refresh_ratio: rebuild the preconditioner once CG has used this many
            times the Hessian-vector products of a full Hessian with it (see
            above; while ``max_hessians`` allows).
        eigenvalue_floor: eigenvalues of the preconditioner's Schur complement are
            replaced by their absolute values, at least this fraction of the
            largest.
        batch_size: Hessian-vector products evaluated together per worker when a
            full Hessian is built.
        progress_bar: print a line per step and Hessian to stderr (always logged
            at INFO on the ``raybayes.optim`` logger).
        assemble: also compute constrained values of every site at the MAP.

    Returns:
        :class:`NewtonCGMAPResult`: ``status`` ``"converged"`` (largest gradient
        component at most ``gtol``), ``"max_steps"``, ``"line_search_failed"``
        (no decrease along the step from a fresh preconditioner, even with the
        smallest radius) or ``"non_finite"``; ``num_hessians`` full Hessians,
        ``num_cg_steps`` Hessian-vector products in CG, ``timings_s`` by part.

    Raises:
        ConfigurationError: ``objective`` is not a ``NewtonObjective``, or
            ``gtol``, ``max_steps``, ``warmup_steps``, ``tol``, ``radius``,
            ``max_cg_steps``, ``max_hessians``, ``refresh_ratio`` or ``init``
            out of range, or an unknown argument (before any work on the workers).
        ShardError: a shard worker failed (names the shard).

    References:
        Steihaug, T. (1983). The conjugate gradient method and trust regions in
        large scale optimization. SIAM J. Numer. Anal. 20(3), 626-637.
        Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed., Ch. 7.
        Conn, A. R., Gould, N. I. M. & Toint, Ph. L. (2000). Trust-Region Methods.
        SIAM, Sec. 7.5.1.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> from raybayes.core import Partition
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with NewtonObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     r = find_map_newton_cg(f, warmup_steps=0, progress_bar=False)
        >>> r.status, r.num_hessians, round(float(r.params["mu"]), 4)  # mode 4/5
        ('converged', 1, 0.8)
    """
    reject_unknown_arguments(unknown, "find_map_newton_cg")
    if not isinstance(objective, NewtonObjective):
        raise ConfigurationError(
            f"objective is a {type(objective).__name__}; Newton-CG needs a "
            "NewtonObjective (or use fit_map(..., method='newton-cg'))."
        )
    if not gtol > 0:
        raise ConfigurationError(f"gtol={gtol}; use a positive number such as 1e-6.")
    for name, value, low in (
        ("max_steps", max_steps, 1),
        ("warmup_steps", warmup_steps, 0),
        ("profile_steps", profile_steps, 0),
        ("max_cg_steps", max_cg_steps, 1),
        ("max_hessians", max_hessians, 1),
    ):
        if int(value) != value or int(value) < low:
            raise ConfigurationError(f"{name}={value}; use an integer >= {low}.")
    if not tol > 0:
        raise ConfigurationError(f"tol={tol}; use a positive number such as 1e-8.")
    if not refresh_ratio > 0:
        raise ConfigurationError(
            f"refresh_ratio={refresh_ratio}; use a positive number such as 1."
        )
    if radius is not None and not radius > 0:
        raise ConfigurationError(
            f"radius={radius}; use a positive number, or None for the length of "
            "the first preconditioned Newton step."
        )
    if not 0 < eigenvalue_floor < 1:
        raise ConfigurationError(
            f"eigenvalue_floor={eigenvalue_floor}; use a number in (0, 1) such as 1e-6."
        )
    if init is not None and np.shape(init) != (objective.size,):
        raise ConfigurationError(
            f"init has shape {np.shape(init)}; the objective needs ({objective.size},)."
        )
    emit = progress_lines(progress_bar, "raybayes.optim")
    clock = _Clock()
    start = time.perf_counter()
    evals_before = objective.num_evaluations
    x_global, value, grad_g, max_local, num_warmup, history, newton_start = _start(
        objective, init, warmup_steps, tol, gtol, profile_steps, progress_bar, emit,
        clock.run,
    )
    G = objective.num_global
    grad_max = max(_max_abs(grad_g), max_local)
    steps = hessians = num_hvp = rejected = age = total_cg = cg_since = 0
    hvp_now = 0
    cg_counts: list[int] = []
    pre = None
    kept_globals, kept_ok, moved = None, False, math.inf
    status, message = None, ""
    if not np.isfinite(value):
        status, message = "non_finite", "the log density is not finite at init"
    while status is None:
        if grad_max <= gtol:
            status, message = "converged", "largest gradient component <= gtol"
            break
        if steps >= int(max_steps):
            status, message = "max_steps", f"stopped after max_steps={max_steps}"
            break
        if pre is None:
            parts, local_damping, hvp_now = _damped_hessian(
                objective, x_global, batch_size, clock.run
            )
            schur = arrowhead.sum_schur_parts([p[0] for p in parts], G)
            pre = clock.run(
                "factor", _Preconditioner, schur, float(eigenvalue_floor), trips=0
            )
            hessians += 1
            num_hvp = max(num_hvp, hvp_now)
            rejected = age = cg_since = 0
            # a Laplace precision when undamped and positive definite
            kept_globals, moved = x_global.copy(), 0.0
            kept_ok = local_damping == 0.0 and pre.positive_definite
            emit(
                f"Newton-CG Hessian {hessians}: {hvp_now} Hessian-vector products "
                f"per shard; {pre.describe()}; local "
                f"damping {local_damping:.2e}  {time.perf_counter() - start:7.2f} s"
            )
        eta = min(0.1, math.sqrt(grad_max))
        cg = _steihaug(
            objective, clock, pre, x_global, grad_g, radius, eta, max_cg_steps
        )
        radius = cg["radius"]
        total_cg += cg["iterations"]
        cg_since += cg["iterations"]
        cg_counts.append(cg["iterations"])
        delta_g, slope, predicted = cg["s_g"], cg["slope"], -cg["model"]
        alpha, accepted = 1.0, None
        rounding = 1e-12 * max(abs(value), 1.0)
        if slope < 0 and predicted > 0:
            for _ in range(8):
                new_value, new_grad, new_max = clock.run(
                    "evaluate", objective.evaluate, x_global + alpha * delta_g, alpha
                )
                decrease = value - new_value
                if alpha == 1.0:
                    ok = decrease >= 1e-4 * predicted
                else:
                    ok = decrease >= -_C1 * alpha * slope
                # near the mode the loss changes by less than its rounding error:
                # there a step is judged by the gradient it leaves
                level = abs(decrease) <= rounding and new_max < grad_max
                if np.isfinite(new_value) and (ok or level):
                    accepted = (alpha, new_value, new_grad, new_max, decrease)
                    break
                alpha *= 0.25 if not np.isfinite(new_value) else 0.5
        if accepted is None:
            rejected += 1
            radius = max(0.25 * cg["norm"], 1e-12)
            emit(
                f"Newton-CG step rejected ({cg['iterations']} CG, {cg['reason']}); "
                f"radius {radius:.3e}  {time.perf_counter() - start:7.2f} s"
            )
            if age and rejected >= 2 and hessians < int(max_hessians):
                pre = None  # the kept preconditioner may be stale: rebuild it here
            elif rejected >= 6 or radius <= 1e-10:
                status = "line_search_failed"
                message = "no decrease along the Newton-CG step, even when short"
            continue
        alpha, new_value, new_grad, new_max, decrease = accepted
        clock.run("accept", objective.accept, alpha)
        x_global = x_global + alpha * delta_g
        moved += alpha * cg["norm"]
        ratio = decrease / predicted
        if alpha < 1.0:
            radius = max(alpha * cg["norm"], 1e-12)
        elif ratio > 0.75 and cg["norm"] >= 0.9 * radius:
            radius = min(4.0 * radius, 1e12)
        elif ratio < 0.25:
            radius = max(0.5 * cg["norm"], 1e-12)
        value, grad_g = new_value, new_grad
        steps += 1
        age += 1
        rejected = 0
        history.append(value)
        emit(
            f"Newton-CG step {steps:3d}  loss {value:.8e}  |grad|max {new_max:.3e}  "
            f"{cg['iterations']:2d} CG ({cg['reason']}), step {alpha:.3g} x "
            f"{cg['norm']:.3e} (ratio {ratio:.3f})  "
            f"{time.perf_counter() - start:7.2f} s"
        )
        grad_max = new_max
        if (
            cg_since > float(refresh_ratio) * hvp_now
            and cg["iterations"] > 10
            and hessians < int(max_hessians)
            and grad_max > gtol
        ):
            pre = None  # CG has spent a Hessian's worth on this one: a fresh one
    if status != "converged":
        emit(f"Newton-CG stopped: {status} ({message})")
    x = objective.join(x_global, objective.gather_locals())
    now = time.perf_counter()
    fields = map_result_fields(
        objective,
        x,
        value,
        history,
        evals_before,
        status,
        f"{message}; {num_warmup} L-BFGS warm-up iteration(s), {steps} Newton-CG "
        f"step(s) with {total_cg} Hessian-vector product(s) in CG and {hessians} "
        f"full Hessian(s) (at most {num_hvp} Hessian-vector products per shard "
        "each)",
        grad_max,
        now - start,
        0,
        assemble,
    )
    return NewtonCGMAPResult(
        **fields,
        num_hessians=hessians,
        hessian_vector_products=num_hvp,
        warmup_steps=num_warmup,
        newton_time_s=now - newton_start,
        num_cg_steps=total_cg,
        cg_steps=cg_counts,
        timings_s=dict(clock.timings),
        round_trips=clock.round_trips,
        kept_hessian_distance=moved if kept_ok else math.inf,
        kept_hessian_globals=kept_globals,
    )
