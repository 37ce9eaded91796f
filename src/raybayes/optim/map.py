"""Distributed MAP: L-BFGS on the exact full-batch gradient summed over shard workers.

The optimiser is SciPy's L-BFGS-B (Byrd, Lu, Nocedal & Zhu 1995), whose line search
(Moré & Thuente 1994) enforces the strong Wolfe conditions. It runs on the driver,
in the unconstrained space, on a vector of the global parameters followed by every
shard's local parameters; each evaluation of the objective is one parallel pass of
the shard workers (:class:`~raybayes.distributed.ShardedObjective`).

Convergence follows Spark MLlib (Breeze's LBFGS): stop when the relative decrease
of the loss ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)`` falls below ``tol``, the
largest gradient component below ``gtol``, or after ``max_iter`` iterations. A
line search that fails (non-finite values, or no point meeting the Wolfe
conditions) ends the run and is reported in :class:`MAPResult`; it does not raise.

Scaling note: the driver holds the full vector, local parameters included, and
L-BFGS keeps ``2 * history_size`` vectors of that length (see docs/map_laplace.md).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize

from raybayes.backends import Backend
from raybayes.core.partition import Partition
from raybayes.distributed.sharded import ShardedObjective
from raybayes.errors import ConfigurationError

__all__ = ["MAPResult", "find_map"]

logger = logging.getLogger("raybayes.optim")


@dataclass
class MAPResult:
    """The maximum a posteriori point and how the optimiser got there.

    Attributes:
        params: site -> constrained value at the MAP (latent and deterministic
            sites, local sites assembled over shards in plate order).
        x: ``(size,)`` float64, the optimum in the unconstrained driver layout.
        loss: negative log joint at ``x`` (unconstrained space, Jacobians included).
        num_iterations: L-BFGS iterations.
        num_evaluations: objective evaluations (parallel passes over the shards).
        converged: ``tol``/``gtol`` met.
        status: ``"converged"``, ``"max_iter"``, ``"line_search_failed"`` or
            ``"non_finite"``.
        message: SciPy's message.
        grad_norm: max absolute gradient component at ``x``.
        history: loss after each iteration.
        time_s: wall time of the optimisation.
        num_restarts: L-BFGS restarts after failed line searches.
    """

    params: dict
    x: np.ndarray
    loss: float
    num_iterations: int
    num_evaluations: int
    converged: bool
    status: str
    message: str
    grad_norm: float
    history: list = field(default_factory=list)
    time_s: float = 0.0
    num_restarts: int = 0


def _progress(enabled):
    if not enabled:
        return lambda line: logger.info(line)

    def emit(line):
        logger.info(line)
        print(line, file=sys.stderr, flush=True)

    return emit


def find_map(
    objective: ShardedObjective,
    *,
    init: np.ndarray | None = None,
    tol: float = 1e-6,
    gtol: float = 1e-5,
    max_iter: int = 100,
    history_size: int = 10,
    max_restarts: int = 5,
    progress: bool = True,
    assemble: bool = True,
) -> MAPResult:
    """Maximise the log joint with L-BFGS over the shard workers of ``objective``.

    Args:
        objective: the sharded objective (it holds the data on its workers).
        init: ``(objective.size,)`` starting point (unconstrained); zeros by
            default, i.e. the "median" of every unconstrained site.
        tol: relative decrease of the loss at which to stop (Spark MLlib ``tol``).
        gtol: largest gradient component at which to stop.
        max_iter: maximum iterations (Spark MLlib ``maxIter``).
        history_size: L-BFGS memory (pairs of vectors kept).
        max_restarts: restarts of L-BFGS (fresh memory, from the best point seen)
            after a failed line search that followed progress.
        progress: print a line per iteration to stderr (always logged at INFO on
            the ``raybayes.optim`` logger).
        assemble: also compute constrained values of every site at the MAP.

    Returns:
        :class:`MAPResult`.

    Raises:
        ConfigurationError: ``tol``, ``max_iter`` or ``init`` out of range.

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
        ...     r = find_map(f, progress=False)
        >>> round(float(r.params["mu"]), 4)  # posterior mode 4/5
        0.8
    """
    if not tol > 0:
        raise ConfigurationError(f"tol={tol}; use a positive number such as 1e-6.")
    if int(max_iter) < 1:
        raise ConfigurationError(f"max_iter={max_iter}; use an integer >= 1.")
    x0 = np.zeros(objective.size) if init is None else np.asarray(init, np.float64)
    if x0.shape != (objective.size,):
        raise ConfigurationError(
            f"init has shape {x0.shape}; the objective needs ({objective.size},)."
        )
    emit = _progress(progress)
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
            status = "max_iter"
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
    return MAPResult(**_result_fields(
        objective, x, value, history, evals_before, status, message, grad_norm,
        time.perf_counter() - start, num_restarts, assemble,
    ))


def _result_fields(objective, x, value, history, evals_before, status, message,
                   grad_norm, elapsed, num_restarts, assemble):
    """The fields of :class:`MAPResult` at the end of a run (shared with VL-BFGS)."""
    params = constrained_values(objective, x[None])[0] if assemble else {}
    return dict(
        params={k: v[0] for k, v in params.items()},
        x=x,
        loss=float(value),
        num_iterations=len(history),
        num_evaluations=objective.num_evaluations - evals_before,
        converged=status == "converged",
        status=status,
        message=message,
        grad_norm=grad_norm,
        history=history,
        time_s=elapsed,
        num_restarts=num_restarts,
    )


def constrained_values(objective: ShardedObjective, xs: np.ndarray, locals_draws=None):
    """Constrained site values for draws of the driver vector.

    Args:
        objective: the sharded objective.
        xs: ``(D, size)`` unconstrained draws in the driver layout (or ``(D, G)``
            globals when ``locals_draws`` is given).
        locals_draws: per shard ``(D, P_s, k)`` draws of the locals, optional.

    Returns:
        ``(values, axes)``: site -> ``(D, *full_shape)`` with local sites
        concatenated over shards on their entity axis; ``axes`` the entity axis of
        each local site (without the draw axis).
    """
    xs = np.atleast_2d(xs)
    if locals_draws is None:
        parts = [objective.split(x) for x in xs]
        globals_ = np.stack([p[0] for p in parts])
        locals_draws = [
            np.stack([p[1][s] for p in parts]) for s in range(objective.num_shards)
        ]
    else:
        globals_ = xs
    results = objective._gather(
        "constrained_values", lambda s: (globals_, locals_draws[s])
    )
    return merge_shard_values(results)


def merge_shard_values(results):
    """Concatenate per-shard ``(values, axes)`` on each local site's entity axis."""
    values, axes = {}, {}
    for name, value in results[0][0].items():
        axis = results[0][1].get(name)
        if axis is None:
            values[name] = value
        else:
            values[name] = np.concatenate([r[0][name] for r in results], axis=axis + 1)
            axes[name] = axis
    return values, axes


def draws_to_inference_data(objective: ShardedObjective, values, axes, attrs=None):
    """InferenceData (one chain) of the output of :func:`constrained_values`.

    Sites of the split plate get the plate's name as their entity dimension.
    """
    from raybayes.results import to_inference_data

    plate = objective.partition.plate if objective.partition is not None else None
    dims = {}
    for name, value in values.items():
        if name in axes and plate is not None:
            names = [f"{name}_dim_{k}" for k in range(np.ndim(value) - 1)]
            names[axes[name]] = plate
            dims[name] = names
    coords = (
        {plate: np.arange(values[next(iter(axes))].shape[axes[next(iter(axes))] + 1])}
        if axes and plate is not None
        else {}
    )
    return to_inference_data(
        {k: np.asarray(v)[None] for k, v in values.items()},
        dims=dims,
        coords=coords,
        attrs=attrs or {},
    )


def fit_map(
    model: Callable,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    num_shards: int = 1,
    partition: Partition | None = None,
    backend: str | Backend = "local",
    source: Any = None,
    model_args: tuple = (),
    vector_free: bool = False,
    **kwargs,
) -> MAPResult:
    """:func:`find_map` for a model and its data, splitting them with :func:`raybayes.plan`.

    Args:
        model, model_kwargs, model_args: the NumPyro model and its arguments.
        num_shards: S.
        partition: the split; chosen by :func:`raybayes.plan` when ``None``.
        backend: ``"local"``, ``"ray"`` or a backend instance.
        source: a Parquet source read on the workers (then ``partition`` is needed).
        vector_free: run vector-free L-BFGS
            (:func:`~raybayes.optim.find_map_vector_free`): the local parameters and
            their optimizer state stay on the workers.
        **kwargs: passed to :func:`find_map` (``tol``, ``max_iter``, ...).

    Returns:
        :class:`MAPResult`.
    """
    objective_class, run = ShardedObjective, find_map
    if vector_free:
        from raybayes.optim.vlbfgs import VectorFreeObjective, find_map_vector_free

        objective_class, run = VectorFreeObjective, find_map_vector_free
    with planned_objective(
        model, model_kwargs, num_shards, partition=partition, backend=backend,
        source=source, model_args=model_args, objective_class=objective_class,
    ) as objective:
        return run(objective, **kwargs)


def planned_objective(
    model, model_kwargs, num_shards, *, partition=None, backend="local", source=None,
    model_args=(), objective_class=ShardedObjective, x64=True,
):
    """A :class:`ShardedObjective` (or ``objective_class``), with the split chosen
    by :func:`raybayes.plan` when neither ``partition`` nor ``source`` is given."""
    from raybayes.core.validation import check_observed_data
    from raybayes.plan import plan

    if source is None:  # with a source, the data are read on the workers
        check_observed_data(model, model_args, model_kwargs)
    if partition is None and source is None:
        chosen = plan(model, model_kwargs, num_shards, model_args=model_args)
        partition, num_shards = chosen.partition, chosen.num_shards
    return objective_class(
        model,
        model_kwargs,
        partition=partition,
        num_shards=num_shards,
        backend=backend,
        source=source,
        model_args=model_args,
        x64=x64,
    )
