"""The in-process backend, directly: worker objects, call order, errors, restarts."""

from __future__ import annotations

import pickle

import pytest

from raybayes.backends import LocalBackend, get_backend
from raybayes.errors import (
    ConfigurationError,
    RemoteTaskError,
    ShardError,
    WorkerLostError,
)


class Counter:
    """A stateful worker object: it remembers its calls."""

    accepts_worker_index = True

    def __init__(self, start, *, worker_index):
        self.value = start + 100 * worker_index
        self.worker_index = worker_index
        self.calls = []

    def add(self, amount, *, twice=False):
        self.value += amount * (2 if twice else 1)
        self.calls.append(amount)
        return self.value

    def fail(self):
        raise KeyError("missing")

    def fail_as_raybayes(self):
        raise ShardError(self.worker_index, "bad shard")


def test_pool_runs_calls_in_order_on_each_workers_own_object():
    with LocalBackend() as backend:
        pool = backend.create_pool(Counter, (5,), num_workers=3)
        assert pool.size == 3
        futures = [pool.submit(i, "add", 1, tag=("w", i)) for i in range(3)]
        futures.append(pool.submit(0, "add", 2, twice=True, tag="again"))
        assert pool.wait(futures) == futures
        assert [pool.result(f) for f in futures] == [6, 106, 206, 10]
        assert [f.tag for f in futures] == [("w", 0), ("w", 1), ("w", 2), "again"]
        assert [f.worker_index for f in futures] == [0, 1, 2, 0]
        assert pool.call_all("add", 0) == [10, 106, 206]


def test_an_exception_on_a_worker_becomes_a_remote_task_error():
    pool = LocalBackend().create_pool(Counter, (0,), num_workers=2)
    future = pool.submit(1, "fail")
    with pytest.raises(RemoteTaskError) as info:
        pool.result(future)
    err = info.value
    assert type(err) is RemoteTaskError
    assert err.unit_id == "worker 1" and "KeyError" in err.message
    assert "in fail" in err.remote_traceback  # the worker's own traceback
    assert pickle.loads(pickle.dumps(err)).remote_traceback == err.remote_traceback
    # raybayes' own errors pass as they are
    with pytest.raises(ShardError, match="shard 0 failed: bad shard"):
        pool.result(pool.submit(0, "fail_as_raybayes"))


def test_kill_and_restart():
    pool = LocalBackend().create_pool(Counter, (0,), num_workers=2)
    pool.submit(0, "add", 7)
    pool.kill(0)
    with pytest.raises(WorkerLostError) as info:
        pool.result(pool.submit(0, "add", 1))
    assert info.value.worker_index == 0
    assert pool.result(pool.submit(1, "add", 1)) == 101  # the other is untouched
    pool.restart(0)
    assert pool.result(pool.submit(0, "add", 1)) == 1  # a fresh object
    pool.shutdown()
    assert pool.result(pool.submit(1, "add", 0)) == 100  # rebuilt after shutdown


def test_backend_basics():
    backend = get_backend("local")
    assert isinstance(backend, LocalBackend) and backend.name == "local"
    assert backend.start() is backend
    value = {"a": [1, 2]}
    assert backend.put(value) is value  # no copy in process
    assert backend.default_num_workers() == 1
    assert get_backend(backend) is backend
    with pytest.raises(ConfigurationError, match="address"):
        get_backend("local", address="127.0.0.1:6379")
    with pytest.raises(ConfigurationError, match="not known"):
        get_backend("spark")
