"""NUTS through raybayes against reference posteriors from posteriordb.

Each Stan model is translated into NumPyro, run through :func:`raybayes.sample`, and
every reported parameter's posterior mean and sd is compared with the reference
(10 chains x 1,000 draws of Stan NUTS). The tolerance is z = 3.29 (the 0.999 normal
quantile) times the combined Monte Carlo error: ArviZ's MCSE of our estimate and the
reference's own error, about ``ref_sd / 100``::

    |mean - ref_mean| <= z * sqrt(mcse_mean^2 + (ref_sd / 100)^2)
    |sd   - ref_sd|   <= z * sqrt(mcse_sd^2   + (ref_sd / 100)^2)

Data and reference summaries: tests/data/posteriordb (see its README).
"""

from __future__ import annotations

import itertools
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

import raybayes

Z = 3.29  # 0.999 quantile of the standard normal
RHAT_MAX = 1.01


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def load_posterior(data_dir, name):
    folder = data_dir / "posteriordb" / name
    data = json.loads((folder / "data.json").read_text())
    reference = json.loads((folder / "summary.json").read_text())
    return data, reference


def compare_with_reference(idata, reference):
    """Every reference parameter's mean and sd, and R-hat; returns the failures."""
    az = _arviz()
    failures, rows = [], []
    for param in reference["param_order"]:
        ref = reference["stats"][param]
        match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", param)
        name, index = match.group(1), match.group(2)
        draws = idata.posterior[name].values
        if index is not None:
            draws = draws[..., int(index) - 1]  # Stan is 1-based
        assert draws.ndim == 2, (param, draws.shape)
        draws = draws.astype(np.float64)
        mean, sd = draws.mean(), draws.std(ddof=1)
        mcse_mean = float(az.mcse(draws, method="mean"))
        mcse_sd = float(az.mcse(draws, method="sd"))
        rhat = float(az.rhat(draws))
        ref_err = ref["sd"] / 100
        tol_mean = Z * np.hypot(mcse_mean, ref_err)
        tol_sd = Z * np.hypot(mcse_sd, ref_err)
        rows.append(
            f"{param:>10}: mean {mean:9.4f} vs {ref['mean']:9.4f} (tol {tol_mean:.4f}),"
            f" sd {sd:8.4f} vs {ref['sd']:8.4f} (tol {tol_sd:.4f}), r_hat {rhat:.4f}"
        )
        if abs(mean - ref["mean"]) > tol_mean:
            failures.append(f"{param} mean")
        if abs(sd - ref["sd"]) > tol_sd:
            failures.append(f"{param} sd")
        if not rhat < RHAT_MAX:
            failures.append(f"{param} r_hat")
    return failures, "\n".join(rows)


class Flat(dist.ImproperUniform):
    """Stan's implicit flat prior on a constrained parameter (log density 0).

    Unlike :class:`numpyro.distributions.ImproperUniform` it can be drawn from
    (uniformly on (-2, 2) in the unconstrained space, as NumPyro's ``init_to_uniform``
    does), because :func:`raybayes.sample` traces the model once with a seed before
    sampling; see ``test_improper_uniform_model_can_be_sampled``.
    """

    def __init__(self, support, event_shape=()):
        super().__init__(support, batch_shape=(), event_shape=event_shape)

    def sample(self, key, sample_shape=()):
        transform = biject_to(self.support)
        shape = transform.inverse_shape(
            sample_shape + self.batch_shape + self.event_shape
        )
        return transform(jax.random.uniform(key, shape, minval=-2.0, maxval=2.0))


# -- eight_schools-eight_schools_noncentered -------------------------------------------


def eight_schools_noncentered(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", theta_trans * tau + mu)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_eight_schools_noncentered_on_two_ray_workers(data_dir, ray_backend):
    data, reference = load_posterior(
        data_dir, "eight_schools-eight_schools_noncentered"
    )
    sigma = np.asarray(data["sigma"], dtype=np.float32)
    y = np.asarray(data["y"], dtype=np.float32)
    idata = raybayes.sample(
        eight_schools_noncentered,
        sigma,
        model_kwargs={"y": y},
        num_chains=4,
        num_warmup=1000,
        num_samples=1000,
        seed=1,
        target_accept_prob=0.95,  # as in the reference (adapt_delta = 0.95)
        backend=ray_backend,
        num_workers=2,
        progress_bar=False,
    )
    failures, table = compare_with_reference(idata, reference)
    print(table)
    assert not failures, f"{failures}\n{table}"
    assert int(idata.sample_stats["diverging"].sum()) <= 8  # 0.2% of 4,000 draws


# -- earnings-logearn_interaction_z ----------------------------------------------------


def logearn_interaction_z(z_height, male, inter, log_earn=None):
    beta = numpyro.sample("beta", Flat(constraints.real_vector, event_shape=(4,)))
    sigma = numpyro.sample("sigma", Flat(constraints.positive))
    mean = beta[0] + beta[1] * z_height + beta[2] * male + beta[3] * inter
    with numpyro.plate("obs", z_height.shape[0]):
        numpyro.sample("log_earn", dist.Normal(mean, sigma), obs=log_earn)


def test_earnings_logearn_interaction_z(data_dir):
    data, reference = load_posterior(data_dir, "earnings-logearn_interaction_z")
    earn = np.asarray(data["earn"], dtype=np.float64)
    height = np.asarray(data["height"], dtype=np.float64)
    male = np.asarray(data["male"], dtype=np.float64)
    z_height = (height - height.mean()) / height.std(ddof=1)  # Stan's sd is n - 1
    args = (z_height, male, z_height * male)
    idata = raybayes.sample(
        logearn_interaction_z,
        *(a.astype(np.float32) for a in args),
        model_kwargs={"log_earn": np.log(earn).astype(np.float32)},
        num_chains=4,
        num_warmup=300,
        num_samples=700,
        seed=2,
        backend="local",
        progress_bar=False,
    )
    failures, table = compare_with_reference(idata, reference)
    print(table)
    assert not failures, f"{failures}\n{table}"
    assert idata.posterior["beta"].shape == (4, 700, 4)


# -- hmm_example-hmm_example -----------------------------------------------------------


def hmm_log_likelihood(log_init, log_trans, log_emission):
    """log p(y_1..T) of an HMM by the forward algorithm, normalized at every step.

    Args:
        log_init: ``(K,)`` log initial state probabilities.
        log_trans: ``(K, K)`` log transition matrix, rows = from-state.
        log_emission: ``(T, K)`` log p(y_t | state k).

    Returns:
        The scalar log likelihood: the sum of the log normalizing constants.
    """

    def step(log_alpha, log_em_t):
        log_pred = logsumexp(log_alpha[:, None] + log_trans, axis=0)
        unnormalized = log_pred + log_em_t
        log_c = logsumexp(unnormalized)
        return unnormalized - log_c, log_c

    first = log_init + log_emission[0]
    log_c0 = logsumexp(first)
    _, log_cs = jax.lax.scan(step, first - log_c0, log_emission[1:])
    return log_c0 + log_cs.sum()


def hmm_example(y, num_states=2):
    """Two-state Gaussian HMM; no initial-state term in Stan, i.e. a uniform start."""
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(num_states)))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(num_states)))
    mu = numpyro.sample(
        "mu", Flat(constraints.positive_ordered_vector, event_shape=(num_states,))
    )
    numpyro.factor(
        "mu_prior",
        dist.Normal(3.0, 1.0).log_prob(mu[0]) + dist.Normal(10.0, 1.0).log_prob(mu[1]),
    )
    log_trans = jnp.log(jnp.stack([theta1, theta2]))
    log_emission = dist.Normal(mu, 1.0).log_prob(y[:, None])
    log_init = jnp.full(num_states, -jnp.log(num_states))
    numpyro.factor("log_lik", hmm_log_likelihood(log_init, log_trans, log_emission))


def test_hmm_forward_matches_enumeration():
    rng = np.random.default_rng(0)
    num_states, num_steps = 3, 6
    init = rng.dirichlet(np.ones(num_states))
    trans = rng.dirichlet(np.ones(num_states), size=num_states)
    # Far-apart emissions exercise the normalization (raw probabilities ~ e^-200).
    log_em = rng.normal(-200.0, 30.0, size=(num_steps, num_states))
    terms = []
    for path in itertools.product(range(num_states), repeat=num_steps):
        lp = np.log(init[path[0]]) + log_em[0, path[0]]
        for t in range(1, num_steps):
            lp += np.log(trans[path[t - 1], path[t]]) + log_em[t, path[t]]
        terms.append(lp)
    exact = np.logaddexp.reduce(terms)
    got = hmm_log_likelihood(
        jnp.log(jnp.asarray(init)), jnp.log(jnp.asarray(trans)), jnp.asarray(log_em)
    )
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), exact, rtol=1e-5)


@pytest.mark.slow  # tests/models/test_hmm.py samples the same posterior by default
def test_hmm_example(data_dir):
    data, reference = load_posterior(data_dir, "hmm_example-hmm_example")
    assert data["K"] == 2
    y = np.asarray(data["y"], dtype=np.float32)
    idata = raybayes.sample(
        hmm_example,
        y,
        num_chains=4,
        num_warmup=400,
        num_samples=800,
        seed=3,
        backend="local",
        progress_bar=False,
    )
    mu = idata.posterior["mu"].values
    assert (mu > 0).all() and (mu[..., 0] < mu[..., 1]).all()
    failures, table = compare_with_reference(idata, reference)
    print(table)
    assert not failures, f"{failures}\n{table}"


# -- a known limitation ----------------------------------------------------------------


def model_with_improper_prior(y):
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_improper_uniform_model_can_be_sampled():
    idata = raybayes.sample(
        model_with_improper_prior,
        np.array([0.5, 1.5], dtype=np.float32),
        num_chains=1,
        num_warmup=20,
        num_samples=20,
        backend="local",
        progress_bar=False,
    )
    assert idata.posterior["mu"].shape == (1, 20)
