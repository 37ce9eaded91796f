"""The pure one-model functions of the fleet sampler against a conjugate Gaussian model."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from raybayes.fleet.sampler import (
    LaplaceApproximation,
    MapState,
    NutsInfo,
    NutsSettings,
    SeriesModel,
    WarmupState,
    find_map,
    laplace_fit,
    map_init,
    map_step,
    nuts_draws,
    nuts_kernel,
    warmup,
    warmup_init,
    warmup_step,
)

PRIOR_SD = 10.0


def gaussian_mean(y, mask=None, covariates=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with numpyro.plate("time", mask.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0).mask(mask), obs=y)


def _data():
    y = np.random.default_rng(0).normal(3.0, 1.0, 40).astype(np.float32)
    mask = np.ones(40, bool)
    mask[30:] = False
    precision = mask.sum() + PRIOR_SD**-2
    return (
        (jnp.asarray(y), jnp.asarray(mask), None),
        float((y * mask).sum() / precision),
        float(precision),
    )


def test_map_and_laplace_find_the_exact_posterior():
    series = SeriesModel(gaussian_mean, {})
    data, mean, precision = _data()
    z0 = {"mu": jnp.zeros(())}
    state = map_init(z0)
    assert isinstance(state, MapState)
    new, info = map_step(series, data, state)
    assert bool(info.grad_is_finite)
    assert series.potential(new.position, *data) < series.potential(z0, *data)
    z = find_map(series, z0, data, num_steps=300)
    assert abs(float(z["mu"]) - mean) < 0.05
    _, unravel = jax.flatten_util.ravel_pytree(z0)
    approx = laplace_fit(lambda f: series.potential(unravel(f), *data), z0, 3)
    assert isinstance(approx, LaplaceApproximation) and bool(approx.converged)
    # The posterior is Gaussian: one Newton step lands on the mode, H is exact.
    np.testing.assert_allclose(approx.position, [mean], rtol=1e-4)
    np.testing.assert_allclose(approx.eigenvalues, [precision], rtol=1e-4)


def test_warmup_and_draws_follow_the_init_step_contract():
    series = SeriesModel(gaussian_mean, {})
    data, mean, precision = _data()
    kernel = nuts_kernel(series)
    settings = NutsSettings(
        num_warmup=100, target_accept_prob=0.8, max_tree_depth=6, laplace_mass=True
    )
    key = jax.random.PRNGKey(1)
    inv_mass = jnp.eye(1) / precision
    state = warmup_init(
        kernel, settings, key, {"mu": jnp.asarray(mean)}, inv_mass, data
    )
    assert isinstance(state, WarmupState) and state.dual_averaging is not None
    state2, info = warmup_step(kernel, settings, state, data)
    assert isinstance(info, NutsInfo) and info.position["mu"].shape == ()
    assert float(state2.hmc.adapt_state.step_size) != float(
        state.hmc.adapt_state.step_size
    )
    # Same key and settings: the same warmup (pure functions).
    run = jax.jit(warmup, static_argnums=(0, 1))
    a, grads = run(kernel, settings, key, {"mu": jnp.asarray(mean)}, inv_mass, data)
    b, _ = run(kernel, settings, key, {"mu": jnp.asarray(mean)}, inv_mass, data)
    assert float(a.adapt_state.step_size) == float(b.adapt_state.step_size)
    assert int(grads) >= settings.num_warmup
    _, zs, div, nst = jax.jit(nuts_draws, static_argnums=(0, 3))(kernel, a, data, 1000)
    x = np.asarray(zs["mu"], np.float64)
    sd = precision**-0.5
    # A Gaussian target with its exact mass matrix: nearly independent draws;
    # 4.5 standard errors with an ESS of at least a quarter of the draws.
    assert abs(x.mean() - mean) < 4.5 * sd / np.sqrt(x.size / 4)
    assert abs(x.std() / sd - 1) < 4.5 / np.sqrt(x.size / 2)
    assert not np.asarray(div).any() and np.asarray(nst).min() >= 1
