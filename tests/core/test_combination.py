"""Combination rules and diagnostics on draws with known answers (pure NumPy/JAX)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpyro.infer.hmc_util import consensus as numpyro_consensus
from scipy import stats

from raybayes import ConfigurationError, DataValidationError, RaybayesWarning
from raybayes.core.combination import (
    combined_mean_mcse,
    consensus,
    diagnose_combination,
    gaussian_product,
    gaussian_product_moments,
    kernel_product,
    subposterior_moments,
)

Z = stats.norm.ppf(1 - 0.001 / 2)
M, N, D = 3, 4000, 2


def gaussian_shards(seed=0, offsets=None):
    """Independent Gaussian subposteriors ``N(mu_m, C_m)`` and their exact product."""
    rng = np.random.default_rng(seed)
    mus = rng.normal(size=(M, D)) * 0.3 if offsets is None else offsets
    chols = [np.array([[1.0, 0.0], [0.5 * (m + 1) / M, 0.8]]) for m in range(M)]
    covs = np.stack([c @ c.T for c in chols])
    draws = np.stack([mus[m] + rng.normal(size=(N, D)) @ chols[m].T for m in range(M)])
    precs = np.linalg.inv(covs)
    cov = np.linalg.inv(precs.sum(0))
    mean = cov @ np.einsum("mij,mj->i", precs, mus)
    return draws, mean, cov


def check_moments(x, mean, cov, ess):
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(x.mean(0) - mean) < Z * sd / np.sqrt(ess)), (x.mean(0), mean)
    rel = np.sqrt(np.diag(np.cov(x.T))) / sd - 1
    assert np.all(np.abs(rel) < Z / np.sqrt(2 * ess)), rel


def test_consensus_of_gaussian_shards_is_their_product():
    draws, mean, cov = gaussian_shards()
    check_moments(consensus(draws), mean, cov, N)


def test_consensus_equals_numpyro_on_the_same_draws():
    draws, _, _ = gaussian_shards(1)
    ours = consensus(draws)
    theirs = np.asarray(numpyro_consensus([{"x": d} for d in draws])["x"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_gaussian_product_draws_the_product():
    draws, mean, cov = gaussian_shards(2)
    m_hat, c_hat = gaussian_product_moments(*subposterior_moments(draws))
    # The estimated moments carry the shards' Monte Carlo error: sd / sqrt(M N).
    assert np.all(np.abs(m_hat - mean) < Z * np.sqrt(np.diag(cov) / N))
    x = gaussian_product(jax.random.PRNGKey(0), draws, 4000)
    assert x.shape == (4000, D)
    check_moments(x, m_hat, c_hat, 4000)


@pytest.mark.parametrize("semiparametric", [True, False])
def test_kernel_product_is_near_the_product_for_gaussian_shards(semiparametric):
    draws, mean, cov = gaussian_shards(3)
    x = kernel_product(
        jax.random.PRNGKey(1), draws[:, :1000], 1000, semiparametric=semiparametric
    )
    assert x.shape == (1000, D)
    # Autocorrelated Gibbs draws and a kernel bias: loose, but far tighter than the
    # subposteriors themselves (their sd is about sqrt(M) times the product's).
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(x.mean(0) - mean) < 0.5 * sd)
    assert np.all(np.abs(np.sqrt(np.diag(np.cov(x.T))) / sd - 1) < 0.5)


def test_kernel_product_warns_beyond_ten_dimensions():
    x = np.random.default_rng(0).normal(size=(2, 50, 11))
    with pytest.warns(RaybayesWarning, match="11 parameters"):
        kernel_product(jax.random.PRNGKey(0), x, 10)


def test_diagnostics_pass_on_agreeing_gaussian_shards():
    draws, _, _ = gaussian_shards(4)
    d = diagnose_combination(draws, consensus(draws), ["alpha", "beta"])
    assert d.reliable and d.summary == "combination reliable", str(d)
    assert d.mean_dof == (M - 1) * D
    np.testing.assert_allclose(d.mardia_kurtosis_ratio, 1.0, atol=0.1)


def test_disagreeing_means_fire_and_name_the_parameter():
    offsets = np.array([[0.0, 0.0], [0.0, 6.0], [0.0, 0.0]])  # beta, shard 1
    draws, _, _ = gaussian_shards(5, offsets)
    d = diagnose_combination(draws, consensus(draws), ["alpha", "beta"])
    assert not d.reliable
    assert d.summary.startswith("combination unreliable: beta: subposterior means")
    assert "shard 1" in d.summary
    assert d.mean_p_value < 1e-6


def test_spreads_that_disagree_fire():
    draws, _, _ = gaussian_shards(6, np.zeros((M, D)))
    draws[0] = draws[0] * 4.0  # shard 0 four times wider: not equal information
    d = diagnose_combination(draws, consensus(draws), ["alpha", "beta"])
    assert any("spreads disagree" in p and "shard 0" in p for p in d.problems), (
        d.problems
    )


def test_crescent_subposteriors_fire_gaussianity():
    rng = np.random.default_rng(7)
    b = rng.normal(size=(M, N))
    a = 1.0 - 2.0 * b**2 + 0.2 * rng.normal(size=(M, N))  # mass on a bent ridge
    draws = np.stack([a, b], axis=-1)
    d = diagnose_combination(draws, consensus(draws), ["a", "b"])
    assert not d.reliable
    assert d.problems[0].startswith("a: subposterior"), d.problems
    assert "not Gaussian" in d.problems[0]
    assert np.all(d.mardia_kurtosis_ratio > 2)


def test_bimodal_subposteriors_leave_combined_mass_in_the_valley():
    rng = np.random.default_rng(8)
    sign = rng.choice([-1.0, 1.0], size=(M, N))
    b = 1.5 * sign + 0.3 * rng.normal(size=(M, N))  # modes at b = -1.5 and 1.5
    a = rng.normal(size=(M, N))
    draws = np.stack([a, b], axis=-1)
    d = diagnose_combination(
        draws, gaussian_product(jax.random.PRNGKey(0), draws), ["a", "b"]
    )
    # The Gaussian product is centred on b = 0, where no subposterior has mass.
    assert d.outside_share > 0.3, str(d)
    text = next(p for p in d.problems if "negligible density" in p)
    assert text.startswith("b: "), text
    assert any(
        p.startswith("b: subposterior") and "not Gaussian" in p for p in d.problems
    )


@pytest.mark.parametrize(
    "draws, error, match",
    [
        (np.zeros((10, 2)), ConfigurationError, "num_shards, num_draws, dim"),
        (np.zeros((2, 3, 2)), ConfigurationError, "at least dim \\+ 2"),
        (np.full((2, 10, 1), np.nan), DataValidationError, "20 values are not finite"),
    ],
)
def test_bad_draws_are_named(draws, error, match):
    with pytest.raises(error, match=match):
        consensus(draws)


def test_combined_shape_must_match():
    draws, _, _ = gaussian_shards(8)
    with pytest.raises(ConfigurationError, match="combined has shape"):
        diagnose_combination(draws, np.zeros((10, 3)))


def agreeing_shards(rng, num_shards, num_draws, dim):
    """Exact Gaussian subposteriors as the Bernstein-von Mises regime makes them.

    The full posterior is ``N(mean, C)``; shard m's subposterior is ``N(mu_m, M C)``
    with ``mu_m`` scattered around ``mean`` by ``M C``, so the exact product of the
    subposteriors has mean ``average(mu_m)`` and covariance ``C``.
    """
    a = rng.normal(size=(dim, dim))
    chol = np.linalg.cholesky(a @ a.T / dim + 0.5 * np.eye(dim))
    scale = np.sqrt(num_shards)
    mus = scale * rng.normal(size=(num_shards, dim)) @ chol.T
    noise = rng.normal(size=(num_shards, num_draws, dim)) @ chol.T
    return mus[:, None] + scale * noise, mus.mean(0), np.sqrt(np.diag(chol @ chol.T))


def test_combined_mean_mcse_predicts_the_error_of_estimated_weights():
    # The Gaussian rules weight shards by sample covariances: with 400 draws of 10
    # parameters the combined mean errs by about sqrt(10/400) = 0.16 sd, far above
    # the 0.025 of the draws' own averaging. The bootstrap must measure that error.
    rng = np.random.default_rng(11)
    z, mcse_all = [], []
    for rep in range(30):
        draws, mean, sd = agreeing_shards(rng, 4, 400, 10)
        mcse = combined_mean_mcse(draws, num_bootstrap=100, seed=rep)
        z.append((consensus(draws).mean(0) - mean) / sd / mcse)
        mcse_all.append(mcse)
    z = np.concatenate(z)
    # 300 z-scores (30 independent sets): their sd is 1 within sampling error
    # (about 0.06 from 30 sets of 10 correlated parameters, 0.07 from 100 replicates).
    assert 0.75 < z.std() < 1.3, z.std()
    assert 0.1 < np.median(mcse_all) < 0.25, np.median(mcse_all)


def test_mcse_of_the_combined_mean_fires_with_few_draws_for_many_parameters():
    # The benchmark's logistic case in miniature: shards that agree and are exactly
    # Gaussian, 21 parameters, 1,000 draws per shard. Every other check passes.
    draws, _, _ = agreeing_shards(np.random.default_rng(12), 2, 1000, 21)
    d = diagnose_combination(draws, consensus(draws), num_bootstrap=100)
    assert len(d.problems) == 1, d.problems
    assert "combined mean is uncertain by" in d.summary
    assert d.mean_mcse.max() > 0.1
    # More draws per shard: the error falls as 1 / sqrt(n), under the threshold.
    more, _, _ = agreeing_shards(np.random.default_rng(12), 2, 8000, 21)
    assert combined_mean_mcse(more, num_bootstrap=100).max() < 0.1
