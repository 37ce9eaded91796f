"""Cross-chain (pooled) mass-matrix adaptation: the pooling rule and its posterior."""

from __future__ import annotations

import arviz as az
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from raybayes.errors import ConfigurationError
from raybayes.mcmc.sampler import _pool_welford, _pooling_points

SCALES = np.logspace(-2, 2, 12)


def ill_conditioned():
    """Independent normals whose scales span four orders of magnitude."""
    numpyro.sample("x", dist.Normal(0.0, SCALES))


def _welford(draws):
    mean = draws.mean(0)
    d = draws - mean
    return mean, (d * d).sum(0), len(draws)


@pytest.mark.parametrize("dense", [False, True])
def test_pooled_accumulator_is_that_of_all_draws(dense):
    rng = np.random.default_rng(0)
    chains = [rng.normal(loc=i, scale=1 + i, size=(10 + 5 * i, 3)) for i in range(4)]
    if dense:
        states = []
        for c in chains:
            d = c - c.mean(0)
            states.append((c.mean(0), d.T @ d, len(c)))
    else:
        states = [_welford(c) for c in chains]
    mean, m2, n = _pool_welford([{("x",): s} for s in states])[("x",)]
    everything = np.concatenate(chains)
    assert n == len(everything)
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-12)
    d = everything - everything.mean(0)
    np.testing.assert_allclose(m2, d.T @ d if dense else (d * d).sum(0), rtol=1e-10)


def test_pooling_points_are_the_slow_window_ends():
    # NumPyro's schedule for 1000 warmup iterations: 75 fast, slow windows of
    # 25, 50, 100, 200, 500, then 50 fast.
    assert _pooling_points(1000) == [99, 149, 249, 449, 949]


def test_pooled_adaptation_samples_the_posterior():
    """Means 0 and sds SCALES, within 4 Monte Carlo standard errors (ArviZ MCSE)."""
    idata = raybayes.sample(
        ill_conditioned,
        num_chains=4,
        num_warmup=200,
        num_samples=300,
        backend="local",
        progress_bar=False,
        cross_chain_adaptation=True,
        seed=2,
    )
    x = idata.posterior["x"].values.reshape(-1, len(SCALES))
    mcse_mean = az.mcse(idata, method="mean").x.values
    mcse_sd = az.mcse(idata, method="sd").x.values
    assert np.all(np.abs(x.mean(0)) < 4 * mcse_mean)
    assert np.all(np.abs(x.std(0) - SCALES) < 4 * mcse_sd)
    # 12 R-hats of 4 x 300 draws: 1.01 is within their sampling spread, 1.02 not.
    assert float(az.rhat(idata).x.max()) < 1.02


def test_cross_chain_adaptation_needs_two_chains():
    with pytest.raises(ConfigurationError, match="num_chains >= 2"):
        raybayes.sample(
            ill_conditioned,
            num_chains=1,
            backend="local",
            cross_chain_adaptation=True,
            progress_bar=False,
        )
