"""BatchSampler: NUTS on a batch of independent models against exact posteriors."""

from __future__ import annotations

import json

import arviz as az
import jax
import jax.flatten_util
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
    "vectorize, restart",
    [(False, True), (True, False)],
)
def test_nuts_draws_match_the_conjugate_posterior(vectorize, restart):
    y, mask, mean, sd = _data()
    # restart: an unreachable R-hat target makes every model run twice; the kept
    # run must still be exact.
    sampler = BatchSampler(
        iid_poisson, num_chains=4, num_warmup=100, num_samples=150,
        max_extensions=0 if restart else 1, target_rhat=0.5 if restart else 1.01,
        max_restarts=1 if restart else 0, vectorize=vectorize,
    )
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), 2))
    out = sampler.nuts(keys, y, mask)
    assert list(out.num_restarts) == ([1, 1] if restart else [0, 0])
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
    # Chains of one model share one pooled step size; models do not share.
    assert np.allclose(out.step_size, out.step_size[:, :1])
    assert out.step_size[0, 0] != out.step_size[1, 0]


def test_map_search_leaves_the_saddle_between_relabelled_modes(data_dir):
    """A 2-state HMM series (from the synthetic fleet) whose MAP search from the
    centre of the unconstrained space stopped at the saddle between the two
    labellings (potential 958 instead of 738) and so gave stuck chains; the search
    must end at the mode."""
    from numpyro.infer.util import potential_energy, unconstrain_fn
    from scipy import optimize

    from raybayes.fleet import store
    from raybayes.models import poisson_hmm

    case = json.loads((data_dir / "fleet_saddle_series.json").read_text())
    # A batch of two copies, padded as fit_many pads (to 256 points); the first
    # has the fleet's key for this group, which led to the saddle.
    y = np.zeros((2, 256), np.float32)
    y[:, :240] = case["counts"]
    mask = np.repeat(np.arange(256)[None] < 240, 2, axis=0)
    key = jax.random.fold_in(jax.random.PRNGKey(0), store.group_seed(store.group_id(case["group"])))
    keys = np.stack([np.asarray(key), np.asarray(jax.random.fold_in(key, 1))])
    z_map, con = BatchSampler(poisson_hmm, {"num_states": 2}).find_map(keys, y, mask)

    # Reference: BFGS from the true parameters.
    kw = dict(num_states=2, mask=mask[0])
    _, unravel = jax.flatten_util.ravel_pytree({k: v[0] for k, v in z_map.items()})
    truth = {"rate": np.array([case["truth"]["rate_0"], case["truth"]["rate_1"]]),
             "transition": np.array([[1 - case["truth"]["p01"], case["truth"]["p01"]],
                                     [case["truth"]["p10"], 1 - case["truth"]["p10"]]])}
    start, _ = jax.flatten_util.ravel_pytree(
        unconstrain_fn(poisson_hmm, (y[0],), kw, truth))
    fun = jax.jit(jax.value_and_grad(
        lambda f: potential_energy(poisson_hmm, (y[0],), kw, unravel(f))))
    ref = optimize.minimize(lambda f: tuple(np.asarray(a, np.float64) for a in fun(f)),
                            np.asarray(start, np.float64), jac=True, method="BFGS")
    for b in range(2):
        u_found = float(fun(jax.flatten_util.ravel_pytree(
            {k: v[b] for k, v in z_map.items()})[0])[0])
        assert u_found <= ref.fun + 1e-2
        np.testing.assert_allclose(con["rate"][b], truth["rate"], rtol=0.2)


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
