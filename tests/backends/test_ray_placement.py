"""A worker that Ray cannot place counts as lost after ``placement_timeout_s``.

Before, a call to such a worker (a replacement for a lost node's worker, when no node
left has the resources it asks for) waited forever without a word.
"""

import logging
import time

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from raybayes.errors import ConfigurationError, WorkerLostError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Echo:
    def echo(self, x):
        return x


def _unplaceable_backend(timeout_s):
    from raybayes.backends import RayBackend

    # No node of the test's Ray instance has this resource.
    return RayBackend(resources_per_worker={"CPU": 1, "absent_resource": 1},
                      placement_timeout_s=timeout_s)


def test_a_call_to_an_unplaceable_worker_fails_after_the_timeout(ray_backend, caplog):
    backend = _unplaceable_backend(2.0)
    try:
        pool = backend.create_pool(Echo, num_workers=1)
        fut = pool.submit(0, "echo", 1)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="raybayes.backends.ray"):
            assert pool.wait([fut]) == [fut]
        waited = time.monotonic() - t0
        assert 1.9 <= waited < 30
        warned = [r.getMessage() for r in caplog.records]
        assert any("absent_resource" in m and "has waited" in m for m in warned), warned
        match = "absent_resource.*placement_timeout_s"
        with pytest.raises(WorkerLostError, match=match):
            pool.result(fut)
        # result() without wait() fails the same way instead of blocking.
        pool.restart(0)
        fut = pool.submit(0, "echo", 2)
        with pytest.raises(WorkerLostError, match="could not start it"):
            pool.result(fut)
    finally:
        backend.shutdown()


def _normal_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_sample_gives_up_with_a_clear_error_when_no_worker_can_be_placed(ray_backend):
    backend = _unplaceable_backend(0.5)
    try:
        match = "every worker was lost.*absent_resource"
        with pytest.raises(WorkerLostError, match=match):
            raybayes.sample(_normal_model, np.zeros(3), num_chains=1, num_warmup=10,
                            num_samples=10, backend=backend, seed=0)
    finally:
        backend.shutdown()


def test_placement_timeout_must_be_positive():
    from raybayes.backends import RayBackend

    with pytest.raises(ConfigurationError, match="placement_timeout_s"):
        RayBackend(placement_timeout_s=0)
