"""The shard workers' adapter on the in-process backend: gather/reduce equals the
direct computation, failures name their shard, a lost shard comes back the same."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from conjugate_normal import hierarchical_normal_model, simulate
from raybayes.config import ScalingConfig
from raybayes.core import Partition, ShardLogDensity, assign_entities
from raybayes.core.site_values import constrained_site_values
from raybayes.distributed import (
    ShardedObjective,
    ShardWorker,
    constrained_values,
    shard_count,
)
from raybayes.errors import ConfigurationError, ShardError, WorkerLostError

GROUPS = Partition(
    "groups",
    index_arg="group_idx",
    obs_args=("group_idx", "y"),
    obs_plate="obs",
    size_arg="num_groups",
)
model = hierarchical_normal_model(2.0, 0.7, 1.3)


@pytest.fixture(scope="module")
def kwargs():
    return simulate(7, (2, 6), 1.0, 0.7, 1.3, shuffle=True)


@pytest.fixture(scope="module")
def point():
    rng = np.random.default_rng(0)
    return rng.standard_normal(1 + 7)  # mu, then theta_1..7


def test_summed_shards_equal_the_full_log_joint(kwargs, point):
    full = ShardLogDensity(model, kwargs, GROUPS, 1)
    with jax.enable_x64(True):
        value, gg, gl = full.value_and_grad(
            np.asarray(point[:1]), np.asarray(point[1:]).reshape(7, 1)
        )
    with ShardedObjective(
        model, kwargs, partition=GROUPS, num_shards=3, backend="local"
    ) as objective:
        ids = [list(i["entity_ids"]) for i in objective.shard_info]
        assert sum(ids, []) == list(range(7)) and all(ids)  # contiguous, in order
        got, grad = objective.value_and_grad(point)
        assert objective.num_evaluations == 1
    np.testing.assert_allclose(got, float(value), rtol=1e-12)
    np.testing.assert_allclose(
        grad, np.r_[np.asarray(gg), np.asarray(gl).ravel()], rtol=1e-10, atol=1e-12
    )


def test_gather_returns_each_shards_result_in_shard_order(kwargs):
    with ShardedObjective(
        model, kwargs, partition=GROUPS, num_shards=3, backend="local"
    ) as objective:
        rows = objective.call_all("num_rows")
        described = objective.gather("setup", lambda s: (s,))
        ids = [list(i["entity_ids"]) for i in objective.shard_info]
    assert [list(i["entity_ids"]) for i in described] == ids
    counts = np.bincount(kwargs["group_idx"], minlength=7)
    assert rows == [int(counts[i].sum()) for i in ids]
    assert len(set(rows)) > 1  # the shards differ, so the order is checked


def test_constrained_values_are_assembled_in_plate_order(kwargs, point):
    full = ShardLogDensity(model, kwargs, GROUPS, 1)
    with jax.enable_x64(True):
        expected, axes = constrained_site_values(
            full, point[None, :1], point[None, 1:].reshape(1, 7, 1)
        )
    with ShardedObjective(
        model, kwargs, partition=GROUPS, num_shards=2, backend="local"
    ) as objective:
        values, got_axes = constrained_values(objective, point[None])
    assert got_axes == axes == {"theta": 0}
    np.testing.assert_allclose(values["theta"], expected["theta"], rtol=1e-12)
    np.testing.assert_allclose(values["mu"], expected["mu"], rtol=1e-12)


def test_constrained_values_compile_once_per_density(kwargs, point):
    # the Newton loop of nested_laplace asks for the values at every conditional
    # mode: a new trace and compilation per call made 40% of a fit
    full = ShardLogDensity(model, kwargs, GROUPS, 1)
    with jax.enable_x64(True):
        first, _ = constrained_site_values(
            full, point[None, :1], point[None, 1:].reshape(1, 7, 1)
        )
        fn = full._constrained_site_values
        tr = full._constrained_site_trace
        second, _ = constrained_site_values(
            full, 2 * point[None, :1], 2 * point[None, 1:].reshape(1, 7, 1)
        )
    assert full._constrained_site_values is fn
    assert full._constrained_site_trace is tr is not None
    assert fn._cache_size() == 1
    np.testing.assert_allclose(first["theta"], point[None, 1:], rtol=1e-12)
    np.testing.assert_allclose(second["theta"], 2 * point[None, 1:], rtol=1e-12)


class _FailingWorker(ShardWorker):
    def fail_on_shard_one(self):
        if self.shard_id == 1:
            raise ValueError("shard one cannot")
        return self.shard_id


class _FailingObjective(ShardedObjective):
    worker_class = _FailingWorker


def test_a_failure_on_a_shard_is_a_shard_error_naming_it(kwargs):
    with _FailingObjective(
        model, kwargs, partition=GROUPS, num_shards=3, backend="local"
    ) as objective:
        assert objective.call(0, "fail_on_shard_one") == 0
        with pytest.raises(ShardError) as info:
            objective.call_all("fail_on_shard_one")
    err = info.value
    assert err.unit_id == 1 and str(err).startswith("shard 1 failed")
    assert "shard one cannot" in err.message
    assert "ValueError" in err.remote_traceback
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ShardError and again.unit_id == 1


def test_a_model_that_fails_on_one_shard_names_it_at_setup():
    def fragile(y):
        if y.shape[0] == 3:  # only one shard holds 3 rows
            raise ValueError("three rows")
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1), obs=y)

    specs = assign_entities(np.ones(5), 2, "obs")
    expected = next(s.shard_id for s in specs if s.entity_stop - s.entity_start == 3)
    with pytest.raises(ShardError) as info:
        ShardedObjective(
            fragile,
            {"y": np.zeros(5)},
            partition=Partition("obs", entity_args=("y",)),
            num_shards=2,
            backend="local",
        )
    assert info.value.unit_id == expected and "three rows" in info.value.message


def test_a_lost_shard_restarts_with_the_same_result(kwargs, point):
    with ShardedObjective(
        model, kwargs, partition=GROUPS, num_shards=2, backend="local"
    ) as objective:
        before = objective.value_and_grad(point)
        objective.pool.kill(1)
        with pytest.raises(WorkerLostError) as info:
            objective.value_and_grad(point)
        assert info.value.worker_index == 1
        described = objective.restart_shard(1)
        kept = objective.shard_info[1]["entity_ids"]
        assert list(described["entity_ids"]) == list(kept)
        after = objective.value_and_grad(point)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])


def test_shard_count_and_num_workers():
    assert shard_count(None, ScalingConfig()) == 1
    assert shard_count(None, ScalingConfig(num_workers=3)) == 3
    assert shard_count(2, ScalingConfig(num_workers=2)) == 2
    with pytest.raises(ConfigurationError, match="one worker per shard"):
        shard_count(2, ScalingConfig(num_workers=3))
    with pytest.raises(ConfigurationError, match="num_shards=0"):
        shard_count(0, ScalingConfig())
