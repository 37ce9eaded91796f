"""The in-process backend, directly: the WorkerPool contract that every algorithm
relies on (and that RayBackend implements with actors)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from raybayes.backends import LocalBackend
from raybayes.errors import ChainError, RemoteTaskError, WorkerLostError


class Counter:
    """A worker object: counts its calls, knows its index, can fail on demand."""

    builds = 0

    def __init__(self, offset, *, worker_index):
        Counter.builds += 1
        self.offset = offset
        self.worker_index = worker_index
        self.calls = 0

    def add(self, x):
        self.calls += 1
        return np.asarray(x) + self.offset + self.worker_index

    def count(self):
        return self.calls

    def fail(self):
        raise ZeroDivisionError("on purpose")

    def fail_as_chain(self):
        raise ChainError(7, "the model raised", "traceback text")


Counter.accepts_worker_index = True


@pytest.fixture
def pool():
    Counter.builds = 0
    with LocalBackend() as backend:
        pool = backend.create_pool(Counter, (backend.put(10),), num_workers=3)
        yield pool
        pool.shutdown()


def test_calls_reach_the_addressed_worker_with_its_index(pool):
    futures = [pool.submit(i, "add", [1, 2], tag=f"t{i}") for i in range(3)]
    done = pool.wait(futures)
    assert done == futures  # in-process calls finish at submission, in order
    assert [f.tag for f in done] == ["t0", "t1", "t2"]
    assert [f.worker_index for f in done] == [0, 1, 2]
    for i, fut in enumerate(futures):
        np.testing.assert_array_equal(pool.result(fut), [11 + i, 12 + i])
    assert pool.call_all("count") == [1, 1, 1]


def test_worker_objects_keep_state_between_calls_and_are_built_lazily(pool):
    assert Counter.builds == 0
    for _ in range(4):
        pool.result(pool.submit(1, "add", 0))
    assert pool.result(pool.submit(1, "count")) == 4
    assert Counter.builds == 1  # only worker 1 was used


def test_an_exception_on_a_worker_is_a_picklable_remote_task_error(pool):
    fut = pool.submit(2, "fail")
    with pytest.raises(RemoteTaskError) as info:
        pool.result(fut)
    err = info.value
    assert "ZeroDivisionError('on purpose')" in str(err)
    assert "worker 2" in str(err)
    assert "ZeroDivisionError" in err.remote_traceback
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.remote_traceback == err.remote_traceback
    # The worker survives an exception in a call.
    np.testing.assert_array_equal(pool.result(pool.submit(2, "add", 0)), 12)


def test_raybayes_errors_pass_through_unwrapped(pool):
    with pytest.raises(ChainError, match="chain 7"):
        pool.result(pool.submit(0, "fail_as_chain"))


def test_a_killed_worker_is_lost_until_restarted_with_fresh_state(pool):
    pool.result(pool.submit(0, "add", 0))
    pool.kill(0)
    with pytest.raises(WorkerLostError) as info:
        pool.result(pool.submit(0, "add", 0))
    assert info.value.worker_index == 0
    # Other workers are unaffected.
    np.testing.assert_array_equal(pool.result(pool.submit(1, "add", 0)), 11)
    pool.restart(0)
    assert pool.result(pool.submit(0, "count")) == 0  # rebuilt by the factory
    np.testing.assert_array_equal(pool.result(pool.submit(0, "add", 5)), 15)


def test_local_backend_facts():
    backend = LocalBackend()
    assert backend.name == "local"
    assert backend.default_num_workers() == 1
    value = {"a": np.arange(3)}
    assert backend.put(value) is value  # no copy in-process
