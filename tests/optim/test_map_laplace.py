"""Distributed MAP and the arrowhead Laplace approximation: exact and ground-truth checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import reparam
from numpyro.infer.reparam import LocScaleReparam

from conjugate_normal import hierarchical_normal_model, posterior, simulate
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.distributed import ShardedObjective
from raybayes.models.elasticity import elasticity_model as _centred_elasticity_model
from raybayes.optim import find_map, laplace_approximation

# The joint density of a centred hierarchical model is unbounded as a scale goes to
# zero, so its MAP is taken in the non-centred parameterization (the posterior is
# the same).
elasticity_model = reparam(
    _centred_elasticity_model,
    config={"gamma": LocScaleReparam(0), "delta": LocScaleReparam(0)},
)

S0, TAU, SIGMA = 2.0, 0.7, 1.3


# Conjugate: every conditional is Gaussian, so the Laplace approximation is exact.
hierarchical_normal = hierarchical_normal_model(S0, TAU, SIGMA)


@pytest.fixture(scope="module")
def conjugate():
    kwargs = simulate(7, (2, 9), 1.0, TAU, SIGMA)
    mean, prec, A = posterior(kwargs, S0, TAU, SIGMA)
    # Marginal likelihood: y ~ N(0, s0^2 11' + tau^2 ZZ' + sigma^2 I).
    y, n, Z = kwargs["y"].astype(np.float64), len(kwargs["y"]), A[:, 1:]
    marg_cov = S0**2 * np.ones((n, n)) + TAU**2 * Z @ Z.T + SIGMA**2 * np.eye(n)
    sign, logdet = np.linalg.slogdet(marg_cov)
    log_ml = -0.5 * (n * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(marg_cov, y))
    return kwargs, mean, np.linalg.inv(prec), float(log_ml)


@pytest.fixture(scope="module")
def conjugate_fit(conjugate):
    kwargs = conjugate[0]
    return laplace_approximation(
        hierarchical_normal,
        model_kwargs=kwargs,
        num_shards=3,
        backend="local",
        num_samples=4000,
        seed=1,
        tol=1e-12,
        gtol=1e-6,
        progress_bar=False,
    )


def test_map_is_the_analytic_posterior_mode(conjugate, conjugate_fit):
    _, mean, _, _ = conjugate
    r = conjugate_fit.map
    assert r.status in ("converged", "line_search_failed")  # float32 flat top
    assert r.grad_norm < 1e-3
    np.testing.assert_allclose(float(r.params["mu"]), mean[0], atol=2e-3)
    np.testing.assert_allclose(np.asarray(r.params["theta"]), mean[1:], atol=2e-3)


def test_laplace_is_exact_for_the_conjugate_model(conjugate, conjugate_fit):
    _, mean, cov, log_ml = conjugate
    fit = conjugate_fit
    # Global covariance = the Schur complement's inverse = analytic Var(mu | y).
    np.testing.assert_allclose(fit.global_covariance[0, 0], cov[0, 0], rtol=2e-3)
    assert fit.num_not_positive_definite == 0
    # Laplace log marginal likelihood is exact for a Gaussian model.
    assert abs(fit.log_marginal_likelihood - log_ml) < 2e-3 * abs(log_ml)
    post = fit.idata.posterior
    draws = np.concatenate(
        [
            post["mu"].values.reshape(-1, 1),
            post["theta"].values.reshape(-1, cov.shape[0] - 1),
        ],
        axis=1,
    )
    n = draws.shape[0]
    sd = np.sqrt(np.diag(cov))
    z_mean = (draws.mean(0) - mean) / (sd / np.sqrt(n))
    assert np.max(np.abs(z_mean)) < 4.0  # 0.9999 normal quantile over 8 checks
    rel_var = draws.var(0) / np.diag(cov) - 1
    assert np.max(np.abs(rel_var)) < 4.0 * np.sqrt(2.0 / n)
    # Cross-covariance mu-theta_j (the arrowhead's off-diagonal) is reproduced.
    emp = np.cov(draws.T)
    assert (
        np.max(np.abs(emp[0, 1:] - cov[0, 1:]))
        < 4.0 * np.sqrt(cov[0, 0]) * sd[1:].max() / np.sqrt(n) * 1.5
    )
    assert post["theta"].dims == ("chain", "draw", "groups")


def test_draws_do_not_depend_on_the_number_of_shards(conjugate, conjugate_fit):
    kwargs = conjugate[0]
    one = laplace_approximation(
        hierarchical_normal,
        model_kwargs=kwargs,
        num_shards=1,
        backend="local",
        num_samples=4000,
        seed=1,
        tol=1e-12,
        gtol=1e-6,
        progress_bar=False,
    )
    a = one.idata.posterior["theta"].values
    b = conjugate_fit.idata.posterior["theta"].values
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_line_search_failure_is_reported_not_raised():
    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        # The log density turns NaN past mu = 1, before the optimum at 3.
        numpyro.factor("f", jnp.where(mu < 1.0, -((mu - 3.0) ** 2), jnp.nan))

    with ShardedObjective(model, {}, partition=None, num_shards=1) as objective:
        r = find_map(objective, progress_bar=False, max_steps=50)
    assert not r.converged
    assert r.status in ("non_finite", "line_search_failed")
    assert float(r.params["mu"]) < 1.0


@pytest.mark.slow
def test_elasticity_map_laplace_recovers_the_true_elasticities():
    df, truth = simulate_elasticity(
        num_categories=3, num_products=60, num_weeks=156, seed=5
    )
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    fit = laplace_approximation(
        elasticity_model,
        model_kwargs=data.model_kwargs(),
        num_shards=2,
        backend="local",
        num_samples=500,
        progress_bar=False,
        max_steps=500,
        tol=1e-10,
    )
    beta = fit.idata.posterior["beta"].values.reshape(500, -1)
    true = truth["beta"]
    rmse = np.sqrt(np.mean((beta.mean(0) - true) ** 2))
    # Predicting each product by its category's true mean gives sd(beta | category).
    baseline = np.sqrt(np.mean((truth["beta_category"][np.arange(60) % 3] - true) ** 2))
    assert rmse < 0.75 * baseline  # seen: 0.29 vs 0.48
    lo, hi = np.quantile(beta, [0.05, 0.95], axis=0)
    coverage = np.mean((lo <= true) & (true <= hi))
    assert coverage > 0.75  # nominal 0.9; 60 products, binomial sd 0.04
    assert np.isfinite(fit.log_marginal_likelihood)


def _eight_schools(sigma, y=None):
    """Non-centred eight schools (Rubin 1981): a curved ridge in (tau, theta_tilde)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def test_newton_polish_reaches_the_mode_from_an_indefinite_start():
    from scipy import optimize

    from raybayes.core import Partition
    from raybayes.optim import newton_polish

    kwargs = dict(
        sigma=np.array([15.0, 10, 16, 11, 9, 11, 10, 18]),
        y=np.array([28.0, 8, -3, 7, -1, 1, 18, 12]),
    )
    partition = Partition("schools", entity_args=("sigma", "y"))
    with ShardedObjective(
        _eight_schools, kwargs, partition=partition, num_shards=2
    ) as objective:
        # mu = 0, log tau = 3, theta_tilde = 2: far up the ridge, where the Hessian
        # of the negative log joint is indefinite
        start = np.r_[0.0, 3.0, np.full(8, 2.0)]
        with jax.enable_x64(True):
            f = lambda x: objective.value_and_grad(np.asarray(x))[0]  # noqa: E731
            eps = 1e-4
            H = np.array(
                [
                    [
                        (
                            f(start + eps * (np.eye(10)[i] + np.eye(10)[j]))
                            - f(start + eps * (np.eye(10)[i] - np.eye(10)[j]))
                            - f(start - eps * (np.eye(10)[i] - np.eye(10)[j]))
                            + f(start - eps * (np.eye(10)[i] + np.eye(10)[j]))
                        )
                        / (4 * eps**2)
                        for j in range(10)
                    ]
                    for i in range(10)
                ]
            )
        assert np.linalg.eigvalsh(0.5 * (H + H.T))[0] < 0
        rough = find_map(objective, init=start, max_steps=1, progress_bar=False)
        polished = newton_polish(objective, rough, max_steps=40, gtol=1e-7)
        ref = optimize.minimize(
            objective.value_and_grad,
            start,
            jac=True,
            method="L-BFGS-B",
            options=dict(ftol=1e-15, gtol=1e-10, maxiter=5000),
        )
    assert polished.status == "converged", polished.message
    assert polished.grad_norm <= 1e-7
    np.testing.assert_allclose(polished.x, ref.x, atol=1e-5)
    assert polished.loss <= ref.fun + 1e-9


def _imputation_model(y, y_mask):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=y_mask)


@pytest.mark.parametrize("num_shards", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_laplace_with_obs_mask_imputation_is_exact(num_shards):
    """``obs_mask``: the observed rows of ``y_unobserved`` are masked out (flat).

    The model is Gaussian, so the Laplace approximation is exact: mu | y is
    N(sum(y_obs) / (1 + n), 1 / (1 + n)), a missing y_j | y is N(that mean,
    1 + 1 / (1 + n)), and the marginal likelihood is N(y_obs; 0, I + 11'). This
    once looped for ever (a singular local block per observed row).
    """
    rng = np.random.default_rng(3)
    y = rng.normal(0.7, 1.0, size=10)
    mask = np.ones(10, bool)
    mask[[1, 4, 8]] = False
    n, y_obs = int(mask.sum()), y[mask]
    post_mean, post_var = y_obs.sum() / (1 + n), 1.0 / (1 + n)
    cov = np.eye(n) + np.ones((n, n))
    quad = y_obs @ np.linalg.solve(cov, y_obs)
    log_ml = -0.5 * (n * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1] + quad)
    num_samples = 4000
    r = laplace_approximation(
        _imputation_model,
        model_kwargs=dict(y=np.where(mask, y, 0.0), y_mask=mask),
        num_shards=num_shards,
        backend="local",
        num_samples=num_samples,
        progress_bar=False,
    )
    assert r.num_not_positive_definite == 0
    np.testing.assert_allclose(r.global_covariance, [[post_var]], rtol=1e-6)
    assert r.log_marginal_likelihood == pytest.approx(log_ml, rel=1e-6)
    missing = np.asarray(r.idata.posterior["y_unobserved"])[0][:, ~mask]  # (D, 3)
    sd = np.sqrt(1 + post_var)
    mc = 4 * sd / np.sqrt(num_samples)  # 4 Monte Carlo errors of a mean
    np.testing.assert_allclose(missing.mean(0), post_mean, atol=mc)
    # the standard error of a Gaussian sample's sd is sd / sqrt(2 D)
    np.testing.assert_allclose(missing.std(0), sd, atol=mc / np.sqrt(2))
