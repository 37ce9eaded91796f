"""The execution-backend interface.

A backend runs *worker objects*: plain Python objects (a chain runner, a shard, a
batch of models) built by a factory on each worker. The driver submits method calls
to a given worker and waits for whichever finishes first. Two implementations share
this interface: :class:`~raybayes.backends.local.LocalBackend` (in-process) and
:class:`~raybayes.backends.ray.RayBackend` (one Ray actor per worker).

This package holds no numerics: the unit of remote work is defined by the worker
object, and each call returns plain NumPy arrays.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any


def build_worker(factory, factory_args, worker_index):
    """Build a worker object; factories that set ``accepts_worker_index = True``
    also receive ``worker_index=`` (e.g. for per-worker settings)."""
    if getattr(factory, "accepts_worker_index", False):
        return factory(*factory_args, worker_index=worker_index)
    return factory(*factory_args)


class Future(abc.ABC):
    """The pending result of one method call on one worker."""

    worker_index: int
    tag: Any


class WorkerPool(abc.ABC):
    """A fixed-size pool of workers, each holding one worker object.

    Workers are addressed by index ``0 .. size - 1``. A lost worker can be replaced
    with :meth:`restart`; its object is rebuilt by the same factory.
    """

    size: int

    @abc.abstractmethod
    def submit(self, worker_index: int, method: str, *args, tag=None, **kwargs) -> Future:
        """Call ``method(*args, **kwargs)`` on the object held by worker ``worker_index``.

        ``tag`` is any value the caller wants back with the future (a chain id, say).
        """

    @abc.abstractmethod
    def wait(self, futures: Sequence[Future], timeout_s: float | None = None) -> list[Future]:
        """Block until at least one future is done (or ``timeout_s`` passes).

        Returns:
            The futures that are done, in submission order (possibly empty on timeout).
        """

    @abc.abstractmethod
    def result(self, future: Future) -> Any:
        """The value of a done future.

        Raises:
            RemoteTaskError: the call raised on the worker (a subclass such as
                :class:`~raybayes.errors.ChainError` when the worker raised one).
            WorkerLostError: the worker process or its node died.
        """

    @abc.abstractmethod
    def restart(self, worker_index: int) -> None:
        """Replace worker ``worker_index`` with a fresh one built by the factory."""

    @abc.abstractmethod
    def kill(self, worker_index: int) -> None:
        """Kill a worker (for failure tests). Its pending calls raise WorkerLostError."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release every worker."""

    def call_all(self, method: str, *args, **kwargs) -> list[Any]:
        """Call ``method`` on every worker and return the results in worker order."""
        futures = [self.submit(i, method, *args, **kwargs) for i in range(self.size)]
        return [self.result(self._wait_one(f)) for f in futures]

    def _wait_one(self, future: Future) -> Future:
        while not self.wait([future]):
            pass
        return future


class Backend(abc.ABC):
    """Where raybayes runs its workers.

    Use it as a context manager, or call :meth:`start` and :meth:`shutdown`.
    """

    name: str

    @abc.abstractmethod
    def start(self) -> "Backend":
        """Start (or connect to) the execution engine. Idempotent."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop what :meth:`start` started; leave a cluster that was already there."""

    @abc.abstractmethod
    def put(self, value: Any) -> Any:
        """Place a value once where every worker can read it (Ray's object store)."""

    @abc.abstractmethod
    def default_num_workers(self) -> int:
        """A sensible pool size: the CPUs (or GPUs) available to this backend."""

    @abc.abstractmethod
    def create_pool(
        self,
        factory: Callable[..., Any],
        factory_args: tuple = (),
        *,
        num_workers: int,
        name: str = "worker",
    ) -> WorkerPool:
        """Start ``num_workers`` workers, each holding ``factory(*factory_args)``.

        Values returned by :meth:`put` may appear in ``factory_args``; each worker
        receives the underlying value.
        """

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()
        return False
