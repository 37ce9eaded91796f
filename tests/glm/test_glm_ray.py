"""GLM estimators on Ray shard workers: same result as in-process, worker loss."""

from __future__ import annotations

import numpy as np
import pytest

from raybayes.errors import DataValidationError
from raybayes.glm import LogisticRegression, PoissonRegression, ShardedGLMData

KW = dict(C=0.1, tol=1e-8, max_steps=500)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 8)).astype(np.float32)
    w = rng.normal(scale=0.5, size=8)
    y = (rng.random(3000) < 1 / (1 + np.exp(-(X @ w)))).astype(int)
    return X, y


@pytest.fixture(scope="module")
def sharded(ray_backend, data):
    """The data on two Ray shard workers, started once for the module."""
    X, y = data
    with ShardedGLMData(X, y, "logistic", num_workers=2, backend=ray_backend) as s:
        yield s


@pytest.fixture(scope="module")
def local_fit(data):
    X, y = data
    return LogisticRegression(backend="local", num_workers=2, **KW).fit(X, y)


def test_ray_equals_local(sharded, local_fit):
    on_ray = LogisticRegression(**KW).fit(sharded)
    # Same shards, same float32 arithmetic, same summation order: identical.
    np.testing.assert_array_equal(on_ray.coef_, local_fit.coef_)
    np.testing.assert_array_equal(on_ray.standard_errors_, local_fit.standard_errors_)
    assert on_ray.num_workers_ == 2
    newton = LogisticRegression(solver="newton", **KW).fit(sharded)
    # float32 features: gradients carry ~1e-7 relative rounding, so two solvers
    # agree to ~1e-6, not to float64 precision.
    np.testing.assert_allclose(newton.coef_, local_fit.coef_, atol=1e-5)


def test_killed_worker_does_not_change_the_result(sharded, local_fit):
    sharded.objective.kill_worker(1)
    after = LogisticRegression(**KW).fit(sharded)
    np.testing.assert_array_equal(after.coef_, local_fit.coef_)


def test_validation_runs_before_any_worker_starts(ray_backend):
    X = np.ones((10, 2))
    with pytest.raises(DataValidationError, match="non-integer"):
        PoissonRegression(backend=ray_backend).fit(X, np.arange(10.0) + 0.5)
