"""In-process backend: the same worker objects, run in the driver's process.

Used for tests, debugging and small problems. Calls run eagerly at submission, in
order, so the result is the one a Ray run gives with the same keys.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

from raybayes.backends.base import Backend, Future, WorkerPool, build_worker
from raybayes.errors import RaybayesError, RemoteTaskError, WorkerLostError


class _LocalFuture(Future):
    def __init__(self, worker_index, tag, value=None, error=None):
        self.worker_index = worker_index
        self.tag = tag
        self.value = value
        self.error = error


class LocalWorkerPool(WorkerPool):
    """Workers held as plain objects in this process."""

    def __init__(self, factory, factory_args, num_workers):
        self._factory = factory
        self._factory_args = factory_args
        self.size = num_workers
        self._objects: list[Any] = [None] * num_workers
        self._dead = [False] * num_workers

    def _object(self, i):
        if self._objects[i] is None:
            self._objects[i] = build_worker(self._factory, self._factory_args, i)
        return self._objects[i]

    def submit(self, worker_index, method, *args, tag=None, **kwargs):
        if self._dead[worker_index]:
            return _LocalFuture(
                worker_index, tag, error=WorkerLostError(worker_index, "killed")
            )
        try:
            value = getattr(self._object(worker_index), method)(*args, **kwargs)
            return _LocalFuture(worker_index, tag, value=value)
        except RaybayesError as err:
            return _LocalFuture(worker_index, tag, error=err)
        except Exception as err:  # noqa: BLE001 - surfaced as RemoteTaskError
            wrapped = RemoteTaskError(
                f"worker {worker_index}", repr(err), traceback.format_exc()
            )
            return _LocalFuture(worker_index, tag, error=wrapped)

    def wait(self, futures: Sequence[Future], timeout_s=None):
        return list(futures)

    def result(self, future):
        if future.error is not None:
            raise future.error
        return future.value

    def restart(self, worker_index):
        self._objects[worker_index] = None
        self._dead[worker_index] = False

    def kill(self, worker_index):
        self._objects[worker_index] = None
        self._dead[worker_index] = True

    def shutdown(self):
        self._objects = [None] * self.size


class LocalBackend(Backend):
    """Run workers in the driver's process, one after the other."""

    name = "local"

    def start(self):
        return self

    def shutdown(self):
        pass

    def put(self, value):
        return value

    def default_num_workers(self):
        return 1

    def create_pool(
        self, factory: Callable[..., Any], factory_args=(), *, num_workers, name="worker"
    ):
        return LocalWorkerPool(factory, tuple(factory_args), num_workers)
