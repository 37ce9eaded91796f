"""Laplace approximation at the MAP, with the arrowhead structure of hierarchical models.

In the unconstrained space the posterior is approximated by ``N(x*, H^{-1})``, ``H``
the Hessian of the negative log joint at the MAP ``x*``. When the local variables
of different entities (products, counties, series) are conditionally independent
given the global ones, ``H`` is an arrowhead matrix::

        [ H_gg   C^T ]        C   = H_lg, one (k, G) block C_i per entity
    H = [            ]        H_ll = diag(B_1, ..., B_P), B_i of shape (k, k)
        [ C     H_ll ]

Each worker computes its ``B_i`` (k Hessian-vector products, by coloring) and its
``C_i`` (at most one Hessian-vector product per global parameter; plated globals
that touch disjoint rows share one, see
:class:`~raybayes.core.hessian_coloring.ColoredGlobalHessian`), keeps them, and returns
its part of the Schur complement ``S = H_gg - sum_i C_i^T B_i^{-1} C_i``
(``(G, G)``). The driver adds the parts and factors ``S``. Then

* globals: ``g ~ N(g*, S^{-1})``;
* locals given globals: ``l_i | g ~ N(l_i* - B_i^{-1} C_i (g - g*), B_i^{-1})``,
  drawn on the worker;
* ``log det H = log det S + sum_i log det B_i``, and the Laplace estimate of the
  log marginal likelihood is ``log p(y, x*) + D/2 log(2 pi) - 1/2 log det H``.

The cost is linear in the number of entities (``O(P k^3 + P k G^2)`` flops and at
most ``G + k`` Hessian-vector passes over the data), and only ``(G, G)`` matrices
cross the network.

References:
    Tierney, L. & Kadane, J. B. (1986). Accurate approximations for posterior
    moments and marginal densities. JASA 81(393), 82-86.
    Rue, H., Martino, S. & Chopin, N. (2009). Approximate Bayesian inference for
    latent Gaussian models by using integrated nested Laplace approximations. JRSS B
    71(2), 319-392. (block structure and Schur complements)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from scipy import linalg

from raybayes.backends import Backend
from raybayes.config import (
    derive_key,
    reject_unknown_arguments,
    renamed_argument,
    resolve_scaling,
    split_model_arguments,
)
from raybayes.core import arrowhead
from raybayes.core.partition import Partition
from raybayes.distributed.objective import (
    ShardedObjective,
    constrained_values,
    planned_objective,
    shard_count,
)
from raybayes.errors import ConfigurationError
from raybayes.optim.map import MAP_METHODS, find_map
from raybayes.optim.newton import NewtonObjective, find_map_newton
from raybayes.optim.newton_cg import find_map_newton_cg
from raybayes.optim.result import MAPResult
from raybayes.progress import progress_lines
from raybayes.results import draws_to_inference_data

__all__ = ["LaplaceResult", "laplace", "laplace_approximation", "newton_polish"]


@dataclass
class LaplaceResult:
    """A Laplace approximation of the posterior.

    Attributes:
        idata: ``arviz.InferenceData`` of draws from the approximation, in the
            constrained space (one chain).
        log_marginal_likelihood: Laplace estimate of ``log p(y)``.
        map: the :class:`~raybayes.optim.map.MAPResult` it is centred on.
        global_covariance: ``(G, G)`` covariance of the unconstrained globals.
        num_not_positive_definite: local blocks whose Hessian was not positive
            definite (0 at a proper mode).
        time_s: wall time of the Hessian, factorisation and draws.
        hessian_vector_products: Hessian-vector products of the final Hessian,
            on the busiest shard (``G + k`` without coloring; see
            :class:`~raybayes.core.hessian_coloring.ColoredGlobalHessian`); 0 when
            the Hessian was reused.
        hessian_reused: the precision is the Hessian the workers kept from the
            Newton-CG run (built within ``hessian_reuse_tol`` of the MAP), not
            one built at the MAP.
    """

    idata: Any
    log_marginal_likelihood: float
    map: MAPResult
    global_covariance: np.ndarray
    num_not_positive_definite: int
    time_s: float
    hessian_vector_products: int = 0
    hessian_reused: bool = False


def newton_polish(
    objective: ShardedObjective,
    map_result: MAPResult,
    *,
    max_steps: int = 20,
    gtol: float = 1e-4,
    batch_size: int = 16,
    progress_bar: bool = False,
    fixed: Sequence[int] = (),
    assemble: bool = True,
    kept_schur: np.ndarray | None = None,
    **deprecated,
) -> MAPResult:
    """Levenberg-Marquardt Newton steps from an L-BFGS point, with the arrowhead
    Hessian.

    ``(S + lam I) dg = -grad_g + sum_s sum_i C_i^T B_i^{-1} grad_i`` on the driver
    (``S`` the Schur complement, eigendecomposed once per Hessian), then
    ``dl_i = -B_i^{-1} (grad_i + C_i dg)`` on the workers: the locals are solved
    exactly for the step of the globals (:mod:`raybayes.core.arrowhead`). A step
    that raises the loss is rejected and ``lam`` multiplied by 4 (a shorter, more
    gradient-like step from the same Hessian, at no extra Hessian-vector
    products); an accepted one divides it by 3. Away from the mode the Hessian
    can be indefinite (a hierarchical scale with few groups, on a curved ridge):
    ``lam`` then starts above ``-lambda_min(S)``, and local blocks that are not
    positive definite are damped by refactoring the kept Hessian on the workers.
    L-BFGS stalls on such ridges, so the Laplace approximation would otherwise not
    be centred on the mode.

    The Hessian (Hessian-vector products over all rows, the expensive part) is
    kept while accepted steps cut the largest gradient component at least
    fourfold (the simplified or "chord" Newton method), and after three rejected
    steps from a kept Hessian it is recomputed at the current point.

    Args:
        objective: the sharded objective ``map_result`` was found with (its
            workers compute and keep their blocks of the Hessian).
        map_result: the starting point (``map_result.x``, ``(objective.size,)``
            unconstrained driver layout) and the counts carried over.
        max_steps: at most this many accepted Newton steps (rejected trials and
            Hessian evaluations are bounded by ``4 * max_steps + 4`` in all).
        gtol: stop when the largest absolute gradient component (of the negative
            log joint, in the unconstrained space) is at most this.
        batch_size: Hessian-vector products evaluated together per worker (memory
            against speed).
        progress_bar: print a line per Newton step and per Hessian to stderr
            (always logged at INFO on ``raybayes.optim``; ``progress=`` is the
            deprecated name).
        fixed: indices into the globals ``(G,)`` held at their values in
            ``map_result.x`` (the hyperparameters of
            :func:`~raybayes.optim.nested_laplace.nested_laplace`): the steps, the
            Schur complement and ``gtol`` then concern the other coordinates only,
            so the result is the mode of the conditional ``p(x | theta, y)``.
        assemble: also compute the constrained values of every site at the
            result (``params``; ``{}`` when ``False``: a call on the workers
            saved, as :func:`~raybayes.optim.map.find_map`'s ``assemble``).
        kept_schur: the Schur complement ``(F, F)`` of the free globals of a Hessian
            the workers already hold (their last undamped ``laplace_factor``,
            at a nearby point): the first steps use it instead of a new Hessian
            (the chord method), until a step cuts the gradient less than fourfold.

    Returns:
        A :class:`MAPResult` at the polished point: ``status`` is ``"converged"``
        when the largest gradient component is below ``gtol`` (else the status of
        ``map_result``), ``num_iterations`` adds the Newton steps and ``message``
        says how many steps and Hessians were used.

    Raises:
        ConfigurationError: an unknown keyword argument.
        ShardError: a shard worker failed (names the shard).

    References:
        Levenberg, K. (1944). A method for the solution of certain non-linear
        problems in least squares. Q. Appl. Math. 2(2), 164-168.
        Marquardt, D. W. (1963). An algorithm for least-squares estimation of
        nonlinear parameters. J. SIAM 11(2), 431-441.
        Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed., Sec.
        10.3.
        Kelley, C. T. (2003). Solving Nonlinear Equations with Newton's Method.
        SIAM, Sec. 2.3 (the chord method).

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> from raybayes.core import Partition
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with ShardedObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     rough = find_map(f, max_steps=1, progress_bar=False)
        ...     r = newton_polish(f, rough, gtol=1e-6)
        >>> r.status, round(float(r.params["mu"]), 4)  # one Newton step: exact
        ('converged', 0.8)
    """
    progress_bar = renamed_argument(deprecated, "progress", "progress_bar",
                                    progress_bar, default=False)
    reject_unknown_arguments(deprecated, "newton_polish")
    emit = progress_lines(progress_bar, "raybayes.optim")
    start = time.perf_counter()
    x = map_result.x.copy()
    G = objective.num_global
    free = np.setdiff1d(np.arange(G), np.asarray(fixed, dtype=np.int64))
    held = np.zeros(objective.size, bool)
    held[np.setdiff1d(np.arange(G), free)] = True

    def value_and_grad(point):
        v, gr = objective.value_and_grad(point)
        gr[held] = 0.0  # the held coordinates neither move nor count for gtol
        return v, gr

    value, grad = value_and_grad(x)
    steps = factorizations = num_hvp = rejected = age = 0
    lam = floor = 0.0  # Levenberg-Marquardt parameter of the global system
    system = None  # the damped systems of the free globals' Schur complement
    for _ in range(4 * max_steps + 4):  # steps, rejected trials and Hessians
        grad_max = float(np.max(np.abs(grad))) if grad.size else 0.0
        if grad_max <= gtol or steps >= max_steps:
            break
        g, locals_ = objective.split(x)
        grad_g, grad_l = objective.split(grad)
        if system is None and kept_schur is not None:  # the workers' kept Hessian
            system = arrowhead.LevenbergMarquardtSystem(kept_schur)
            kept_schur = None
            floor = system.floor
            lam = max(lam, floor)
            rejected = 0
            age = 1  # a stale Hessian: recomputed after three rejected steps
        if system is None:
            parts = objective.gather(
                "laplace_factor",
                lambda s: (g, locals_[s], batch_size, 0.0, False),  # noqa: B023
            )
            local_damping = 0.0
            for _ in range(_MAX_LOCAL_DAMPING_TRIALS):
                if sum(p[2] for p in parts) == 0:  # local blocks positive definite
                    break
                schur = arrowhead.sum_schur_parts([p[0] for p in parts], G)
                scale = np.max(np.abs(np.diag(schur)), initial=1.0)
                if not np.isfinite(scale):  # S is not finite while a B_i is singular
                    scale = 1.0
                local_damping = max(10 * local_damping, 1e-3 * scale)
                parts = objective.gather(  # the same Hessian, damped
                    "laplace_factor",
                    lambda s: (g, locals_[s], batch_size, local_damping, True),  # noqa: B023
                )
            else:
                raise ConfigurationError(
                    f"{sum(p[2] for p in parts)} local Hessian block(s) stay not "
                    f"positive definite with damping {local_damping:.1e} at the "
                    "current point; the log joint is not finite or not smooth "
                    "there. Check the model (its log density and gradient at the "
                    "MAP), or use fit_svi or sample."
                )
            schur = arrowhead.sum_schur_parts([p[0] for p in parts], G)
            schur = schur[np.ix_(free, free)]
            system = arrowhead.LevenbergMarquardtSystem(schur)
            floor = system.floor
            lam = max(lam, floor)
            factorizations += 1
            rejected = age = 0
            num_hvp = max(num_hvp, max(p[3] for p in parts))
            emit(
                f"Newton Hessian {factorizations}: {max(p[3] for p in parts)} "
                f"Hessian-vector products per shard; smallest eigenvalue of S "
                + (
                    f"{system.smallest:.3e}"
                    if system.smallest is not None
                    else "> 0 (Cholesky)"
                )
                + f"; damping: local "
                f"{local_damping:.2e}, "
                f"global {lam:.2e}  {time.perf_counter() - start:7.2f} s"
            )
        reduced = objective.gather(
            "newton_reduce", lambda s: (grad_l[s],)  # noqa: B023
        )
        rhs = -grad_g + np.sum([np.asarray(r, np.float64) for r in reduced], axis=0)
        delta_g = np.zeros(G)
        delta_g[free] = system.solve(np.broadcast_to(rhs, (G,))[free], lam)
        delta_l = objective.gather(
            "newton_local_step",
            lambda s: (grad_l[s], delta_g),  # noqa: B023
        )
        step = objective.join(delta_g, delta_l)
        new_value, new_grad = value_and_grad(x + step)
        new_max = float(np.max(np.abs(new_grad))) if new_grad.size else 0.0
        # near the mode the loss changes by less than its rounding error: there a
        # step is judged by the gradient it leaves
        rounding = 1e-12 * max(abs(value), 1.0)
        level = abs(new_value - value) <= rounding
        if not (
            np.isfinite(new_value)
            and (new_value < value - rounding or (level and new_max < grad_max))
        ):
            # reject: a shorter, more gradient-like step from the same Hessian
            rejected += 1
            lam = max(4.0 * lam, 1e-6 * max(abs(system.largest()), 1.0))
            if rejected >= 3 and age:
                system = None  # the Hessian may be stale: recompute it here
            continue
        x, value, grad = x + step, new_value, new_grad
        steps += 1
        age += 1
        rejected = 0
        emit(
            f"Newton step {steps:3d}  loss {value:.8e}  |grad|max {new_max:.3e}  "
            f"damping {lam:.2e}  {time.perf_counter() - start:7.2f} s"
        )
        lam = max(lam / 3.0, floor)
        if new_max > 0.25 * grad_max:  # slow progress: a fresh Hessian
            system = None
    grad_norm = float(np.max(np.abs(grad))) if grad.size else 0.0
    params = constrained_values(objective, x[None])[0] if assemble else {}
    return MAPResult(
        params={k: v[0] for k, v in params.items()},
        x=x,
        loss=float(value),
        num_iterations=map_result.num_iterations + steps,
        num_evaluations=map_result.num_evaluations,
        converged=grad_norm <= gtol or map_result.converged,
        status="converged" if grad_norm <= gtol else map_result.status,
        message=map_result.message
        + f"; {steps} Newton step(s) with {factorizations} Hessian(s) "
        f"(at most {num_hvp} Hessian-vector products per shard each), "
        f"|grad|max {grad_norm:.2e}",
        grad_norm=grad_norm,
        history=map_result.history + [float(value)],
        time_s=map_result.time_s,
        num_restarts=map_result.num_restarts,
    )


_MAX_LOCAL_DAMPING_TRIALS = 30  # damping 1e-3 * scale up to 1e26 * scale

#: Default ``hessian_reuse_tol`` of :func:`laplace`: posterior standard deviations.
HESSIAN_REUSE_TOL = 0.05


def _root_key(seed):
    """The root key of the draws: ``derive_key(seed)``, or a (deprecated) JAX key."""
    if seed is None:  # the old default of rng_key
        seed = 0
    if isinstance(seed, (int, np.integer)):
        return derive_key(int(seed))
    return seed


def laplace(
    objective: ShardedObjective,
    map_result: MAPResult,
    *,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    newton_steps: int = 20,
    newton_gtol: float = 1e-4,
    hessian_reuse_tol: float = HESSIAN_REUSE_TOL,
    progress_bar: bool = False,
    **deprecated,
) -> LaplaceResult:
    """Laplace approximation around ``map_result``, on the workers of ``objective``.

    Each worker computes and factors its rows of the arrowhead Hessian
    (:func:`raybayes.core.arrowhead.factor_arrowhead`); the driver adds the Schur
    complements, factors ``S`` and draws the globals; each worker then draws its
    locals given them (see the module docstring). After
    :func:`~raybayes.optim.find_map_newton_cg` the workers already hold a
    factored Hessian; when it was built within ``hessian_reuse_tol`` of the MAP
    (``map_result.kept_hessian_distance``) it is used as it is, and no Hessian
    is computed here.

    Args:
        objective: the sharded objective the MAP was found with.
        map_result: the MAP.
        num_samples: draws from the approximation (``num_draws=`` is the deprecated
            name).
        seed: integer seed. Globals use ``derive_key(seed, 0)``, the locals of
            entity ``i`` use ``fold_in(derive_key(seed, 1), i)``: the same draws
            for any number of shards. ``rng_key=`` (a JAX key used as the root
            key) is deprecated.
        batch_size: Hessian-vector products evaluated together per worker.
        newton_steps: at most this many arrowhead Newton steps
            (:func:`newton_polish`) first, when the MAP's largest gradient
            component exceeds ``newton_gtol``.
        newton_gtol: gradient tolerance of those steps.
        hessian_reuse_tol: reuse the Hessian the workers kept from a Newton-CG
            MAP when the MAP lies at most this far from where it was built, in
            that Hessian's norm (posterior standard deviations; the Hessian
            along such a step changes by about this fraction of its third
            derivative term, below the Monte Carlo error of the draws for the
            default 0.05). ``0``: always build the Hessian at the MAP.
        progress_bar: print a line per Newton step and Hessian to stderr
            (``progress=`` is the deprecated name).

    Returns:
        :class:`LaplaceResult`; ``idata.posterior`` has one chain of
        ``num_samples`` draws, constrained; ``hessian_reused`` says whether the
        kept Hessian was used.

    Raises:
        ConfigurationError: the Hessian's Schur complement is not positive
            definite (the point is not a proper mode), or an unknown argument.
        ShardError: a shard worker failed (names the shard).

    References:
        Tierney, L. & Kadane, J. B. (1986). Accurate approximations for posterior
        moments and marginal densities. JASA 81(393), 82-86.
        Rue, H., Martino, S. & Chopin, N. (2009). Approximate Bayesian inference
        for latent Gaussian models by using integrated nested Laplace
        approximations. JRSS B 71(2), 319-392.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> from raybayes.core import Partition
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with ShardedObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     r = laplace(f, find_map(f, progress_bar=False), num_samples=10)
        >>> round(float(r.global_covariance[0, 0]), 4)  # posterior variance 1/5
        0.2
    """
    num_samples = renamed_argument(deprecated, "num_draws", "num_samples",
                                   num_samples, default=1000)
    progress_bar = renamed_argument(deprecated, "progress", "progress_bar",
                                    progress_bar, default=False)
    seed = renamed_argument(deprecated, "rng_key", "seed", seed, default=0)
    key = _root_key(seed)
    reject_unknown_arguments(deprecated, "laplace")
    if not hessian_reuse_tol >= 0:
        raise ConfigurationError(
            f"hessian_reuse_tol={hessian_reuse_tol}; use a number >= 0 such as "
            f"{HESSIAN_REUSE_TOL} (0: always build the Hessian at the MAP)."
        )
    return _laplace(objective, map_result, key, num_samples, batch_size,
                    newton_steps, newton_gtol, progress_bar, hessian_reuse_tol)


def _kept_factor(objective, map_result, tol):
    """The workers' kept factor summaries when ``map_result`` (a Newton-CG MAP)
    says its Hessian was built within ``tol`` of the MAP and every worker still
    holds that undamped factor; ``None`` otherwise."""
    distance = getattr(map_result, "kept_hessian_distance", math.inf)
    kept = getattr(map_result, "kept_hessian_globals", None)
    if kept is None or not distance <= tol:
        return None
    parts = objective.call_all("laplace_kept_factor", np.asarray(kept, np.float64))
    return None if any(p is None for p in parts) else parts


def _laplace(objective, map_result, key, num_samples, batch_size, newton_steps,
             newton_gtol, progress_bar, hessian_reuse_tol=0.0):
    start = time.perf_counter()
    if newton_steps and map_result.grad_norm > newton_gtol:
        map_result = newton_polish(
            objective,
            map_result,
            max_steps=newton_steps,
            gtol=newton_gtol,
            batch_size=batch_size,
            progress_bar=progress_bar,
        )
    g_star, locals_star = objective.split(map_result.x)
    parts = _kept_factor(objective, map_result, hessian_reuse_tol)
    reused = parts is not None
    if not reused:
        parts = objective.gather(
            "laplace_factor", lambda s: (g_star, locals_star[s], batch_size)
        )
    G = objective.num_global
    schur = arrowhead.sum_schur_parts([p[0] for p in parts], G)
    logdet_local = float(sum(p[1] for p in parts))
    not_pd = int(sum(p[2] for p in parts))
    z = np.asarray(
        jax.random.normal(jax.random.fold_in(key, 0), (num_samples, G)), np.float64
    )
    try:
        delta, cov, logdet_schur = arrowhead.laplace_global_draws(schur, z)
    except linalg.LinAlgError as err:
        raise ConfigurationError(
            "the Hessian at the MAP is not positive definite in the global "
            f"parameters ({err}); the MAP did not converge to a proper mode "
            f"(status {map_result.status!r}: {map_result.message}). Raise "
            "max_steps or newton_steps, or check the model: a hierarchical scale "
            "in the centred form (theta ~ Normal(mu, tau)) has a joint density "
            "that grows without bound as tau -> 0, so there is no mode; write it "
            "non-centred (numpyro.infer.reparam.LocScaleReparam) or use fit_svi."
        ) from None
    local_key = jax.random.fold_in(key, 1)
    local_draws = objective.gather(
        "laplace_draw_locals", lambda s: (locals_star[s], delta, local_key)
    )
    globals_ = g_star[None, :] + delta
    values, axes = constrained_values(objective, globals_, local_draws)
    # coordinates the log joint does not depend on (masked out) are not integrated
    dim = objective.size - int(sum(objective.call_all("num_flat_locals")))
    log_ml = (
        -map_result.loss
        + 0.5 * dim * np.log(2 * np.pi)
        - 0.5 * (logdet_schur + logdet_local)
    )
    plate = objective.partition.plate if objective.partition is not None else None
    idata = draws_to_inference_data(
        values,
        axes,
        plate,
        attrs={"inference": "laplace", "log_marginal_likelihood": float(log_ml)},
    )
    return LaplaceResult(
        idata=idata,
        log_marginal_likelihood=float(log_ml),
        map=map_result,
        global_covariance=cov,
        num_not_positive_definite=not_pd,
        time_s=time.perf_counter() - start,
        hessian_vector_products=int(max(p[3] for p in parts)),
        hessian_reused=reused,
    )


def laplace_approximation(
    model: Callable,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    num_shards: int | None = None,
    partition: Partition | None = None,
    source: Any = None,
    backend: str | Backend = "auto",
    num_workers: int | None = None,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    address: str | None = None,
    num_samples: int = 1000,
    seed: int = 0,
    tol: float = 1e-6,
    gtol: float = 1e-5,
    max_steps: int = 200,
    method: str = "lbfgs",
    progress_bar: bool = True,
    x64: bool = True,
    **deprecated: Any,
) -> LaplaceResult:
    """Distributed MAP, then the Laplace approximation there, in one call.

    Args:
        model: a NumPyro model with continuous latent variables (discrete ones
            marked ``infer={"enumerate": "parallel"}`` are summed out).
        *model_args: its positional arguments (not split).
        model_kwargs: its keyword arguments (NumPy arrays and scalars; put into the
            object store once). Passing them as the second positional argument is
            deprecated.
        num_shards: S (one worker per shard); default ``num_workers``, else 1.
        partition: the split; chosen by :func:`raybayes.plan` when ``None``.
        source: a :class:`~raybayes.datasets.parquet.ParquetShards`, read on the
            workers (then ``partition`` is required).
        backend: ``"auto"`` (default; see :func:`raybayes.config.resolve_backend_name`),
            ``"local"`` (in-process), ``"ray"`` or a backend instance.
        num_workers: Ray workers (:class:`~raybayes.config.ScalingConfig`); one
            worker per shard, so it sets ``num_shards`` when that is not given and
            must equal it otherwise.
        use_gpu: one GPU per worker (Ray).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        address: a Ray cluster address (``"HOST:PORT"``).
        num_samples: draws from the approximation (``num_draws=`` deprecated).
        seed: integer seed of the draws (see :func:`laplace`; ``rng_key=``
            deprecated).
        tol: relative decrease of the loss at which L-BFGS stops (see
            :func:`find_map`).
        gtol: largest gradient component at which L-BFGS stops.
        max_steps: maximum L-BFGS iterations (``max_iter=`` deprecated); with
            ``method="newton"`` or ``"newton-cg"``, of the L-BFGS warm-up.
        method: how the MAP is found: ``"lbfgs"`` (default; :func:`find_map`,
            then up to 20 Newton steps if its gradient is above 1e-4) or
            ``"newton"`` (:func:`~raybayes.optim.find_map_newton`: L-BFGS to
            ``tol``, then trust-region Newton steps on the arrowhead Hessian to
            ``gtol``; the fast way to a tight mode of a hierarchical model) or
            ``"newton-cg"`` (:func:`~raybayes.optim.find_map_newton_cg`: the
            same warm-up, then Newton-CG steps preconditioned by one kept
            arrowhead Hessian; fewer full Hessians, and the Laplace step reuses
            the last one when it was built within 0.05 posterior sd of the MAP,
            see :func:`laplace`'s ``hessian_reuse_tol``).
        progress_bar: a line per L-BFGS iteration (``progress=`` deprecated).
        x64: workers compute in float64 (default).

    Returns:
        :class:`LaplaceResult` (its ``map`` field holds the MAP).

    Raises:
        ConfigurationError: an unknown ``method``; see :func:`raybayes.plan`,
            :func:`find_map` and :func:`laplace`.
        ShardError: the model raised on a shard worker (names the shard).

    References:
        Tierney, L. & Kadane, J. B. (1986). Accurate approximations for posterior
        moments and marginal densities. JASA 81(393), 82-86.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> r = laplace_approximation(model, model_kwargs={"y": np.ones(4)},
        ...                           num_shards=2, backend="local",
        ...                           num_samples=10, progress_bar=False)
        >>> round(float(r.map.params["mu"]), 3), r.idata.posterior["mu"].shape
        (0.8, (1, 10))
    """
    model_args, model_kwargs = split_model_arguments(
        model_args, model_kwargs, deprecated
    )
    num_samples = renamed_argument(deprecated, "num_draws", "num_samples",
                                   num_samples, default=1000)
    max_steps = renamed_argument(deprecated, "max_iter", "max_steps", max_steps,
                                 default=200)
    progress_bar = renamed_argument(deprecated, "progress", "progress_bar",
                                    progress_bar, default=True)
    seed = renamed_argument(deprecated, "rng_key", "seed", seed, default=0)
    key = _root_key(seed)
    reject_unknown_arguments(deprecated, "laplace_approximation")
    if method not in MAP_METHODS:
        raise ConfigurationError(
            f"method={method!r}; use 'lbfgs' (L-BFGS), 'newton' (an L-BFGS "
            "warm-up, then trust-region Newton steps on the arrowhead Hessian) or "
            "'newton-cg' (an L-BFGS warm-up, then trust-region Newton-CG steps "
            "preconditioned by a kept arrowhead Hessian)."
        )
    scaling, backend = resolve_scaling(
        backend, num_workers, use_gpu, resources_per_worker, address
    )
    num_shards = shard_count(num_shards, scaling)
    with planned_objective(
        model, model_kwargs, num_shards, partition=partition, backend=backend,
        source=source, model_args=model_args, x64=x64, scaling=scaling,
        objective_class=ShardedObjective if method == "lbfgs" else NewtonObjective,
    ) as objective:
        if method != "lbfgs":
            run = find_map_newton if method == "newton" else find_map_newton_cg
            result = run(
                objective, tol=tol, gtol=gtol, warmup_steps=max_steps,
                progress_bar=progress_bar,
            )
        else:
            result = find_map(
                objective, tol=tol, gtol=gtol, max_steps=max_steps,
                progress_bar=progress_bar,
            )
        return _laplace(objective, result, key, num_samples, 16, 20, 1e-4, False,
                        HESSIAN_REUSE_TOL)
