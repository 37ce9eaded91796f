"""The determinism invariant: the same seed gives bitwise the same draws in-process,
on 1 Ray worker and on 2 Ray workers; a different seed gives different draws."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes

SIGMA = np.array([15, 10, 16, 11, 9, 11, 10, 18], dtype=np.float32)
Y = np.array([28, 8, -3, 7, -1, 1, 18, 12], dtype=np.float32)
# 3 chains on at most 2 workers, 4 chunks per chain: chains outnumber workers and
# a chain's chunks may run on different workers.
RUN = dict(
    num_chains=3, num_warmup=60, num_samples=60, chunk_size=30, progress_bar=False
)


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", theta_trans * tau + mu)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def run(backend, seed=0, **kwargs):
    options = {**RUN, **kwargs}
    return raybayes.sample(
        eight_schools,
        SIGMA,
        model_kwargs={"y": Y},
        seed=seed,
        backend=backend,
        **options,
    )


def assert_identical(a, b):
    for group in ("posterior", "sample_stats"):
        ga, gb = getattr(a, group), getattr(b, group)
        assert set(ga.data_vars) == set(gb.data_vars)
        for name in ga.data_vars:
            va, vb = ga[name].values, gb[name].values
            assert va.dtype == vb.dtype, (group, name)
            # Bitwise: compare the bytes, so that NaN == NaN and -0.0 != 0.0.
            assert va.shape == vb.shape and va.tobytes() == vb.tobytes(), (group, name)


@pytest.fixture(scope="module")
def local_run():
    return run("local")


def test_local_run_is_reproducible(local_run):
    assert_identical(local_run, run("local"))


@pytest.mark.parametrize("num_workers", [1, 2])
def test_ray_workers_match_in_process(local_run, ray_backend, num_workers):
    import ray

    idata = run(ray_backend, num_workers=num_workers)
    assert_identical(local_run, idata)
    # sample() must leave a backend it was given running.
    assert ray.is_initialized()


def test_draws_are_real_and_differ_between_chains(local_run):
    mu = local_run.posterior["mu"].values
    assert mu.shape == (3, 60)
    assert np.isfinite(mu).all()
    # Each chain has its own key: no two chains share draws.
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(mu[i], mu[j])
    # The chains move: a stuck chain would repeat one value.
    assert all(len(np.unique(mu[c])) > 10 for c in range(3))


def test_different_seeds_give_different_draws(local_run):
    other = run("local", seed=1)
    for name in ("mu", "tau", "theta_trans"):
        a, b = local_run.posterior[name].values, other.posterior[name].values
        assert not np.any(a == b), name


def test_more_chains_than_workers_on_ray(local_run, ray_backend):
    idata = run(ray_backend, num_workers=2, num_chains=5)
    assert idata.posterior["mu"].shape == (5, 60)
    assert idata.sample_stats["lp"].shape == (5, 60)
    assert np.isfinite(idata.sample_stats["lp"].values).all()
    # A chain's draws depend on its index only, not on how many chains run.
    for name in ("mu", "tau", "theta"):
        first = idata.posterior[name].values[:3]
        assert first.tobytes() == local_run.posterior[name].values.tobytes(), name


def test_cross_chain_adaptation_is_deterministic_on_ray(ray_backend):
    """Pooling waits for every chain at fixed iterations, so the draws still do not
    depend on the number of workers; and pooling changes them."""
    opts = dict(num_warmup=150, cross_chain_adaptation=True)
    local = run("local", **opts)
    remote = run(ray_backend, num_workers=2, **opts)
    assert_identical(local, remote)
    assert local.attrs["cross_chain_adaptation"] == 1
    per_chain = run("local", num_warmup=150)
    assert not np.array_equal(per_chain.posterior["mu"].values, local.posterior["mu"].values)
