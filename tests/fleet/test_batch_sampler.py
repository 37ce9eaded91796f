"""BatchSampler: NUTS on a batch of independent models against exact posteriors."""

from __future__ import annotations

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from raybayes.fleet.sampler import BatchSampler

A0, B0 = 2.0, 0.1  # Gamma(shape, rate) prior of the Poisson rate


def iid_poisson(y, mask=None, covariates=None):
    rate = numpyro.sample("rate", dist.Gamma(A0, B0))
    with numpyro.plate("time", mask.shape[0]):
        numpyro.sample("y", dist.Poisson(rate).mask(mask), obs=y)


def _data():
    rng = np.random.default_rng(3)
    y = np.stack([rng.poisson(3.0, 150), rng.poisson(40.0, 150)]).astype(np.float32)
    mask = np.ones_like(y, bool)
    mask[1, 100:] = False  # missing points are left out of the likelihood
    # Exact posterior: Gamma(A0 + sum y, B0 + n) over the observed points.
    shape = A0 + (y * mask).sum(1)
    rate = B0 + mask.sum(1)
    return y, mask, shape / rate, np.sqrt(shape) / rate


@pytest.mark.parametrize(
    "mass_matrix, vectorize",
    [("laplace", False), ("laplace", True)],
)
def test_nuts_draws_match_the_conjugate_posterior(mass_matrix, vectorize):
    y, mask, mean, sd = _data()
    sampler = BatchSampler(
        iid_poisson, num_chains=4, num_warmup=100 if mass_matrix == "laplace" else 200,
        num_samples=150, max_extensions=1, mass_matrix=mass_matrix, vectorize=vectorize,
    )
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), 2))
    out = sampler.nuts(keys, y, mask)
    for b in range(2):
        x = np.asarray(out.draws[b]["rate"], np.float64)  # (chains, draws)
        assert x.shape[0] == 4 and x.shape[1] >= 150
        assert out.diverging[b].shape == x.shape and out.diverging[b].sum() == 0
        ess = float(az.ess(x))
        # Tolerances from the Monte Carlo error: se(mean) = sd / sqrt(ESS),
        # se(sd) ~ sd / sqrt(2 ESS); 4.5 standard errors.
        assert abs(x.mean() - mean[b]) < 4.5 * sd[b] / np.sqrt(ess)
        assert abs(x.std() - sd[b]) < 4.5 * sd[b] / np.sqrt(2 * ess)
        assert float(az.rhat(x)) < 1.02
        assert out.num_gradients[b] > 0
    if mass_matrix == "laplace":
        # Chains of one model share one pooled step size; models do not share.
        assert np.allclose(out.step_size, out.step_size[:, :1])
        assert out.step_size[0, 0] != out.step_size[1, 0]


def test_laplace_draws_match_the_conjugate_posterior():
    # The approximation is in the unconstrained (log) space: log-rate ~ normal.
    y, mask, mean, sd = _data()
    sampler = BatchSampler(iid_poisson)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(1), 2))
    out = sampler.laplace(keys, y, mask, num_draws=4000)
    for b in range(2):
        x = np.asarray(out.draws[b]["rate"], np.float64).ravel()
        # With >= 100 points the Gamma posterior is close to log-normal: means
        # within 2% of a posterior sd plus Monte Carlo error, sds within 5%.
        assert abs(x.mean() - mean[b]) < 0.05 * sd[b] + 4 * sd[b] / np.sqrt(x.size)
        assert abs(x.std() / sd[b] - 1) < 0.05 + 4 / np.sqrt(2 * x.size)


def test_unknown_mass_matrix_is_refused():
    with pytest.raises(ValueError, match="mass_matrix='full'"):
        BatchSampler(iid_poisson, mass_matrix="full")
