"""The low-rank plus diagonal mass matrix: the estimate, its map, and NUTS with it."""

import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from interrupted_runs import interrupted_then_resumed
from raybayes.errors import ConfigurationError
from raybayes.mcmc.mass import (
    fisher_low_rank,
    from_unit,
    grad_from_unit,
    identity_mass,
    inverse_mass_matrix,
    to_unit,
)


def _correlated_cov(d, seed=0, strength=25.0):
    """A covariance with two strong directions on top of a varied diagonal."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, 2))
    return np.diag(rng.uniform(0.5, 2.0, d) ** 2) + strength * a @ a.T


def test_estimate_recovers_a_gaussian_covariance():
    # For a Gaussian, draws and gradients (-P x) determine the covariance: the
    # preconditioned covariance L^-1 C L^-T must be near the identity, while a
    # diagonal preconditioner leaves the condition number in the hundreds.
    d = 30
    cov = _correlated_cov(d)
    rng = np.random.default_rng(1)
    x = rng.multivariate_normal(np.zeros(d), cov, size=400)
    g = -x @ np.linalg.inv(cov)
    mass = fisher_low_rank(x, g, max_rank=8)
    sigma = inverse_mass_matrix(mass)
    chol_inv = np.linalg.inv(np.linalg.cholesky(sigma))
    cond = np.linalg.cond(chol_inv @ cov @ chol_inv.T)
    sd = np.sqrt(np.diag(cov))
    cond_diag = np.linalg.cond(cov / np.outer(sd, sd))
    assert cond_diag > 100
    # Eigenvalues in [1/2, 2] are taken as 1 by design, so up to ~4 remains.
    assert cond < 10
    assert 2 <= mass.rank <= 8
    assert mass.vectors.shape == (d, 8)


def test_diagonal_is_exact_for_independent_gaussian():
    # sd(x)/sd(g) = s^2 for x ~ N(0, s^2), g = -x / s^2 (any n >= 3).
    s = np.array([0.1, 1.0, 30.0])
    x = np.random.default_rng(2).normal(size=(50, 3)) * s
    mass = fisher_low_rank(x, -x / s**2, max_rank=2)
    np.testing.assert_allclose(mass.scale, s, rtol=1e-4)
    np.testing.assert_allclose(np.diag(inverse_mass_matrix(mass)), s**2, rtol=1e-3)


def test_estimate_keeps_positive_eigenvalues_when_scales_span_many_decades():
    # Draw and gradient scales from e^-8 to e^3 that do not match (as early in a
    # warmup) and a run of repeated draws (NUTS rejections): the SPD mean loses
    # its smallest eigenvalues to rounding (0 or below). Those directions must be
    # left at 1, not kept with a non-positive eigenvalue (a singular mass matrix,
    # NaN in the sampler).
    rng = np.random.default_rng(0)
    n, d = 100, 600
    x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-8, 3, d))
    x[50:60] = x[49]
    g = -x / np.exp(rng.uniform(-8, 3, d)) ** 2 * rng.uniform(0.5, 2.0, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = fisher_low_rank(x, g)
    assert np.all(np.isfinite(est.values)) and np.all(est.values > 0)
    assert np.all(np.isfinite(est.vectors))


def test_map_inverse_and_gradient():
    d = 12
    cov = _correlated_cov(d, seed=3)
    rng = np.random.default_rng(4)
    x = rng.multivariate_normal(np.ones(d), cov, size=200)
    mass = fisher_low_rank(x, -(x - 1.0) @ np.linalg.inv(cov), max_rank=4)
    y = jnp.asarray(rng.normal(size=d), jnp.float32)
    np.testing.assert_allclose(to_unit(mass, from_unit(mass, y)), y, atol=1e-4)
    # L L^T is the inverse mass matrix (float32: relative error ~1e-6).
    jac = np.asarray(jax.jacobian(lambda v: from_unit(mass, v))(y), np.float64)
    sigma = inverse_mass_matrix(mass)
    np.testing.assert_allclose(jac @ jac.T, sigma, atol=1e-4 * np.abs(sigma).max())
    # grad_y f(x(y)) mapped back is grad_x f.
    f = lambda v: jnp.sum(jnp.sin(v) * jnp.arange(d))  # noqa: E731
    gy = jax.grad(lambda v: f(from_unit(mass, v)))(y)
    gx = jax.grad(f)(from_unit(mass, y))
    np.testing.assert_allclose(grad_from_unit(mass, gy), gx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(draws=np.zeros((5, 3)), grads=np.zeros((5, 4))), "one shape"),
        (dict(draws=np.zeros((2, 3)), grads=np.zeros((2, 3))), "at least 3"),
        (dict(draws=np.full((5, 3), np.nan), grads=np.zeros((5, 3))), "non-finite"),
        (dict(draws=np.ones((5, 3)), grads=np.ones((5, 3)), cutoff=1.0), "cutoff"),
    ],
)
def test_estimate_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fisher_low_rank(**kwargs)


def test_identity_mass_is_the_identity():
    mass = identity_mass(4, 2)
    np.testing.assert_array_equal(inverse_mass_matrix(mass), np.eye(4))
    assert mass.rank == 0


D = 10
COV = _correlated_cov(D, seed=5)
CHOL = np.linalg.cholesky(COV).astype(np.float32)


def gaussian_model():
    numpyro.sample(
        "x", dist.MultivariateNormal(jnp.zeros(D), scale_tril=jnp.asarray(CHOL))
    )


# One setting for the runs of ``_run`` and the resumed runs (one compile): phases
# end at 26 and 88; chunks of 23 put the second phase's kept points (57-88) in two.
RUN = dict(num_chains=2, num_warmup=150, num_samples=300, backend="local",
           progress_bar=False)


def _run(low_rank_mass, seed=0, **kwargs):
    return raybayes.sample(
        gaussian_model, seed=seed, low_rank_mass=low_rank_mass, **RUN, **kwargs
    )


@pytest.fixture(scope="module")
def low_rank_idata():
    return _run(True)


def test_low_rank_nuts_moments_within_mcse_and_short_trajectories(low_rank_idata):
    idata = low_rank_idata
    x = idata.posterior["x"]
    sd_true = np.sqrt(np.diag(COV))
    mean_err = np.abs(x.mean(("chain", "draw")).values)
    sd_err = np.abs(x.std(("chain", "draw")).values - sd_true)
    mcse_mean = az.mcse(idata, var_names=["x"], method="mean")["x"].values
    mcse_sd = az.mcse(idata, var_names=["x"], method="sd")["x"].values
    assert np.all(mean_err < 4 * mcse_mean), (mean_err / mcse_mean).max()
    assert np.all(sd_err < 4 * mcse_sd), (sd_err / mcse_sd).max()
    # With the covariance's two strong directions captured, NUTS on this nearly
    # isotropic target takes a handful of steps; NumPyro's diagonal needs ~40.
    assert idata.attrs["low_rank_mass_rank"] >= 2
    assert idata.sample_stats["n_steps"].values.mean() < 12
    assert int(idata.sample_stats["diverging"].sum()) == 0


@pytest.mark.parametrize("num_warmup, phases", [(300, (50, 125)), (100, (20, 40)),
                                                (150, (26, 62))])
def test_low_rank_warmup_phases_add_up(num_warmup, phases):
    # The first phase (diagonal adaptation from the initial point) is the short
    # one; the two later phases share one length (one compile) and the warmup.
    from raybayes.mcmc.sampler import _low_rank_phases

    class Settings:
        low_rank_mass = 16

    Settings.num_warmup = num_warmup
    first, later = _low_rank_phases(Settings)
    assert (first, later) == phases
    assert first + 2 * later == num_warmup


@pytest.mark.slow
def test_low_rank_cuts_steps_against_diagonal():
    steps_diag = _run(False).sample_stats["n_steps"].values.mean()
    steps_low = _run(True).sample_stats["n_steps"].values.mean()
    assert steps_low < 0.5 * steps_diag, (steps_low, steps_diag)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low_rank_mass=True, dense_mass=True), "dense_mass"),
        (dict(low_rank_mass=True, num_warmup=50), "num_warmup >= 100"),
        (dict(low_rank_mass=-1), "low_rank_mass=-1"),
        (dict(low_rank_mass=True, kernel_kwargs={"step_size": 0.1}), "kernel_kwargs"),
    ],
)
def test_low_rank_bad_arguments_fail_before_compute(kwargs, match):
    kwargs = {"num_warmup": 200, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        raybayes.sample(
            gaussian_model,
            num_chains=2,
            num_samples=10,
            backend="local",
            progress_bar=False,
            **kwargs,
        )


@pytest.mark.parametrize("where", ["switch", "warmup", "sampling"])
def test_low_rank_interrupted_run_resumes_to_the_same_draws(
    low_rank_idata, where, tmp_path, monkeypatch
):
    if where == "switch":
        # one chain moved to the first estimate, the other's record still holds
        # the first phase's points (used; they must not join the second phase's)
        def stop_after(rec):
            return rec["phase"] == 1 and rec["warmup_done"] == 26
    elif where == "warmup":
        # in the second phase, with half of its kept points on disk
        def stop_after(rec):
            return rec["phase"] == 1 and len(rec["points"]) == 1
    else:

        def stop_after(rec):
            return rec["num_chunks"] == 2

    rec, got = interrupted_then_resumed(
        monkeypatch, lambda: _run(True, checkpoint_dir=tmp_path), stop_after
    )
    assert rec["masses"][1] is not None  # the first estimate came from disk
    if where != "sampling":
        assert rec["masses"][2] is None
    else:
        assert rec["masses"][2] is not None and rec["samples_done"] == 46
    np.testing.assert_array_equal(
        got.posterior["x"].values, low_rank_idata.posterior["x"].values
    )
    assert got.attrs["low_rank_mass_rank"] == low_rank_idata.attrs["low_rank_mass_rank"]
    with pytest.raises(ConfigurationError, match="low_rank_mass"):
        _run(4, checkpoint_dir=tmp_path)


@pytest.mark.slow
def test_low_rank_draws_do_not_depend_on_the_workers(ray_backend):
    # The estimate pools every chain's points in chain order at fixed warmup
    # iterations, so 2 Ray workers give the draws of one in-process worker.
    kwargs = dict(
        num_chains=3,
        num_warmup=120,
        num_samples=50,
        seed=7,
        progress_bar=False,
        low_rank_mass=4,
    )
    local = raybayes.sample(gaussian_model, backend="local", **kwargs)
    remote = raybayes.sample(
        gaussian_model, backend=ray_backend, num_workers=2, **kwargs
    )
    np.testing.assert_array_equal(
        local.posterior["x"].values, remote.posterior["x"].values
    )
    assert local.attrs["low_rank_mass_rank"] == remote.attrs["low_rank_mass_rank"]
