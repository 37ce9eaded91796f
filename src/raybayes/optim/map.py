"""Distributed MAP: L-BFGS on the exact full-batch gradient summed over shard workers.

The optimiser is SciPy's L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995), whose line search
(Moré & Thuente 1994) enforces the strong Wolfe conditions. It runs on the driver,
in the unconstrained space, on a vector of the global parameters followed by every
shard's local parameters; each evaluation of the objective is one parallel pass of
the shard workers (:class:`~raybayes.distributed.ShardedObjective`).

Convergence follows Spark MLlib (Breeze's LBFGS): stop when the relative decrease
of the loss ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)`` falls below ``tol``, the
largest gradient component below ``gtol``, or after ``max_steps`` iterations. A
line search that fails (non-finite values, or no point meeting the Wolfe
conditions) ends the run and is reported in :class:`MAPResult`; it does not raise.

Scaling note: the driver holds the full vector, local parameters included, and
L-BFGS keeps ``2 * history_size`` vectors of that length (see docs/map_laplace.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import optimize

from raybayes.backends import Backend
from raybayes.config import (
    reject_unknown_arguments,
    renamed_argument,
    resolve_scaling,
    split_model_arguments,
)
from raybayes.core.partition import Partition
from raybayes.distributed.objective import (
    ShardedObjective,
    planned_objective,
    shard_count,
)
from raybayes.errors import ConfigurationError
from raybayes.optim.newton import NewtonObjective, find_map_newton
from raybayes.optim.newton_cg import find_map_newton_cg
from raybayes.optim.result import MAPResult, map_result_fields
from raybayes.optim.vlbfgs import VectorFreeObjective, find_map_vector_free
from raybayes.progress import progress_lines

__all__ = ["MAP_METHODS", "MAPResult", "find_map", "fit_map"]

#: The values of ``method`` of :func:`fit_map` and
#: :func:`~raybayes.optim.laplace_approximation`.
MAP_METHODS = ("lbfgs", "newton", "newton-cg")


def find_map(
    objective: ShardedObjective,
    *,
    init: np.ndarray | None = None,
    tol: float = 1e-6,
    gtol: float = 1e-5,
    max_steps: int = 100,
    history_size: int = 10,
    max_restarts: int = 5,
    progress_bar: bool = True,
    assemble: bool = True,
    **deprecated,
) -> MAPResult:
    """Maximise the log joint with L-BFGS over the shard workers of ``objective``.

    Args:
        objective: the sharded objective (it holds the data on its workers).
        init: ``(objective.size,)`` starting point (unconstrained); zeros by
            default, i.e. the "median" of every unconstrained site.
        tol: relative decrease of the loss at which to stop (Spark MLlib ``tol``).
        gtol: largest gradient component at which to stop.
        max_steps: maximum L-BFGS iterations (Spark MLlib ``maxIter``; the old
            name ``max_iter=`` is deprecated).
        history_size: L-BFGS memory (pairs of vectors kept).
        max_restarts: restarts of L-BFGS (fresh memory, from the best point seen)
            after a failed line search that followed progress.
        progress_bar: print a line per iteration to stderr (always logged at INFO
            on the ``raybayes.optim`` logger; the old name ``progress=`` is
            deprecated).
        assemble: also compute constrained values of every site at the MAP.

    Returns:
        :class:`MAPResult`.

    Raises:
        ConfigurationError: ``tol``, ``max_steps`` or ``init`` out of range, or an
            unknown keyword argument.

    References:
        Byrd, R. H., Lu, P., Nocedal, J. & Zhu, C. (1995). A limited memory algorithm
        for bound constrained optimization. SIAM J. Sci. Comput. 16(5), 1190-1208.
        Moré, J. J. & Thuente, D. J. (1994). Line search algorithms with guaranteed
        sufficient decrease. ACM Trans. Math. Softw. 20(3), 286-307.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with ShardedObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     r = find_map(f, progress_bar=False)
        >>> round(float(r.params["mu"]), 4)  # posterior mode 4/5
        0.8
    """
    max_steps = renamed_argument(deprecated, "max_iter", "max_steps", max_steps,
                                 default=100)
    progress_bar = renamed_argument(deprecated, "progress", "progress_bar",
                                    progress_bar, default=True)
    reject_unknown_arguments(deprecated, "find_map")
    if not tol > 0:
        raise ConfigurationError(f"tol={tol}; use a positive number such as 1e-6.")
    if int(max_steps) < 1:
        raise ConfigurationError(f"max_steps={max_steps}; use an integer >= 1.")
    max_iter = int(max_steps)
    x0 = np.zeros(objective.size) if init is None else np.asarray(init, np.float64)
    if x0.shape != (objective.size,):
        raise ConfigurationError(
            f"init has shape {x0.shape}; the objective needs ({objective.size},)."
        )
    emit = progress_lines(progress_bar, "raybayes.optim")
    state = {"non_finite": False, "last": None, "best": (np.inf, x0)}
    history = []
    start = time.perf_counter()
    evals_before = objective.num_evaluations

    def fun(x):
        value, grad = objective.value_and_grad(x)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            state["non_finite"] = True
            return np.inf, np.zeros_like(grad)
        state["last"] = (value, grad)
        if value < state["best"][0]:
            state["best"] = (value, np.array(x, np.float64))
        return value, grad

    def callback(intermediate_result):
        value = float(intermediate_result.fun)
        history.append(value)
        grad = state["last"][1] if state["last"] is not None else np.zeros(1)
        emit(
            f"L-BFGS iter {len(history):4d}  loss {value:.8e}  "
            f"|grad|max {np.max(np.abs(grad)):.3e}  "
            f"evals {objective.num_evaluations - evals_before:4d}  "
            f"{time.perf_counter() - start:7.2f} s"
        )

    x_start, num_restarts = x0, 0
    while True:
        state["non_finite"] = False
        res = optimize.minimize(
            fun,
            x_start,
            jac=True,
            method="L-BFGS-B",
            callback=callback,
            options=dict(
                maxiter=max(int(max_iter) - len(history), 1),
                ftol=tol,
                gtol=gtol,
                maxcor=int(history_size),
            ),
        )
        message = str(res.message)
        if res.success:
            status = "converged"
        elif len(history) >= int(max_iter) or "ITERATIONS" in message.upper():
            status = "max_steps"
        else:
            status = "non_finite" if state["non_finite"] else "line_search_failed"
        best_value, best_x = state["best"]
        x = best_x if best_value <= float(res.fun) else np.asarray(res.x, np.float64)
        value, grad = objective.value_and_grad(x)
        grad_norm = float(np.max(np.abs(grad))) if grad.size else 0.0
        if status == "converged" and state["non_finite"] and grad_norm > 1e3 * gtol:
            # SciPy reads a line search stuck at a non-finite wall as "converged".
            status = "non_finite"
            message += "; the log density was not finite along the search direction"
        # A failed line search after progress: restart L-BFGS (fresh memory) from
        # the best point seen, as Breeze/Spark do; stop when a restart gains nothing.
        gained = bool(np.any(x != x_start))
        if (
            status in ("non_finite", "line_search_failed")
            and gained
            and num_restarts < max_restarts
            and len(history) < int(max_iter)
        ):
            num_restarts += 1
            emit(f"L-BFGS restart {num_restarts} after {status} ({message})")
            x_start = x
            continue
        break
    if status != "converged":
        emit(f"L-BFGS stopped: {status} ({message})")
    return MAPResult(**map_result_fields(
        objective, x, value, history, evals_before, status, message, grad_norm,
        time.perf_counter() - start, num_restarts, assemble,
    ))


def fit_map(
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
    vector_free: bool = False,
    method: str = "lbfgs",
    x64: bool = True,
    **kwargs: Any,
) -> MAPResult:
    """The MAP of a model on its data, split into shards by :func:`raybayes.plan`.

    Builds the shard workers (:func:`raybayes.distributed.planned_objective`), runs
    :func:`find_map` (or :func:`~raybayes.optim.find_map_vector_free`) on them, and
    releases them.

    Args:
        model: a NumPyro model with continuous latent variables (discrete ones
            marked ``infer={"enumerate": "parallel"}`` are summed out).
        *model_args: its positional arguments (not split).
        model_kwargs: its keyword arguments (NumPy arrays and scalars); put into the
            object store once. Passing them as the second positional argument is
            deprecated.
        num_shards: S, shards and workers (one worker per shard); default
            ``num_workers``, else 1.
        partition: the split; chosen by :func:`raybayes.plan` when ``None``.
        source: a :class:`~raybayes.datasets.parquet.ParquetShards` read on the
            workers (then ``partition`` is needed).
        backend: ``"auto"`` (default: in-process unless the job has several shards
            and this machine several CPUs, or the scaling settings ask for a
            cluster; see :func:`raybayes.config.resolve_backend_name`), ``"local"``,
            ``"ray"`` or a backend instance.
        num_workers: Ray workers; the shard algorithms run one worker per shard, so
            this sets ``num_shards`` when that is not given, and must equal it
            otherwise.
        use_gpu: one GPU per worker (Ray).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        address: a Ray cluster address (``"HOST:PORT"``).
        vector_free: run vector-free L-BFGS
            (:func:`~raybayes.optim.find_map_vector_free`): the local parameters and
            their optimizer state stay on the workers.
        method: ``"lbfgs"`` (default: :func:`find_map`, or
            :func:`~raybayes.optim.find_map_vector_free` with ``vector_free``) or
            ``"newton"``: an L-BFGS warm-up, then trust-region Newton steps on the
            arrowhead Hessian (:func:`~raybayes.optim.find_map_newton`; always
            vector-free). Newton reaches a tight optimum of a hierarchical model
            in a few Hessians where L-BFGS crawls along the ridges of its scales.
            ``"newton-cg"``: an L-BFGS warm-up, then trust-region Newton-CG
            steps on Hessian-vector products, preconditioned by a kept arrowhead
            Hessian (:func:`~raybayes.optim.find_map_newton_cg`; vector-free): the
            same optimum with one full Hessian or a few, instead of one per step.
        x64: workers compute in float64 (default).
        **kwargs: passed to :func:`find_map` (``tol``, ``gtol``, ``max_steps``,
            ``history_size``, ``progress_bar``, ...), or to
            :func:`~raybayes.optim.find_map_newton` or
            :func:`~raybayes.optim.find_map_newton_cg` (``gtol``, ``max_steps``,
            ``warmup_steps``, ``tol``, ``progress_bar``, ...).

    Returns:
        :class:`MAPResult`.

    Raises:
        ConfigurationError: an unknown ``method``, bad settings (see :func:`find_map`,
            :func:`raybayes.plan` and :class:`~raybayes.config.ScalingConfig`), or
            ``num_workers`` different from ``num_shards``.
        ShardError: the model raised on a shard worker (names the shard).

    References:
        Byrd, R. H., Lu, P., Nocedal, J. & Zhu, C. (1995). A limited memory algorithm
        for bound constrained optimization. SIAM J. Sci. Comput. 16(5), 1190-1208.
        Chen, W., Wang, Z. & Zhou, J. (2014). Large-scale L-BFGS using MapReduce.
        NeurIPS 27 (``vector_free=True``).

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> r = fit_map(model, model_kwargs={"y": np.ones(4)}, num_shards=2,
        ...             backend="local", progress_bar=False)
        >>> round(float(r.params["mu"]), 4)  # posterior mode 4/5
        0.8
    """
    model_args, model_kwargs = split_model_arguments(model_args, model_kwargs, kwargs)
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
    objective_class, run = ShardedObjective, find_map
    if method == "newton":
        objective_class, run = NewtonObjective, find_map_newton
    elif method == "newton-cg":
        objective_class, run = NewtonObjective, find_map_newton_cg
    elif vector_free:
        objective_class, run = VectorFreeObjective, find_map_vector_free
    with planned_objective(
        model, model_kwargs, num_shards, partition=partition, backend=backend,
        source=source, model_args=model_args, objective_class=objective_class,
        x64=x64, scaling=scaling,
    ) as objective:
        return run(objective, **kwargs)
