"""The structured SVI guide: locals conditioned on the globals.

On the conjugate hierarchical normal model the exact posterior lies in the
structured family (given ``mu`` the ``theta_j`` are independent Gaussians whose
means are linear in ``mu``), so the fitted q must be the exact posterior: its means
AND its sds. The mean-field optimum has the exact means but sds ``1 / sqrt(diag
prec)``, far too small here (strong pooling: ``tau`` small against the noise of a
few observations per group).
"""

from __future__ import annotations

import numpy as np
import optax
import pytest

import raybayes
from conjugate_normal import PARTITION, hierarchical_normal_model, posterior, simulate
from raybayes.errors import ConfigurationError

S0, TAU, SIGMA = 3.0, 0.3, 1.0
J = 8  # groups, 1 to 3 observations each
STEPS = 500

hierarchical_normal = hierarchical_normal_model(S0, TAU, SIGMA)


@pytest.fixture(scope="module")
def exact():
    """Data; the exact posterior's means, sds and covariance of ``(mu, theta)``."""
    kwargs = simulate(J, (1, 4), 1.5, TAU, SIGMA, shuffle=True)
    mean, prec, _ = posterior(kwargs, S0, TAU, SIGMA)
    cov = np.linalg.inv(prec)
    return kwargs, mean, np.sqrt(np.diag(cov)), cov, 1.0 / np.sqrt(np.diag(prec))


@pytest.fixture(scope="module")
def structured_fit(exact):
    def adam():
        return optax.adam(optax.cosine_decay_schedule(0.1, STEPS, alpha=0.02))

    return raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=exact[0],
        num_shards=2,
        partition=PARTITION,
        backend="local",
        guide="structured",
        optimizer=adam(),
        local_optimizer=adam(),
        num_particles=4,
        num_steps=STEPS,
        tol=None,
        seed=1,
        num_samples=2000,
        progress_bar=False,
        x64=True,
    )


def _q_moments(res):
    """Means and sds of q's marginals of ``(mu, theta_1..J)``, from its parameters:
    ``mu = E mu + s eps``, ``theta_j = m_j + a_j eps + l_j eps_j``; the regression
    of theta_j on mu is ``b_j = a_j / s``."""
    s_mu = res.params["scale_tril"][0, 0]
    a = res.local_params["coupling"][:, 0, 0]
    ell = res.local_params["scale_tril"][:, 0, 0]
    sd = np.concatenate([[s_mu], np.sqrt(ell**2 + a**2)])
    mean = np.concatenate([res.params["loc"], res.local_params["loc"][:, 0]])
    return mean, sd, a / s_mu


def test_structured_guide_recovers_the_exact_posterior(exact, structured_fit):
    _, mean, sd, cov, mf_sd = exact
    # The mean-field optimum underestimates every sd here by 26% or more (mu: 66%),
    # so the tolerance of 12% below tells the two families apart.
    assert np.all(mf_sd / sd < 0.75)
    q_mean, q_sd, b = _q_moments(structured_fit)
    # Tolerances: one run with 4 particles and 500 steps keeps some noise (seeds
    # 1, 2 end within 0.07 sd and 7%); the mean-field sds are 26-66% low.
    np.testing.assert_array_less(np.abs(q_mean - mean), 0.2 * sd)
    np.testing.assert_array_less(np.abs(q_sd / sd - 1.0), 0.12)
    # The coupling is the exact regression of theta_j on mu: cov / var(mu).
    np.testing.assert_allclose(b, cov[1:, 0] / cov[0, 0], atol=0.2)
    # The draws in the InferenceData follow q (2,000 draws: sd of a sd 1.6%).
    post = structured_fit.idata.posterior
    draws = np.column_stack(
        [post["mu"].values.reshape(-1), post["theta"].values.reshape(-1, J)]
    )
    np.testing.assert_array_less(
        np.abs(draws.mean(0) - q_mean), 4 * q_sd / np.sqrt(len(draws))
    )
    np.testing.assert_array_less(np.abs(draws.std(0) / q_sd - 1.0), 0.07)
    # Their correlation with mu too (which mean-field draws would lack).
    corr = np.corrcoef(draws.T)[0, 1:]
    exact_corr = cov[0, 1:] / np.sqrt(cov[0, 0] * np.diag(cov)[1:])
    np.testing.assert_allclose(corr, exact_corr, atol=0.1)
    assert structured_fit.family == "structured"
    assert structured_fit.local_params["coupling"].shape == (J, 1, 1)


@pytest.mark.slow  # two more compilations; the exact-posterior test runs by default
def test_one_and_two_shards_give_the_same_structured_fit(exact):
    fits = [
        raybayes.fit_svi(
            hierarchical_normal,
            model_kwargs=exact[0],
            num_shards=s,
            backend="local",
            partition=PARTITION,
            guide="structured",
            num_steps=40,
            tol=None,
            learning_rate=0.05,
            num_samples=20,
            progress_bar=False,
            x64=True,
        )
        for s in (1, 2)
    ]
    # Equal up to the order of the float64 sums over shards.
    np.testing.assert_allclose(fits[0].losses, fits[1].losses, rtol=1e-7)
    for name in ("loc", "scale_tril"):
        np.testing.assert_allclose(
            fits[0].params[name], fits[1].params[name], rtol=1e-7, atol=1e-12
        )
    for name in ("loc", "scale_tril", "coupling"):
        np.testing.assert_allclose(
            fits[0].local_params[name],
            fits[1].local_params[name],
            rtol=1e-7,
            atol=1e-12,
        )
    # Forty steps moved the coupling away from its start at 0.
    assert np.all(np.abs(fits[0].local_params["coupling"]) > 1e-3)
    np.testing.assert_allclose(
        fits[0].idata.posterior["theta"].values,
        fits[1].idata.posterior["theta"].values,
        rtol=1e-7,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(guide="structural"), "'structured'"),
        (dict(guide="structured", rank=0), "rank=0"),
        (dict(guide="structured", rank=2.5), "rank=2.5"),
    ],
)
def test_bad_structured_settings_are_refused_before_any_step(exact, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        raybayes.fit_svi(
            hierarchical_normal,
            model_kwargs=exact[0],
            partition=PARTITION,
            backend="local",
            num_steps=5,
            progress_bar=False,
            **kwargs,
        )
