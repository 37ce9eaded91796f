"""Integrated nested Laplace approximation (INLA) on the arrowhead system.

For a latent Gaussian model, split the unconstrained parameters into a few
hyperparameters ``theta`` (scales, concentrations; global sites) and the latent
field ``x`` (everything else: the locals of every entity and the other globals).

1. For a given ``theta``, the conditional ``p(x | theta, y)`` is approximated by the
   Gaussian at its mode ``x*(theta)``, found by Newton steps on the arrowhead system
   with ``theta`` held fixed (:func:`~raybayes.optim.laplace.newton_polish` with
   ``fixed=``): the local blocks stay on their shard workers, only the Schur
   complement of the free globals crosses the network.
2. ``log p(theta | y) ~ log p(y, x*, theta) + n_x/2 log(2 pi) - 1/2 log det H(x*)``
   (up to ``log p(y)``), ``H`` the Hessian of the negative log joint in ``x``, ``n_x``
   its dimension; ``log det H = log det S + sum_i log det B_i``
   (:mod:`raybayes.core.arrowhead`). The log joint is that of the unconstrained
   space, so it carries the Jacobian of ``theta``'s transform.
3. Its mode ``theta*`` is found with SciPy's BFGS on the gradient of
   ``log p(theta | y)``: by the implicit function theorem at the mode,
   ``dx*/dtheta = -H^{-1} H_{x theta}`` (an arrowhead solve per hyperparameter),
   and the derivative of ``log det H`` along ``(dx*/dtheta_j, e_j)`` is
   ``tr(S^{-1} dS) + sum_i tr(B_i^{-1} dB_i)``, with ``dS`` and ``dB_i`` the
   derivatives of the shards' Hessian blocks along that direction (third
   derivatives of the log joint; the locals stay on their shards): central
   differences of the compiled Hessian by default (error ``O(h^2)``, ``h = 1e-4``),
   or forward-mode derivatives of the Hessian-vector products (exact, at the price
   of one more compilation per shard). Each conditional mode starts
   from the nearest one found so far moved along its tangent ``dx*/dtheta``, with
   the Hessian the workers kept from it (chord Newton). The Hessian of
   ``log p(theta | y)`` at the mode is taken by finite differences:
   ``Sigma = (-d^2 log p(theta | y))^{-1} = V diag(1/lambda) V^T``.
4. ``theta`` is integrated over a design in the standardised coordinates
   ``z = diag(lambda)^{1/2} V^T (theta - theta*)`` (Rue, Martino & Chopin 2009,
   Sec. 6.5): a grid of step ``dz`` for one or two hyperparameters (points whose log
   density is within ``diff_logdens`` of the mode), else a central composite
   design (the centre, the corners of a two-level (fractional) factorial at
   ``+-f0`` and the axial points at ``+-f0 sqrt(d)``). The design's weights are
   ``w_k ~ a_k p(theta_k | y)``, with ``a_k`` chosen so that the design reproduces
   the covariance of ``theta`` exactly when ``log p(theta | y)`` is quadratic.
5. The posterior of ``x`` is the mixture ``sum_k w_k N(x*(theta_k), H_k^{-1})``;
   the draws take ``theta`` from the design points in proportion to the weights and
   ``x`` from the conditional Gaussian of their point.

References:
    Rue, H., Martino, S. & Chopin, N. (2009). Approximate Bayesian inference for
    latent Gaussian models by using integrated nested Laplace approximations. JRSS B
    71(2), 319-392. https://doi.org/10.1111/j.1467-9868.2008.00700.x
    Gaedke-Merzhäuser, L., Krainski, E., Janalik, R., Rue, H. & Schenk, O. (2024).
    Integrated nested Laplace approximations for large-scale spatiotemporal Bayesian
    modeling. SIAM J. Sci. Comput. (distributed INLA; see docs/nested_laplace.md).
    Box, G. E. P. & Wilson, K. B. (1951). On the experimental attainment of optimum
    conditions. JRSS B 13(1), 1-45 (central composite designs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import jax
import numpy as np
from scipy import linalg, optimize
from threadpoolctl import threadpool_limits

from raybayes.backends import Backend
from raybayes.config import (
    derive_key,
    reject_unknown_arguments,
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
from raybayes.optim.laplace import newton_polish
from raybayes.optim.result import MAPResult
from raybayes.progress import progress_lines
from raybayes.results import draws_to_inference_data

__all__ = [
    "NestedLaplaceResult",
    "central_composite_design",
    "find_hyperparameters",
    "nested_laplace",
]

#: Distributions whose latent sites make the latent Gaussian field.
_GAUSSIAN = ("Normal", "MultivariateNormal", "LowRankMultivariateNormal")
_DESIGNS = ("auto", "grid", "ccd", "mode")


@dataclass
class NestedLaplaceResult:
    """An integrated nested Laplace approximation of the posterior.

    Attributes:
        idata: ``arviz.InferenceData`` of ``num_samples`` draws from the mixture, in
            the constrained space (one chain).
        log_marginal_likelihood: estimate of ``log p(y)`` (the design's integral of
            the Laplace approximation of ``p(y, theta)``).
        hyperparameters: the hyperparameter sites ``theta``, in the order of the
            globals.
        mode: ``(d,)`` unconstrained ``theta*``, the mode of ``p(theta | y)``.
        covariance: ``(d, d)`` inverse of the negative Hessian of
            ``log p(theta | y)`` at the mode (unconstrained).
        design: ``(K, d)`` unconstrained design points ``theta_k``.
        log_density: ``(K,)`` ``log p(theta_k | y)`` up to a constant.
        weights: ``(K,)`` normalised weights of the design points.
        num_draws_per_point: ``(K,)`` draws taken from each point's Gaussian.
        map: the conditional mode ``x*(theta*)`` (a
            :class:`~raybayes.optim.result.MAPResult`; the full driver vector).
        num_evaluations: evaluations of ``log p(theta | y)`` (each one a Newton
            solve for ``x*`` and a Hessian).
        num_gradients: evaluations of its gradient (``d`` directional
            derivatives of the latent field's Hessian each).
        time_s: wall time, worker start-up excluded.
        timings: seconds spent finding the mode (``"mode_s"``), the Hessian at it
            (``"hessian_s"``), the design (``"design_s"``) and the draws
            (``"draws_s"``).
    """

    idata: Any
    log_marginal_likelihood: float
    hyperparameters: list[str]
    mode: np.ndarray
    covariance: np.ndarray
    design: np.ndarray
    log_density: np.ndarray
    weights: np.ndarray
    num_draws_per_point: np.ndarray
    map: MAPResult
    num_evaluations: int
    time_s: float
    num_gradients: int = 0
    timings: dict = field(default_factory=dict)


# ------------------------------------------------------------------- the model
def _base_distribution(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _is_positive(fn) -> bool:
    from numpyro.distributions import constraints

    support = getattr(fn, "support", None)
    if support is None:
        return False
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    lower = getattr(support, "lower_bound", None)
    upper = getattr(support, "upper_bound", None)
    if isinstance(support, constraints._GreaterThan):
        try:
            return float(np.min(np.asarray(lower))) >= 0.0
        except (TypeError, ValueError):
            return False
    return bool(
        isinstance(support, constraints._Interval)
        and upper is not None
        and np.all(np.isinf(np.asarray(upper)))
    )


def find_hyperparameters(model: Callable, *model_args, model_kwargs=None) -> list[str]:
    """The hyperparameter sites of a latent Gaussian model, found from its trace.

    A hyperparameter is a latent site with positive support (a scale, a precision,
    a concentration) that is not itself Gaussian and on which a Gaussian latent site
    or an observed site depends (NumPyro's
    :func:`~numpyro.infer.inspect.get_dependencies`, through deterministic sites
    too). The other latent sites make the latent field.

    Args:
        model: a NumPyro model.
        *model_args: its positional arguments.
        model_kwargs: its keyword arguments (the data).

    Returns:
        The sites' names, in the order the model samples them.

    Raises:
        ConfigurationError: the model has no Gaussian latent site (nested Laplace
            needs a latent Gaussian field given the hyperparameters), or no
            hyperparameter was found.

    Examples:
        >>> import numpy as np, numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        ...     with numpyro.plate("groups", y.shape[0]):
        ...         theta = numpyro.sample("theta", dist.Normal(0.0, tau))
        ...         numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)
        >>> find_hyperparameters(model, model_kwargs={"y": np.zeros(3)})
        ['tau']
    """
    from numpyro.infer.inspect import get_dependencies

    model_kwargs = dict(model_kwargs or {})
    tr = _trace(model, model_args, model_kwargs)
    latent = {
        n: s
        for n, s in tr.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not s.get("infer", {}).get("is_auxiliary")
    }
    observed = [n for n, s in tr.items() if s["type"] == "sample" and s["is_observed"]]
    gaussian = [
        n
        for n, s in latent.items()
        if type(_base_distribution(s["fn"])).__name__ in _GAUSSIAN
    ]
    if not gaussian:
        raise ConfigurationError(
            f"the model has no Gaussian latent site (latent sites: "
            f"{sorted(latent) or 'none'}); nested Laplace needs a latent Gaussian "
            "field given the hyperparameters, e.g. effects sampled from "
            "dist.Normal(loc, scale) with a scale site such as "
            "numpyro.sample('sigma', dist.HalfNormal(1.0)). For other models use "
            "laplace_approximation, fit_svi or sample."
        )
    candidates = [
        n
        for n in latent
        if n not in gaussian and _is_positive(_base_distribution(latent[n]["fn"]))
    ]
    try:
        deps = get_dependencies(model, model_args, model_kwargs)["prior_dependencies"]
        children = set(gaussian) | set(observed)
        used = {p for c in children for p in deps.get(c, {}) if p != c}
        candidates = [n for n in candidates if n in used]
    except Exception:  # noqa: BLE001 - the dependency trace is a refinement only
        pass
    if not candidates:
        raise ConfigurationError(
            f"no hyperparameter found: no latent site with positive support (a "
            f"scale or concentration) on which the Gaussian latent sites "
            f"{gaussian} or the likelihood depend. Pass hyperparameters=[site "
            "names], or use laplace_approximation for a model without them."
        )
    return candidates


def _check_hyperparameters(names, latent_names, global_sites):
    globals_ = [n for n, _ in global_sites]
    bad = [n for n in names if n not in globals_]
    if bad:
        where = (
            "local sites (inside the split plate)"
            if all(n in latent_names for n in bad)
            else "not latent sites of the model"
        )
        raise ConfigurationError(
            f"hyperparameters {bad} are {where}; hyperparameters must be global "
            f"latent sites, one of {globals_}. Pass hyperparameters='auto' or "
            "names from that list."
        )


# ------------------------------------------------------------------ the design
def central_composite_design(dim: int, f0: float = 1.1):
    """Central composite design in standardised coordinates, with its weights.

    The centre, the ``2^d`` corners at ``+-f0`` (a half fraction with the last
    column the product of the others when ``d >= 5``: orthogonal columns, resolution
    ``d``) and the ``2 d`` axial points at ``+-f0 sqrt(d)``; every non-centre point
    lies at radius ``f0 sqrt(d)``. With the centre weight 1 and the others
    ``exp(d f0^2 / 2) / ((K - 1)(f0^2 - 1))``, the weights times a standard normal
    density sum to a mixture with mean 0 and covariance ``I`` (exact second
    moments).

    Args:
        dim: d >= 1, the number of hyperparameters.
        f0: the radius factor (> 1; Rue, Martino & Chopin 2009 use about 1.1).

    Returns:
        ``(points (K, d), base_weights (K,))`` float64; the centre comes first.

    Raises:
        ConfigurationError: ``dim < 1`` or ``f0 <= 1``.

    References:
        Rue, H., Martino, S. & Chopin, N. (2009). JRSS B 71(2), Sec. 6.5.

    Examples:
        >>> z, a = central_composite_design(2)
        >>> z.shape, float(a[0])
        ((9, 2), 1.0)
    """
    if dim < 1 or f0 <= 1.0:
        raise ConfigurationError(
            f"central_composite_design(dim={dim}, f0={f0}); use dim >= 1, f0 > 1."
        )
    corners = np.array(list(product((-1.0, 1.0), repeat=dim)))
    if dim >= 5:
        base = np.array(list(product((-1.0, 1.0), repeat=dim - 1)))
        corners = np.column_stack([base, np.prod(base, axis=1)])
    axial = np.concatenate([np.eye(dim), -np.eye(dim)]) * np.sqrt(dim)
    points = np.concatenate([np.zeros((1, dim)), f0 * corners, f0 * axial])
    num = points.shape[0]
    other = np.exp(0.5 * dim * f0**2) / ((num - 1) * (f0**2 - 1.0))
    weights = np.full(num, other)
    weights[0] = 1.0
    return points, weights


# ------------------------------------------------------------ log p(theta | y)
class _ConditionalLaplace:
    """``log p(theta | y)`` up to a constant, with the conditional modes kept."""

    def __init__(self, objective, index, x0, batch_size, gtol, max_newton, emit):
        self.objective = objective
        self.index = np.asarray(index, np.int64)
        self.x = np.asarray(x0, np.float64).copy()
        self.batch_size = batch_size
        self.gtol = gtol
        self.max_newton = max_newton
        self.emit = emit
        self.num_evaluations = 0
        self.num_free = objective.size - self.index.size
        self.rescue = None  # a callable giving another start point, used once
        self.last = None  # (theta, mode, Cholesky of S) of the last finite value
        self.num_gradients = 0
        self.kept = None  # Schur complement of the Hessian the workers hold
        # D_v S and D_v B_i: "forward" (forward-mode derivatives of the
        # Hessian-vector products: exact, one more compilation per shard) or
        # "differences" (central differences of the compiled Hessian along v)
        self.third_derivatives = "differences"

    def mode(self, theta, start=None):
        """``x*(theta)`` (a MAPResult) by Newton from ``start`` (default: the last
        mode found). If Newton fails from there the first time, it starts again
        from the joint MAP's latent field (``rescue``, used once)."""
        result = self._newton(theta, start)
        if result.grad_norm > max(self.gtol, 1e-3) and self.rescue is not None:
            rescue, self.rescue = self.rescue, None
            self.emit("Newton failed from the start point; restarting from the MAP")
            result = self._newton(theta, rescue())
        if result.grad_norm > max(self.gtol, 1e-3):
            raise ConfigurationError(
                f"the conditional mode x*(theta) was not found at theta={theta} "
                f"(largest gradient component {result.grad_norm:.2e} after "
                f"{4 * self.max_newton} Newton steps). Check the model, or pass "
                "hyperparameters= explicitly."
            )
        return result

    def _newton(self, theta, start):
        x = (self.x if start is None else start).copy()
        x[self.index] = theta
        value, grad = self.objective.value_and_grad(x)
        grad[self.index] = 0.0
        rough = MAPResult(
            params={},
            x=x,
            loss=value,
            num_iterations=0,
            num_evaluations=1,
            converged=False,
            status="start",
            message="",
            grad_norm=float(np.max(np.abs(grad), initial=0.0)),
            history=[value],
            time_s=0.0,
        )
        if rough.grad_norm <= self.gtol:
            return rough
        # a cold start far from the mode (e.g. a Poisson rate whose Newton steps
        # overshoot) may need more damped steps: up to 4 rounds
        result = rough
        # the first steps use the Hessian the workers kept from the last mode (the
        # chord method: a nearby point, so no new Hessian while it converges)
        kept, self.kept = self.kept, None
        for _ in range(4):
            result = newton_polish(
                self.objective,
                result,
                max_steps=self.max_newton,
                gtol=self.gtol,
                batch_size=self.batch_size,
                fixed=self.index,
                assemble=False,
                kept_schur=kept,
            )
            kept = None
            if result.grad_norm <= self.gtol:
                break
        return result

    def factor(self, x):
        """Factor the Hessian in ``x`` at ``x`` on the workers; the Schur complement
        of the free globals and ``sum_i log det B_i``."""
        obj = self.objective
        g, locals_ = obj.split(x)
        parts = obj.gather("laplace_factor", lambda s: (g, locals_[s], self.batch_size))
        schur = arrowhead.sum_schur_parts([p[0] for p in parts], obj.num_global)
        free = np.setdiff1d(np.arange(obj.num_global), self.index)
        self.kept = schur[np.ix_(free, free)]
        return (
            self.kept,
            float(sum(p[1] for p in parts)),
            int(sum(p[2] for p in parts)),
        )

    def __call__(self, theta, start=None):
        """``(log p~(theta | y), mode)``; ``-inf`` where the Hessian is not positive
        definite."""
        theta = np.asarray(theta, np.float64)
        result = self.mode(theta, start)
        schur, logdet_local, not_pd = self.factor(result.x)
        self.num_evaluations += 1
        try:
            chol = linalg.cholesky(schur, lower=True) if schur.size else np.eye(0)
        except linalg.LinAlgError:
            return -np.inf, result
        if not_pd:
            return -np.inf, result
        logdet = 2.0 * float(np.sum(np.log(np.diag(chol)))) + logdet_local
        value = -result.loss + 0.5 * self.num_free * np.log(2 * np.pi) - 0.5 * logdet
        self.last = (theta.copy(), result, chol)
        self.emit(
            f"log p(theta|y) {value:.6f} at theta {np.round(theta, 4).tolist()} "
            f"({self.num_evaluations} evaluations)"
        )
        return float(value), result

    def gradient(self, theta):
        """The gradient of ``log p~(theta | y)`` ``(d,)`` and the tangents
        ``dx*/dtheta`` ``(size, d)`` of the conditional mode, at the ``theta`` of
        the last finite evaluation (:meth:`__call__`, whose factor the workers
        keep).

        By the implicit function theorem at the mode (``grad_x F = 0``),
        ``dx*/dtheta_j = -H_xx^{-1} H_{x theta_j}`` (one arrowhead solve per
        hyperparameter with the kept factor), and with ``v_j = (dx*/dtheta_j,
        e_j)``::

            d/dtheta_j log p~ = -D_{v_j} F - 1/2 D_{v_j} log det H_xx,
            D_v log det H_xx = tr(S^{-1} D_v S) + sum_i tr(B_i^{-1} D_v B_i),

        where ``D_v S`` and ``D_v B_i`` are the derivatives of the shards' Hessian
        blocks along ``v``: central differences of the Hessian at ``x* +- h v``
        (``third_derivatives = "differences"``, the default,
        :meth:`ShardWorker.laplace_factor_difference`) or forward-mode
        derivatives (``"forward"``, :meth:`ShardWorker.laplace_factor_tangent`):
        ``d`` directional third derivatives, the locals on their shards, the
        ``G x G`` terms summed on the driver (Rue, Martino & Chopin 2009). Exact
        with ``"forward"``; with ``"differences"`` the error is ``O(h^2)``
        (``h = 1e-4``; the tests hold both to 1e-6 relative of central
        differences of ``log p~(theta | y)`` on eight schools).
        """
        last_theta, result, chol = self.last
        if not np.array_equal(last_theta, theta):
            raise RuntimeError("gradient() must follow an evaluation at theta")
        obj = self.objective
        G = obj.num_global
        idx = self.index
        d = idx.size
        free = np.setdiff1d(np.arange(G), idx)
        x = result.x
        _, grad_f = obj.value_and_grad(x)  # the full gradient of F, theta included
        cols = obj.gather("laplace_hessian_columns", lambda s: (idx,))
        h_g = np.sum([np.asarray(c[0], np.float64) for c in cols], axis=0)  # (G, d)
        tangents = np.zeros((obj.size, d))
        for j in range(d):
            reduced = obj.gather(
                "newton_reduce",
                lambda s: (np.asarray(cols[s][1])[..., j],),  # noqa: B023
            )
            rhs = -h_g[:, j] + np.sum(
                [np.broadcast_to(np.asarray(r, np.float64), (G,)) for r in reduced],
                axis=0,
            )
            v_g = np.zeros(G)
            if free.size:
                v_g[free] = linalg.cho_solve((chol, True), rhs[free])
            v_g[idx[j]] = 1.0
            # -B_i^{-1} C_i v_g = -B_i^{-1} (C_i,free dg + H_{l_i theta_j})
            v_l = obj.gather(
                "newton_local_step",
                lambda s: (np.zeros(obj.local_shapes[s]), v_g),  # noqa: B023
            )
            tangents[:, j] = obj.join(v_g, v_l)
        # the d directional derivatives of the shards' Hessian blocks, together
        columns = [obj.split(tangents[:, j]) for j in range(d)]
        dir_g = np.stack([c[0] for c in columns])  # (d, G)
        dir_l = [
            np.stack([c[1][s] for c in columns]) for s in range(obj.num_shards)
        ]  # (d, P_s, k) per shard
        if self.third_derivatives == "forward":
            parts = obj.gather(
                "laplace_factor_tangent",
                lambda s: (dir_g, dir_l[s], self.batch_size),
            )
        else:
            parts = obj.gather(
                "laplace_factor_difference",
                lambda s: (dir_g, dir_l[s], 1e-4, self.batch_size),
            )
        out = np.zeros(d)
        for j in range(d):
            d_schur = arrowhead.sum_schur_parts([p[0][j] for p in parts], G)
            d_schur = d_schur[np.ix_(free, free)]
            d_logdet = float(sum(p[1][j] for p in parts))
            if free.size:
                d_logdet += float(np.trace(linalg.cho_solve((chol, True), d_schur)))
            out[j] = -float(grad_f @ tangents[:, j]) - 0.5 * d_logdet
        self.num_gradients += 1
        return out, tangents


def _gradient_difference_hessian(value_and_grad, theta, step):
    """The Hessian of ``log p(theta | y)`` by central differences of its exact
    gradient (``value_and_grad`` returns the negative value and gradient): ``2 d``
    values and gradients, where differences of the values alone took ``2 d^2``
    values (30 against 10 for the elasticity model's five hyperparameters), error
    ``O(step^2)`` either way. Symmetrised."""
    d = theta.size
    hess = np.zeros((d, d))
    for i in range(d):
        e = np.zeros(d)
        e[i] = step
        plus, minus = value_and_grad(theta + e)[1], value_and_grad(theta - e)[1]
        hess[:, i] = -(plus - minus) / (2 * step)
    return 0.5 * (hess + hess.T)


def _grid_design(evaluate, dim, dz, diff_logdens, max_points):
    """Grid points in z (step dz) whose log density is within diff_logdens of the
    centre: the extent of each axis first, then the points of the box inside the
    ellipsoid the axes span."""
    centre = evaluate(np.zeros(dim))
    reach = []
    for i in range(dim):
        ext = []
        for sign in (1, -1):
            m = 0
            while m < 50:
                z = np.zeros(dim)
                z[i] = sign * (m + 1) * dz
                if centre - evaluate(z) > diff_logdens:
                    break
                m += 1
            ext.append(m)
        reach.append(ext)
    axes = [np.arange(-lo, hi + 1) * dz for hi, lo in reach]
    points, values = [], []
    for z in product(*axes):
        z = np.asarray(z, np.float64)
        # inside the box's ellipsoid (per quadrant), as the Gaussian would be
        r = sum(
            (zi / (reach[i][0 if zi > 0 else 1] * dz + dz)) ** 2
            for i, zi in enumerate(z)
            if zi != 0
        )
        if r > 1.0 + 1e-9:
            continue
        v = evaluate(z)
        if centre - v <= diff_logdens:
            points.append(z)
            values.append(v)
        if len(points) > max_points:
            raise ConfigurationError(
                f"the grid design has more than {max_points} points; use "
                "design='ccd' or a larger dz."
            )
    return np.array(points), np.ones(len(points))


def _numpy_generator(key) -> np.random.Generator:
    """A NumPy generator seeded by the bits of a derived JAX key: the driver's
    draws (the globals' normals, the order) stay a function of the seed and the
    stream, without compiling JAX's random-number kernels for them."""
    return np.random.default_rng(np.asarray(key, np.uint32).tolist())


def _allocate(weights, num_samples):
    """Largest-remainder counts of draws per design point (sum ``num_samples``)."""
    raw = weights * num_samples
    counts = np.floor(raw).astype(np.int64)
    rest = num_samples - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


# ----------------------------------------------------------------- the driver
def integrate_hyperparameters(
    objective: ShardedObjective,
    hyperparameters: Sequence[str],
    *,
    init: np.ndarray | None = None,
    design: str = "auto",
    num_samples: int = 1000,
    seed: int = 0,
    max_steps: int = 50,
    gtol: float = 5e-3,
    step: float = 5e-3,
    f0: float = 1.1,
    dz: float = 0.75,
    diff_logdens: float = 6.0,
    batch_size: int = 16,
    newton_gtol: float = 1e-7,
    progress_bar: bool = False,
) -> NestedLaplaceResult:
    """Nested Laplace on the workers of ``objective`` (see the module docstring).

    Args:
        objective: the sharded objective of the model.
        hyperparameters: global site names of ``theta``.
        init: ``(objective.size,)`` unconstrained starting point (zeros by default).
        design: ``"grid"``, ``"ccd"``, ``"mode"`` (``theta*`` only, an empirical
            Bayes plug-in) or ``"auto"`` (grid for d <= 2, else ccd).
        num_samples: draws from the mixture.
        seed: integer seed (a NumPy generator seeded by the bits of
            ``derive_key(seed, "theta", k, j)`` for the globals of block ``j`` of
            draws of design point ``k``,
            ``fold_in(derive_key(seed, "locals", k, j), i)`` for entity ``i``: the
            same draws for any number of shards).
        max_steps: BFGS iterations over ``theta``.
        gtol: BFGS stops when the largest component of the gradient of
            ``log p(theta | y)`` (unconstrained ``theta``) is below this.
        step: finite-difference step in unconstrained ``theta`` (the Hessian of
            ``log p(theta | y)`` at the mode uses ``4 * step``).
        f0: the central composite design's radius factor.
        dz: the grid's step in standardised coordinates.
        diff_logdens: the grid keeps the points whose log density is within this
            of the mode's.
        batch_size: Hessian-vector products evaluated together per worker.
        newton_gtol: gradient tolerance of the conditional modes.
        progress_bar: a line per evaluation to stderr.

    Returns:
        :class:`NestedLaplaceResult`.

    Raises:
        ConfigurationError: a bad argument, or a conditional mode not found.
        ShardError: a shard worker failed (names the shard).
    """
    # the driver's dense algebra (eigh and Cholesky of the Schur complement, a few
    # hundred rows) on one BLAS thread: with the workers' XLA threads in the same
    # process, OpenBLAS's threads wait on each other and each call was 20-150x
    # slower than alone
    with threadpool_limits(1, user_api="blas"):
        return _integrate_hyperparameters(
            objective,
            hyperparameters,
            init=init,
            design=design,
            num_samples=num_samples,
            seed=seed,
            max_steps=max_steps,
            gtol=gtol,
            step=step,
            f0=f0,
            dz=dz,
            diff_logdens=diff_logdens,
            batch_size=batch_size,
            newton_gtol=newton_gtol,
            progress_bar=progress_bar,
        )


def _integrate_hyperparameters(
    objective,
    hyperparameters,
    *,
    init,
    design,
    num_samples,
    seed,
    max_steps,
    gtol,
    step,
    f0,
    dz,
    diff_logdens,
    batch_size,
    newton_gtol,
    progress_bar,
):
    start = time.perf_counter()
    timings = {}
    emit = progress_lines(progress_bar, "raybayes.optim")
    offsets = np.cumsum([0] + [int(np.prod(s)) for _, s in objective.global_sites])
    names = [n for n, _ in objective.global_sites]
    index = np.concatenate(
        [
            np.arange(offsets[names.index(h)], offsets[names.index(h) + 1])
            for h in names
            if h in set(hyperparameters)
        ]
        or [np.zeros(0, np.int64)]
    ).astype(np.int64)
    dim = index.size
    x0 = np.zeros(objective.size) if init is None else np.asarray(init, np.float64)
    cond = _ConditionalLaplace(objective, index, x0, batch_size, newton_gtol, 50, emit)

    def rescue():
        # Newton's local steps are undamped: far from the mode (a Poisson rate
        # started at exp(0)) they overshoot; L-BFGS on the joint log density
        # brings the latent field near its data first
        from raybayes.optim.map import find_map

        found = find_map(
            objective,
            init=x0,
            tol=1e-10,
            gtol=1e-4,
            max_steps=500,
            progress_bar=False,
            assemble=False,
        )
        return found.x

    cond.rescue = rescue

    # 1. the mode of log p(theta | y): BFGS with its gradient (implicit
    # function theorem at the conditional mode, _ConditionalLaplace.gradient);
    # each conditional mode starts from the nearest one found so far, moved along
    # its tangent dx*/dtheta (a first-order predictor)
    known: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    evaluated: dict[tuple, tuple] = {}  # theta -> (log p~(theta | y), mode)

    def predicted(theta):
        if not known:
            return None
        t, x, tangents = min(known, key=lambda k: float(np.sum((k[0] - theta) ** 2)))
        return x + tangents @ (theta - t)

    def negative(theta):
        value, result = cond(theta, start=predicted(theta))
        return -value if np.isfinite(value) else 1e300

    def value_and_grad(theta):
        theta = np.asarray(theta, np.float64)
        value, result = cond(theta, start=predicted(theta))
        if not np.isfinite(value):
            return 1e300, np.zeros_like(theta)
        cond.x = result.x
        grad, tangents = cond.gradient(theta)
        known.append((theta.copy(), result.x, tangents))
        evaluated[tuple(theta)] = (value, result)
        return -value, -grad

    theta0 = x0[index]
    if dim:
        first = value_and_grad(theta0)
        cache = {tuple(theta0): first}

        def cached_value_and_grad(theta):
            return cache.pop(tuple(theta), None) or value_and_grad(theta)

        # the initial inverse Hessian: the diagonal curvature of central
        # differences at theta0 (2 d values, warm-started: the hyperparameters
        # are badly scaled, and from the identity BFGS took 3x the iterations)
        curvature = np.ones(dim)
        for i in range(dim):
            e = np.zeros(dim)
            e[i] = step
            plus, minus = negative(theta0 + e), negative(theta0 - e)
            curvature[i] = (plus + minus - 2.0 * first[0]) / step**2
        inverse = np.where(curvature > 1e-8, 1.0 / np.abs(curvature), 1.0)
        opt = optimize.minimize(
            cached_value_and_grad,
            theta0,
            jac=True,
            method="BFGS",
            options={
                "maxiter": max_steps,
                "gtol": gtol,
                "hess_inv0": np.diag(inverse),
            },
        )
        theta_star = opt.x
    else:
        theta_star = theta0
    if dim and tuple(theta_star) not in evaluated:
        value_and_grad(theta_star)  # the centre's tangents, for the predictor
    centre_value, centre = evaluated.get(tuple(theta_star)) or cond(theta_star)
    cond.x = centre.x
    timings["mode_s"] = time.perf_counter() - start

    # 2. the Hessian at the mode, the standardised coordinates
    if dim:
        hess = _gradient_difference_hessian(value_and_grad, theta_star, step * 4)
        eig, vec = linalg.eigh(-hess)
        if eig[0] <= 0:
            raise ConfigurationError(
                f"log p(theta | y) is not concave at its mode (smallest curvature "
                f"{eig[0]:.3e}); the hyperparameters {list(hyperparameters)} are "
                "not identified by the data and their priors. Pass fewer "
                "hyperparameters, or design='mode'."
            )
        scale = vec / np.sqrt(eig)  # theta = theta* + scale @ z
    else:
        eig, scale = np.ones(0), np.zeros((0, 0))
    covariance = scale @ scale.T
    timings["hessian_s"] = time.perf_counter() - start - timings["mode_s"]

    # 3. the design
    kind = design if design != "auto" else ("grid" if dim <= 2 else "ccd")
    if dim == 0:
        kind = "mode"
    values: dict[tuple, tuple] = {}

    def evaluate(z):
        key = tuple(np.round(z, 12))
        if key not in values:
            theta = theta_star + scale @ z
            v, r = cond(theta, start=predicted(theta))
            values[key] = (v, r.x)
        return values[key][0]

    if kind == "mode":
        zs, base_w = np.zeros((1, dim)), np.ones(1)
        log_norm = 0.0
    elif kind == "ccd":
        zs, base_w = central_composite_design(dim, f0)
        log_norm = 0.5 * dim * np.log(2 * np.pi) + np.log((f0**2 - 1) / f0**2)
    else:
        zs, base_w = _grid_design(evaluate, dim, dz, diff_logdens, 10_000)
        log_norm = dim * np.log(dz)
    values[tuple(np.zeros(dim))] = (centre_value, centre.x)
    log_density = np.array([evaluate(z) for z in zs])
    modes = [values[tuple(np.round(z, 12))][1] for z in zs]
    log_w = np.log(base_w) + log_density - centre_value
    log_w[~np.isfinite(log_w)] = -np.inf
    total = np.logaddexp.reduce(log_w)
    weights = np.exp(log_w - total)
    log_det_scale = -0.5 * float(np.sum(np.log(eig))) if dim else 0.0
    if kind == "mode":
        log_ml = centre_value + 0.5 * dim * np.log(2 * np.pi) + log_det_scale
    else:
        log_ml = centre_value + total + log_norm + log_det_scale
    design_points = theta_star[None, :] + zs @ scale.T
    timings["design_s"] = (
        time.perf_counter() - start - timings["mode_s"] - timings["hessian_s"]
    )

    # 4. draws from the mixture
    counts = _allocate(weights, num_samples)
    G = objective.num_global
    free = np.setdiff1d(np.arange(G), index)
    global_draws = []
    local_draws = [[] for _ in range(objective.num_shards)]
    # fixed blocks of draws (one shape to compile), each keyed by (point, block)
    block = min(256, 1 << max(num_samples - 1, 0).bit_length())
    for k in np.flatnonzero(counts):
        x_k = modes[k]
        schur, _, _ = cond.factor(x_k)
        chol_k = linalg.cholesky(schur, lower=True) if free.size else np.eye(0)
        g_k, locals_k = objective.split(x_k)
        n_k = int(counts[k])
        for j in range(-(-n_k // block)):
            n = min(block, n_k - j * block)
            z = _numpy_generator(derive_key(seed, "theta", int(k), j)).standard_normal(
                (block, free.size)
            )
            # dg = L^{-T} z ~ N(0, S^{-1}) (arrowhead.laplace_global_draws without
            # the covariance, a G^3 solve per point)
            delta_free = (
                linalg.solve_triangular(chol_k.T, z.T, lower=False).T
                if free.size
                else z
            )
            delta = np.zeros((block, G))
            delta[:, free] = delta_free
            key = derive_key(seed, "locals", int(k), j)
            parts = objective.gather(
                "laplace_draw_locals",
                lambda s: (locals_k[s], delta, key),  # noqa: B023
            )
            global_draws.append(g_k[None, :] + delta[:n])
            for s in range(objective.num_shards):
                local_draws[s].append(np.asarray(parts[s])[:n])
    order = _numpy_generator(derive_key(seed, "order")).permutation(num_samples)
    globals_ = np.concatenate(global_draws)[order]
    locals_ = [np.concatenate(parts)[order] for parts in local_draws]
    # the centre's values in the same call (one shape to compile, not two)
    centre_g, centre_l = objective.split(centre.x)
    site_values, axes = constrained_values(
        objective,
        np.concatenate([globals_, centre_g[None]]),
        [np.concatenate([a, b[None]]) for a, b in zip(locals_, centre_l, strict=True)],
    )
    centre.params = {k: v[-1] for k, v in site_values.items()}
    site_values = {k: v[:-1] for k, v in site_values.items()}
    plate = objective.partition.plate if objective.partition is not None else None
    idata = draws_to_inference_data(
        site_values,
        axes,
        plate,
        attrs={
            "inference": "nested_laplace",
            "log_marginal_likelihood": float(log_ml),
            "hyperparameters": ",".join(hyperparameters),
            "design": kind,
            "num_design_points": int(len(zs)),
        },
    )
    timings["draws_s"] = time.perf_counter() - start - sum(timings.values())
    return NestedLaplaceResult(
        idata=idata,
        log_marginal_likelihood=float(log_ml),
        hyperparameters=list(hyperparameters),
        mode=theta_star,
        covariance=covariance,
        design=design_points,
        log_density=log_density,
        weights=weights,
        num_draws_per_point=counts,
        map=centre,
        num_evaluations=cond.num_evaluations,
        num_gradients=cond.num_gradients,
        time_s=time.perf_counter() - start,
        timings=timings,
    )


def nested_laplace(
    model: Callable,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    hyperparameters: Sequence[str] | str = "auto",
    design: str = "auto",
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
    max_steps: int = 50,
    progress_bar: bool = True,
    x64: bool = True,
    **deprecated: Any,
) -> NestedLaplaceResult:
    """Integrated nested Laplace approximation (INLA) of a latent Gaussian model.

    The hyperparameters ``theta`` are integrated over a design around the mode of the
    Laplace approximation of ``p(theta | y)``; given each ``theta``, the latent field
    is the Gaussian of the Laplace approximation at the conditional mode, computed on
    the arrowhead system over the shard workers (locals on their shard, the globals'
    Schur complement on the driver: the cost is linear in the number of entities).
    See :mod:`raybayes.optim.nested_laplace` and docs/nested_laplace.md.

    Args:
        model: a NumPyro model whose latent sites are a Gaussian field given a few
            hyperparameters (any likelihood).
        *model_args: its positional arguments (not split).
        model_kwargs: its keyword arguments (NumPy arrays and scalars).
        hyperparameters: global latent site names of ``theta``, or ``"auto"``: the
            scale/concentration sites the Gaussian latent sites or the likelihood
            depend on (:func:`find_hyperparameters`).
        design: ``"auto"`` (a grid for one or two hyperparameters, else a central
            composite design, as R-INLA), ``"grid"``, ``"ccd"``, or ``"mode"``
            (``theta`` fixed at its mode: an empirical Bayes plug-in).
        num_shards: S (one worker per shard); default ``num_workers``, else 1.
        partition: the split; chosen by :func:`raybayes.plan` when ``None``.
        source: a :class:`~raybayes.datasets.parquet.ParquetShards` (then
            ``partition`` and the ``hyperparameters`` names are required).
        backend: ``"auto"``, ``"local"``, ``"ray"`` or a backend instance.
        num_workers: Ray workers, one per shard
            (:class:`~raybayes.config.ScalingConfig`).
        use_gpu: one GPU per worker (Ray).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        address: a Ray cluster address (``"HOST:PORT"``).
        num_samples: draws from the mixture.
        seed: integer seed; the same draws for any number of shards.
        max_steps: BFGS iterations over ``theta`` (gradients by the implicit
            function theorem).
        progress_bar: a line per evaluation of ``log p(theta | y)``.
        x64: workers compute in float64 (default).

    Returns:
        :class:`NestedLaplaceResult`; ``idata.posterior`` holds one chain of
        ``num_samples`` constrained draws, ``idata.attrs["log_marginal_likelihood"]``
        the estimate of ``log p(y)``.

    Raises:
        ConfigurationError: no latent Gaussian site, no hyperparameter, a name that
            is not a global latent site, an unknown ``design``, a bad
            ``num_samples``, or ``log p(theta | y)`` not concave at its mode.
        DataValidationError: NaN or inf in observed data.
        ShardError: the model raised on a shard worker (names the shard).

    References:
        Rue, H., Martino, S. & Chopin, N. (2009). Approximate Bayesian inference
        for latent Gaussian models by using integrated nested Laplace
        approximations. JRSS B 71(2), 319-392.
        Gaedke-Merzhäuser, L., Krainski, E., Janalik, R., Rue, H. & Schenk, O.
        (2024). Integrated nested Laplace approximations for large-scale
        spatiotemporal Bayesian modeling. SIAM J. Sci. Comput.

    Examples:
        >>> import numpy as np, numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        ...     with numpyro.plate("groups", y.shape[0]):
        ...         theta = numpyro.sample("theta", dist.Normal(0.0, tau))
        ...         numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)
        >>> r = nested_laplace(model, model_kwargs={"y": np.array([1.0, -1.0, 2.0])},
        ...                    backend="local", num_samples=20, progress_bar=False)
        >>> r.hyperparameters, r.idata.posterior["theta"].shape
        (['tau'], (1, 20, 3))
    """
    model_args, model_kwargs = split_model_arguments(
        model_args, model_kwargs, deprecated
    )
    reject_unknown_arguments(deprecated, "nested_laplace")
    if design not in _DESIGNS:
        raise ConfigurationError(f"design={design!r}; use one of {_DESIGNS}.")
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, (int, np.integer))
        or num_samples < 1
    ):
        raise ConfigurationError(f"num_samples={num_samples!r}; use an integer >= 1.")
    derive_key(seed)  # checks the seed before any work
    latent_names = None
    if isinstance(hyperparameters, str):
        if hyperparameters != "auto":
            raise ConfigurationError(
                f"hyperparameters={hyperparameters!r}; pass a list of site names "
                "or 'auto'."
            )
        if source is not None:
            raise ConfigurationError(
                "hyperparameters='auto' needs the data on the driver; with source= "
                "pass hyperparameters=[site names]."
            )
        hyperparameters = find_hyperparameters(
            model, *model_args, model_kwargs=model_kwargs
        )
    else:
        hyperparameters = list(hyperparameters)
        if not all(isinstance(h, str) for h in hyperparameters):
            raise ConfigurationError(
                f"hyperparameters={hyperparameters!r}; pass site names (strings)."
            )
        if source is None:
            _require_gaussian(model, model_args, model_kwargs, hyperparameters)
    if source is None:
        latent_names = _latent_names(model, model_args, model_kwargs)
    scaling, backend = resolve_scaling(
        backend, num_workers, use_gpu, resources_per_worker, address
    )
    num_shards = shard_count(num_shards, scaling)
    with planned_objective(
        model,
        model_kwargs,
        num_shards,
        partition=partition,
        backend=backend,
        source=source,
        model_args=model_args,
        x64=x64,
        scaling=scaling,
    ) as objective:
        _check_hyperparameters(
            hyperparameters, latent_names or [], objective.global_sites
        )
        return integrate_hyperparameters(
            objective,
            hyperparameters,
            design=design,
            num_samples=int(num_samples),
            seed=seed,
            max_steps=max_steps,
            progress_bar=progress_bar,
        )


def _trace(model, model_args, model_kwargs):
    """The model's trace, traced abstractly (``jax.make_jaxpr``: no compilation);
    only the sites' types, distributions and supports are read from it."""
    import numpyro

    sites: dict = {}

    def run():
        with numpyro.handlers.block():
            tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(
                *model_args, **dict(model_kwargs or {})
            )
        sites.update(tr)
        return 0

    jax.make_jaxpr(run)()
    return sites


def _latent_names(model, model_args, model_kwargs):
    tr = _trace(model, model_args, model_kwargs)
    return [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]


def _require_gaussian(model, model_args, model_kwargs, hyperparameters):
    tr = _trace(model, model_args, model_kwargs)
    latent = [
        n
        for n, s in tr.items()
        if s["type"] == "sample" and not s["is_observed"] and n not in hyperparameters
    ]
    if not any(
        type(_base_distribution(tr[n]["fn"])).__name__ in _GAUSSIAN for n in latent
    ):
        raise ConfigurationError(
            f"the model has no Gaussian latent site besides the hyperparameters "
            f"{list(hyperparameters)} (latent sites: {latent or 'none'}); nested "
            "Laplace needs a latent Gaussian field given the hyperparameters, e.g. "
            "effects sampled from dist.Normal(loc, scale). For other models use "
            "laplace_approximation, fit_svi or sample."
        )
