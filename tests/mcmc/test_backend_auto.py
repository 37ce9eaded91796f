"""sample(backend="auto"): in-process for a one-chain, one-worker job; Ray when the
job asks for two workers; the same draws either way."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes

ray = pytest.importorskip("ray")

Y = np.array([0.3, -1.2, 0.8, 2.1, 0.4], dtype=np.float32)
RUN = dict(num_warmup=50, num_samples=50, seed=5, progress_bar=False)


def normal_mean(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.fail("a Ray instance is already running; this module starts its own")
    yield
    assert not ray.is_initialized()  # sample() stops the Ray instance it started


@pytest.fixture(scope="module")
def one_chain():
    return raybayes.sample(normal_mean, Y, num_chains=1, **RUN)  # backend="auto"


def test_one_chain_one_worker_runs_in_process(one_chain, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a one-chain job must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)
    idata = raybayes.sample(normal_mean, Y, num_chains=1, num_workers=1, **RUN)
    assert idata.attrs["backend"] == "local"
    assert idata.attrs["num_workers"] == 1
    assert one_chain.attrs["backend"] == "local"
    np.testing.assert_array_equal(idata.posterior["mu"], one_chain.posterior["mu"])


def test_two_workers_run_on_ray_with_the_same_draws(one_chain):
    idata = raybayes.sample(normal_mean, Y, num_chains=2, num_workers=2, **RUN)
    assert idata.attrs["backend"] == "ray"
    assert idata.attrs["num_workers"] == 2
    # Chain 0 has the key derive_key(seed, 0) whatever the backend: bitwise the
    # draws of the in-process one-chain run.
    mu = idata.posterior["mu"].values
    assert mu[0].tobytes() == one_chain.posterior["mu"].values[0].tobytes()
    assert not np.array_equal(mu[0], mu[1])
    # And they are draws from the posterior N(sum(y) / (n + 1/100), 1 / (n + 1/100)).
    precision = len(Y) + 1e-2
    assert abs(mu.mean() - Y.sum() / precision) < 5 / np.sqrt(precision * mu.size / 4)
