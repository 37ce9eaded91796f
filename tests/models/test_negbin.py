"""The fast negative-binomial log pmf: float32 accuracy against float64, gradients
against jax.grad of NumPyro's form, and the elasticity model's density unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import initialize_model
from scipy.special import gammaln

import raybayes.models.elasticity as elasticity
from raybayes.datasets import load_orange_juice, prepare_elasticity_data
from raybayes.models.negbin import NegativeBinomialLogMean, log_negbin_coefficient


@pytest.fixture(scope="module")
def orange_juice():
    data = prepare_elasticity_data(load_orange_juice())
    rng = np.random.default_rng(0)
    # Log means near the data, as at a posterior draw: log(y + 1/2) plus noise of
    # the size of the model's residual sd.
    eta = np.log(data.units + 0.5) + 0.4 * rng.standard_normal(data.num_obs)
    return data.units, eta.astype(np.float32)


def log_pmf64(y, eta, phi):
    y, eta = np.asarray(y, np.float64), np.asarray(eta, np.float64)
    return (
        gammaln(y + phi)
        - gammaln(phi)
        - gammaln(y + 1)
        + phi * np.log(phi)
        + y * eta
        - (phi + y) * np.logaddexp(np.log(phi), eta)
    )


@pytest.mark.parametrize("phi", [0.4, 4.0, 60.0])
def test_log_density_matches_float64_on_orange_juice(orange_juice, phi):
    units, eta = orange_juice  # 106,139 counts up to 716,416
    ours = NegativeBinomialLogMean(jnp.asarray(eta), jnp.float32(phi)).log_prob(units)
    assert ours.dtype == jnp.float32
    ref = log_pmf64(units, eta, phi)
    total = float(jnp.sum(ours))
    assert abs(total - ref.sum()) <= 1e-5 * abs(ref.sum()), (total, ref.sum())
    # Row by row too: the float32 rounding of values of this size, not more.
    err = np.abs(np.asarray(ours, np.float64) - ref)
    assert err.max() <= 2e-6 * np.abs(ref).max() + 1e-4, err.max()


def test_gradient_matches_jax_grad_of_numpyro_form(orange_juice):
    units, eta = orange_juice
    phi = 3.0

    def ours(eta, phi):
        return jnp.sum(NegativeBinomialLogMean(eta, phi).log_prob(units))

    def reference(eta, phi):
        return jnp.sum(dist.NegativeBinomial2(jnp.exp(eta), phi).log_prob(units))

    g_eta, g_phi = jax.grad(ours, argnums=(0, 1))(jnp.asarray(eta), jnp.float32(phi))
    with jax.enable_x64(True):
        r_eta, r_phi = jax.grad(reference, argnums=(0, 1))(
            jnp.asarray(eta, jnp.float64), jnp.float64(phi)
        )
    r_eta, r_phi = np.asarray(r_eta), float(r_phi)
    # d/d eta = y - (y + phi) mu / (mu + phi): up to |y| in size.
    np.testing.assert_allclose(np.asarray(g_eta), r_eta, rtol=1e-4, atol=1e-3 * phi)
    assert abs(float(g_phi) - r_phi) <= 1e-4 * np.sum(np.abs(np.asarray(units) > 0)), (
        float(g_phi),
        r_phi,
    )


def test_coefficient_small_and_large_counts_and_its_derivative():
    y = np.array([0, 1, 2, 7, 8, 9, 50, 4416, 716416])
    for phi in (0.05, 1.0, 7.5, 300.0):
        v = log_negbin_coefficient(jnp.asarray(y), jnp.float32(phi))
        ref = gammaln(y + phi) - gammaln(phi) - gammaln(y + 1.0)
        # float32: relative 1e-5 (for phi >> y, (phi - 1) log(y + phi) cancels
        # against lgamma(phi)).
        np.testing.assert_allclose(np.asarray(v), ref, rtol=1e-5, atol=2e-5)
        d = jax.vmap(jax.grad(log_negbin_coefficient, argnums=1), (0, None))(
            jnp.asarray(y, jnp.float32), jnp.float32(phi)
        )
        h = 1e-4 * phi
        fd = (
            gammaln(y + phi + h)
            - gammaln(phi + h)
            - gammaln(y + phi - h)
            + gammaln(phi - h)
        ) / (2 * h)
        np.testing.assert_allclose(np.asarray(d), fd, rtol=1e-4, atol=1e-4)


def test_sampling_matches_moments():
    d = NegativeBinomialLogMean(jnp.log(jnp.array([3.0, 200.0])), jnp.array([2.0, 5.0]))
    draws = np.asarray(d.sample(jax.random.PRNGKey(0), (20000,)))
    assert draws.shape == (20000, 2) and np.issubdtype(draws.dtype, np.integer)
    mean, var = np.asarray(d.mean), np.asarray(d.variance)
    # Means within 5 standard errors.
    assert np.all(np.abs(draws.mean(0) - mean) < 5 * np.sqrt(var / 20000))


def test_elasticity_density_unchanged_against_numpyro_form(monkeypatch):
    data = prepare_elasticity_data(load_orange_juice(stores=3))
    kwargs = data.model_kwargs()

    def potential_at(z_of):
        info = initialize_model(
            jax.random.PRNGKey(0), elasticity.elasticity_model, model_kwargs=kwargs
        )
        z = z_of(info.param_info.z)
        return jax.value_and_grad(info.potential_fn)(z)

    def point(z):
        z = {k: 0.1 * jnp.ones_like(v) for k, v in z.items()}
        z["mu_delta"] = jnp.float32(np.log(data.units.mean()))
        z["concentration"] = jnp.float32(np.log(4.0))
        return z

    v_ours, g_ours = potential_at(point)
    monkeypatch.setattr(
        elasticity,
        "NegativeBinomialLogMean",
        lambda eta, phi: dist.NegativeBinomial2(jnp.exp(eta), phi),
    )
    v_ref, g_ref = potential_at(point)
    assert abs(float(v_ours) - float(v_ref)) <= 1e-5 * abs(float(v_ref))
    for name in g_ref:
        np.testing.assert_allclose(
            g_ours[name],
            g_ref[name],
            rtol=1e-3,
            atol=1e-4 * float(jnp.max(jnp.abs(g_ref[name]))) + 1e-3,
            err_msg=name,
        )
