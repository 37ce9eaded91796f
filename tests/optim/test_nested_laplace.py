"""Nested Laplace (INLA) against an exact posterior, across shard counts, bad input.

The reference is the centred eight-schools model with known sigma_j: given tau, the
pair (mu, theta) is Gaussian a posteriori, so the Laplace approximation given tau is
exact and only the integration over tau is approximated. The exact posterior of
log tau (p(y | tau) is a Gaussian density) and the mixture moments of mu and theta
are computed by quadrature on a fine grid.
"""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import stats
from scipy.special import logsumexp

from raybayes.core import Partition
from raybayes.errors import ConfigurationError
from raybayes.optim.nested_laplace import (
    central_composite_design,
    find_hyperparameters,
    nested_laplace,
)

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
MU_SD = 5.0
TAU_SCALE = 5.0
NUM_SAMPLES = 1500


def schools(sigma, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, MU_SD))
    tau = numpyro.sample("tau", dist.HalfCauchy(TAU_SCALE))
    with numpyro.plate("school", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def exact_posterior():
    """Quadrature over u = log tau: its mean and sd, the mixture mean and sd of mu
    and theta, and log p(y)."""
    u = np.linspace(-12.0, 7.0, 40001)
    tau2 = np.exp(2 * u)[:, None]
    var = tau2 + SIGMA**2  # (n, J)
    # y ~ N(0, diag(d) + c 11^T), d = tau^2 + s^2, c = mu_sd^2 (Sherman-Morrison)
    c = MU_SD**2
    inv_sum = np.sum(1.0 / var, axis=1)
    y_sum = np.sum(Y / var, axis=1)
    log_det = np.sum(np.log(var), axis=1) + np.log1p(c * inv_sum)
    quad = np.sum(Y**2 / var, axis=1) - c * y_sum**2 / (1.0 + c * inv_sum)
    log_lik = -0.5 * (Y.size * np.log(2 * np.pi) + log_det + quad)
    log_prior = stats.halfcauchy.logpdf(np.exp(u), scale=TAU_SCALE) + u
    log_joint = log_lik + log_prior
    du = u[1] - u[0]
    log_py = logsumexp(log_joint) + np.log(du)
    w = np.exp(log_joint - logsumexp(log_joint))
    # mu | tau, y and theta_j | tau, y (Gaussian)
    v_mu = 1.0 / (1.0 / MU_SD**2 + np.sum(1.0 / var, axis=1))
    m_mu = v_mu * np.sum(Y / var, axis=1)
    shrink = SIGMA**2 / var  # B_j
    m_theta = (1 - shrink) * Y + shrink * m_mu[:, None]
    v_theta = 1.0 / (1.0 / SIGMA**2 + 1.0 / tau2) + shrink**2 * v_mu[:, None]

    def mix(m, v):
        mean = np.tensordot(w, m, axes=1)
        second = np.tensordot(w, v + m**2, axes=1)
        return mean, np.sqrt(second - mean**2)

    return {
        "log_tau": (w @ u, np.sqrt(w @ u**2 - (w @ u) ** 2)),
        "mu": mix(m_mu, v_mu),
        "theta": mix(m_theta, v_theta),
        "log_py": log_py,
    }


def fit(num_shards, num_samples=NUM_SAMPLES):
    return nested_laplace(
        schools,
        model_kwargs={"sigma": SIGMA, "y": Y},
        num_shards=num_shards,
        partition=Partition("school", entity_args=("sigma", "y")),
        backend="local",
        num_samples=num_samples,
        seed=3,
        progress_bar=False,
    )


@pytest.fixture(scope="module")
def one_shard():
    return fit(1)


def test_conjugate_hierarchical_normal_matches_exact_marginals(one_shard):
    r, ref = one_shard, exact_posterior()
    assert r.hyperparameters == ["tau"]
    post = r.idata.posterior
    n = NUM_SAMPLES
    # the draws are stratified over the design: their Monte Carlo error is at most
    # that of independent draws, sd / sqrt(n) for a mean and about sd / sqrt(2 n)
    # for an sd; 4 MCSE plus 3% of the sd for the design's quadrature error
    for name, draws in [
        ("log_tau", np.log(post["tau"].values[0])),
        ("mu", post["mu"].values[0]),
        ("theta", post["theta"].values[0]),
    ]:
        mean, sd = ref[name]
        assert np.all(np.abs(draws.mean(0) - mean) < 4 * sd / np.sqrt(n) + 0.03 * sd)
        rel = np.abs(draws.std(0) / sd - 1)
        assert np.all(rel < 4 / np.sqrt(2 * n) + 0.03), (name, rel)
    # the design itself (no Monte Carlo): mean and sd of log tau
    mean, sd = ref["log_tau"]
    design_mean = r.weights @ r.design[:, 0]
    design_sd = np.sqrt(r.weights @ (r.design[:, 0] - design_mean) ** 2)
    assert abs(design_mean - mean) < 0.03 * sd
    assert abs(design_sd / sd - 1) < 0.03
    # Laplace given tau is exact, so log p(y) is exact up to the tau quadrature
    assert abs(r.log_marginal_likelihood - ref["log_py"]) < 0.02
    assert r.idata.attrs["log_marginal_likelihood"] == r.log_marginal_likelihood


@pytest.mark.slow
def test_shard_count_does_not_change_the_draws(one_shard):
    two = fit(2)  # the same seed: the same design and the same draws
    for name in ("mu", "tau", "theta"):
        np.testing.assert_allclose(
            two.idata.posterior[name].values,
            one_shard.idata.posterior[name].values,
            rtol=1e-6,
            atol=1e-8,
        )
    assert abs(two.log_marginal_likelihood - one_shard.log_marginal_likelihood) < 1e-8


@pytest.mark.slow
def test_ray_workers_give_the_in_process_answer(one_shard, ray_backend):
    """The exact gradient's shard calls (Hessian columns, tangents of the factor)
    and the kept Hessians run on Ray workers too: 2 shards on Ray, the same design
    and draws as 1 shard in-process."""
    ray_fit = nested_laplace(
        schools,
        model_kwargs={"sigma": SIGMA, "y": Y},
        num_shards=2,
        partition=Partition("school", entity_args=("sigma", "y")),
        backend=ray_backend,
        num_samples=NUM_SAMPLES,
        seed=3,
        progress_bar=False,
    )
    np.testing.assert_allclose(ray_fit.design, one_shard.design, rtol=1e-6)
    for name in ("mu", "tau", "theta"):
        np.testing.assert_allclose(
            ray_fit.idata.posterior[name].values,
            one_shard.idata.posterior[name].values,
            rtol=1e-6,
            atol=1e-8,
        )


@pytest.mark.parametrize(
    "third_derivatives",
    # forward mode compiles the derivatives of the Hessian-vector products (~25 s)
    [pytest.param("forward", marks=pytest.mark.slow), "differences"],
)
def test_exact_gradient_of_log_p_theta_matches_finite_differences(third_derivatives):
    """The implicit-function gradient of log p~(tau | y) on eight schools (2
    shards) against central differences of the values with a step of 1e-4, whose
    error is O(h^2) ~ 1e-8; and the mode's tangent dx*/dtheta against the moved
    mode."""
    from raybayes.distributed.objective import planned_objective
    from raybayes.optim.nested_laplace import _ConditionalLaplace

    with planned_objective(
        schools,
        {"sigma": SIGMA, "y": Y},
        2,
        partition=Partition("school", entity_args=("sigma", "y")),
        backend="local",
    ) as objective:
        names = [n for n, _ in objective.global_sites]
        index = np.array([names.index("tau")])
        cond = _ConditionalLaplace(
            objective, index, np.zeros(objective.size), 16, 1e-10, 50, print
        )
        cond.third_derivatives = third_derivatives
        h = 1e-4
        grads, diffs = [], []
        for log_tau in (0.5, 2.5):  # either side of the mode (about 1.5)
            theta = np.array([log_tau])
            _, mode = cond(theta)
            grad, tangents = cond.gradient(theta)
            up, moved = cond(theta + h, start=mode.x)
            down, _ = cond(theta - h, start=mode.x)
            grads.append(grad[0])
            diffs.append((up - down) / (2 * h))
            np.testing.assert_allclose(
                (moved.x - mode.x) / h, tangents[:, 0], rtol=1e-3, atol=1e-5
            )
    assert grads[0] > 0.1 and grads[1] < -0.1  # a real slope on either side
    np.testing.assert_allclose(grads, diffs, rtol=1e-6, atol=1e-7)


def test_central_composite_design_reproduces_gaussian_moments():
    for dim in (3, 5, 6):
        z, a = central_composite_design(dim)
        w = a * stats.norm.pdf(z).prod(axis=1)
        w /= w.sum()
        np.testing.assert_allclose(w @ z, 0.0, atol=1e-12)
        np.testing.assert_allclose((z * w[:, None]).T @ z, np.eye(dim), atol=1e-12)
    assert central_composite_design(5)[0].shape == (1 + 16 + 10, 5)


def test_hyperparameters_of_the_elasticity_model():
    from raybayes.datasets.elasticity import (
        prepare_elasticity_data,
        simulate_elasticity,
    )
    from raybayes.models.elasticity import elasticity_model

    df, _ = simulate_elasticity(num_categories=2, num_products=4, num_weeks=3, seed=0)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    found = find_hyperparameters(elasticity_model, model_kwargs=data.model_kwargs())
    assert found == [
        "sigma_category",
        "sigma_beta",
        "sigma_delta",
        "sigma_gamma",
        "concentration",
    ]


def poisson_rate(y):
    rate = numpyro.sample("rate", dist.Exponential(1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Poisson(rate), obs=y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "no Gaussian latent site"),
        ({"hyperparameters": ["rate"]}, "no Gaussian latent site"),
    ],
)
def test_model_without_latent_gaussian_field_is_refused(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        nested_laplace(
            poisson_rate, model_kwargs={"y": np.ones(3)}, backend="local", **kwargs
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"design": "sobol"}, "design='sobol'; use one of"),
        ({"num_samples": 0}, "num_samples=0"),
        ({"hyperparameters": "tau"}, "pass a list of site names"),
        ({"hyperparameters": ["nope"]}, r"\['nope'\] are not latent sites"),
        ({"hyperparameters": ["theta"]}, "local sites"),
        ({"seed": 1.5}, "not an integer"),
    ],
)
def test_bad_arguments_fail_before_any_compute(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        nested_laplace(
            schools,
            model_kwargs={"sigma": SIGMA, "y": Y},
            num_shards=2,
            partition=Partition("school", entity_args=("sigma", "y")),
            backend="local",
            progress_bar=False,
            **kwargs,
        )
