"""Exceptions and warnings raised by raybayes.

Every exception pickles cleanly (it can cross a Ray boundary) and carries the id of
the chain, shard or model that failed, plus the remote traceback where there is one.
"""

from __future__ import annotations

__all__ = [
    "RaybayesError",
    "RaybayesWarning",
    "ConfigurationError",
    "DataValidationError",
    "RemoteTaskError",
    "ChainError",
    "ShardError",
    "ModelFitError",
    "WorkerLostError",
    "ClusterConnectionError",
]


class RaybayesWarning(UserWarning):
    """Warnings emitted by raybayes itself."""


class RaybayesError(Exception):
    """Base class of every raybayes exception."""


class ConfigurationError(RaybayesError, ValueError):
    """An argument has a value that raybayes cannot run with.

    The message names the argument, the value given, the allowed values and the fix.
    """


class DataValidationError(RaybayesError, ValueError):
    """Input data are unusable: NaN/inf, wrong sign, missing column, empty data.

    Attributes:
        column: the offending column (or ``None`` when the whole table is at fault).
        num_bad_rows: number of rows that fail the check.
        example: one offending row, as a dict, for the user to look up.
    """

    def __init__(self, message, column=None, num_bad_rows=None, example=None):
        super().__init__(message)
        self.column = column
        self.num_bad_rows = num_bad_rows
        self.example = example

    def __reduce__(self):
        return (
            type(self),
            (self.args[0], self.column, self.num_bad_rows, self.example),
        )


class RemoteTaskError(RaybayesError, RuntimeError):
    """A unit of work failed on a worker.

    Attributes:
        kind: what the unit was (``"chain"``, ``"shard"``, ``"model"``, ``"batch"``).
        unit_id: its stable id (chain index, shard index, group key).
        remote_traceback: the worker's formatted traceback.
    """

    kind = "task"

    def __init__(self, unit_id, message, remote_traceback=""):
        self.unit_id = unit_id
        self.message = message
        self.remote_traceback = remote_traceback
        text = f"{self.kind} {unit_id} failed: {message}"
        if remote_traceback:
            text += "\n\nTraceback on the worker:\n" + remote_traceback
        super().__init__(text)

    def __reduce__(self):
        return (type(self), (self.unit_id, self.message, self.remote_traceback))


class ChainError(RemoteTaskError):
    """A Markov chain failed (the model raised, or its state became invalid)."""

    kind = "chain"


class ShardError(RemoteTaskError):
    """A data shard's computation failed on its worker."""

    kind = "shard"


class ModelFitError(RemoteTaskError):
    """One model of a fleet (``fit_many``) failed."""

    kind = "model"


class WorkerLostError(RaybayesError, RuntimeError):
    """A worker process (or its node) died while it held work.

    Attributes:
        worker_index: index of the lost worker in its pool.
    """

    def __init__(self, worker_index, message=""):
        self.worker_index = worker_index
        self.message = message
        super().__init__(f"worker {worker_index} was lost: {message}")

    def __reduce__(self):
        return (type(self), (self.worker_index, self.message))


class ClusterConnectionError(RaybayesError, ConnectionError):
    """The Ray cluster at the given address could not be reached in time."""
