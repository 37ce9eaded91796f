"""The result of a distributed MAP run, shared by every optimizer of this package."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raybayes.distributed.objective import ShardedObjective, constrained_values

__all__ = ["MAPResult", "map_result_fields"]


@dataclass
class MAPResult:
    """The maximum a posteriori point and how the optimiser got there.

    Attributes:
        params: site -> constrained value at the MAP (latent and deterministic
            sites, local sites assembled over shards in plate order).
        x: ``(size,)`` float64, the optimum in the unconstrained driver layout.
        loss: negative log joint at ``x`` (unconstrained space, Jacobians included;
            nats).
        num_iterations: optimizer iterations.
        num_evaluations: objective evaluations (parallel passes over the shards).
        converged: ``tol``/``gtol`` met.
        status: ``"converged"``, ``"max_steps"``, ``"line_search_failed"`` or
            ``"non_finite"``.
        message: the optimizer's message.
        grad_norm: max absolute gradient component at ``x``.
        history: loss after each iteration.
        time_s: wall time of the optimisation, in seconds.
        num_restarts: restarts after failed line searches.
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


def map_result_fields(
    objective: ShardedObjective,
    x: np.ndarray,
    value: float,
    history: list,
    evals_before: int,
    status: str,
    message: str,
    grad_norm: float,
    elapsed_s: float,
    num_restarts: int,
    assemble: bool,
) -> dict:
    """The fields of :class:`MAPResult` at the end of a run.

    Args:
        objective: the objective the run used.
        x: ``(size,)`` the point reached (driver layout).
        value: the loss there.
        history: loss after each iteration.
        evals_before: ``objective.num_evaluations`` at the start of the run.
        status, message, grad_norm, num_restarts: see :class:`MAPResult`.
        elapsed_s: wall time of the run, in seconds.
        assemble: compute the constrained site values at ``x`` (one pass over the
            shards); otherwise ``params`` is empty.

    Returns:
        Keyword arguments of :class:`MAPResult`.
    """
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
        time_s=elapsed_s,
        num_restarts=num_restarts,
    )
