"""HMM forward algorithm, FFBS and models: exact checks and reference posteriors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import optimize

import raybayes
from raybayes.datasets.earthquakes import load_earthquakes
from raybayes.models.hmm import (
    PositiveOrdered,
    backward_sample,
    forward_filter,
    forward_log_likelihood,
    hmm_posterior_predictive,
    negbin_log_emission,
    poisson_log_emission,
    smoothed_state_probs,
    stationary_distribution,
)

DATA = Path(__file__).parents[1] / "data" / "posteriordb"
METHODS = ["sequential", "associative", "tree"]


def brute_force(init, trans, log_em):
    """log p(y) by summing over all K^T state paths (float64 NumPy)."""
    init, trans, log_em = (np.asarray(a, np.float64) for a in (init, trans, log_em))
    num_steps, k = log_em.shape
    terms = []
    for path in itertools.product(range(k), repeat=num_steps):
        lp = np.log(init[path[0]]) + log_em[0, path[0]]
        for t in range(1, num_steps):
            lp += np.log(trans[path[t - 1], path[t]]) + log_em[t, path[t]]
        terms.append(lp)
    return np.logaddexp.reduce(terms), np.array(terms)


@pytest.fixture(scope="module")
def small_hmm():
    trans = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    init = jnp.array([0.2, 0.5, 0.3])
    y = jnp.array([0.0, 4.0, jnp.nan, 9.0, 3.0, 40.0, jnp.nan])
    log_em = poisson_log_emission(y, jnp.array([0.5, 4.0, 10.0]))
    return init, trans, y, log_em


@pytest.mark.parametrize("method", METHODS)
def test_forward_matches_brute_force_with_missing(small_hmm, method):
    init, trans, _, log_em = small_hmm
    exact, _ = brute_force(init, trans, log_em)
    got = forward_log_likelihood(init, trans, log_em, method)
    assert abs(float(got) - exact) < 2e-4 * max(1.0, abs(exact))


def test_missing_observations_are_marginalized_not_dropped(small_hmm):
    init, trans, y, _ = small_hmm
    rate = jnp.array([0.5, 4.0, 10.0])
    with_nan = forward_log_likelihood(init, trans, poisson_log_emission(y, rate))
    # A trailing missing value contributes nothing: same as the shorter series.
    shorter = forward_log_likelihood(init, trans, poisson_log_emission(y[:-1], rate))
    np.testing.assert_allclose(float(with_nan), float(shorter), rtol=1e-6)
    # Dropping the interior NaN (one transition instead of two) changes the value.
    dropped = y[jnp.isfinite(y)]
    ll_dropped = forward_log_likelihood(init, trans, poisson_log_emission(dropped, rate))
    exact_dropped, _ = brute_force(init, trans, poisson_log_emission(dropped, rate))
    np.testing.assert_allclose(float(ll_dropped), exact_dropped, rtol=1e-5)
    # An explicit mask gives the same value as NaN.
    mask = jnp.isfinite(y)
    masked = forward_log_likelihood(
        init, trans, poisson_log_emission(jnp.nan_to_num(y), rate, mask)
    )
    np.testing.assert_allclose(float(masked), float(with_nan), rtol=1e-6)


def test_long_series_float32_methods_agree_and_are_finite():
    rng = np.random.default_rng(1)
    z = np.cumsum(rng.random(10_000) < 0.02) % 2
    y = rng.poisson(np.array([3.0, 30.0])[z]).astype(np.float32)
    trans = jnp.array([[0.98, 0.02], [0.02, 0.98]])
    log_em = poisson_log_emission(y, jnp.array([3.0, 30.0]))
    forward = jax.jit(forward_log_likelihood, static_argnums=3)
    vals = [float(forward(jnp.array([0.5, 0.5]), trans, log_em, m)) for m in METHODS]
    assert np.all(np.isfinite(vals))
    np.testing.assert_allclose(vals, vals[0], rtol=2e-5)
    grad = jax.jit(jax.grad(
        lambda r: forward_log_likelihood(
            jnp.array([0.5, 0.5]), trans, poisson_log_emission(y, r)
        )
    ))(jnp.array([3.0, 30.0]))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_filter_and_smoother_match_brute_force(small_hmm):
    init, trans, _, log_em = small_hmm
    total, terms = brute_force(init, trans, log_em)
    paths = np.array(list(itertools.product(range(3), repeat=log_em.shape[0])))
    w = np.exp(terms - total)
    exact_smoothed = np.stack([np.bincount(paths[:, t], w, 3) for t in range(paths.shape[1])])
    np.testing.assert_allclose(
        smoothed_state_probs(init, trans, log_em), exact_smoothed, atol=1e-5
    )
    # The filtered probability at the last step equals the smoothed one.
    for method in ("sequential", "associative"):
        filtered, ll = forward_filter(init, trans, log_em, method)
        np.testing.assert_allclose(filtered[-1], exact_smoothed[-1], atol=1e-5)
        assert abs(float(ll) - total) < 1e-4


def test_ffbs_draws_paths_from_the_exact_posterior(small_hmm):
    init, trans, _, log_em = small_hmm
    total, terms = brute_force(init, trans, log_em)
    filtered, _ = forward_filter(init, trans, log_em)
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    paths = np.asarray(jax.vmap(lambda k: backward_sample(k, filtered, trans))(keys))
    all_paths = list(itertools.product(range(3), repeat=log_em.shape[0]))
    p = np.exp(terms - total)
    # The most probable paths: sampled frequency within 4.5 binomial SE.
    for idx in np.argsort(p)[::-1][:5]:
        freq = np.mean(np.all(paths == np.array(all_paths[idx]), axis=1))
        se = np.sqrt(p[idx] * (1 - p[idx]) / n)
        assert abs(freq - p[idx]) < 4.5 * se + 1e-4


def test_stationary_distribution_is_stationary():
    g = jnp.array([[0.934, 0.066], [0.1285, 0.8715]])
    delta = stationary_distribution(g)
    np.testing.assert_allclose(delta @ g, delta, atol=1e-6)
    assert abs(float(delta.sum()) - 1) < 1e-6


def test_negbin_emission_matches_numpyro():
    y = jnp.array([0.0, 3.0, 17.0])
    mean = jnp.array([2.0, 15.0])
    ours = negbin_log_emission(y, mean, 4.0)
    ref = dist.NegativeBinomial2(mean[None, :], 4.0).log_prob(y[:, None])
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_posterior_predictive_shapes_and_state_probs():
    y = jnp.array([1.0, 0.0, 2.0, 30.0, 28.0, jnp.nan, 31.0])
    draws = {
        "rate": jnp.array([[1.0, 30.0]] * 5),
        "transition": jnp.array([[[0.9, 0.1], [0.1, 0.9]]] * 5),
    }
    y_rep, probs, states = hmm_posterior_predictive(jax.random.PRNGKey(0), "poisson", draws, y)
    assert y_rep.shape == (5, 7) and states.shape == (5, 7) and probs.shape == (7, 2)
    np.testing.assert_array_equal(np.asarray(states)[:, [0, 1, 2, 3, 4, 6]] , [[0, 0, 0, 1, 1, 1]] * 5)
    assert float(probs[3, 1]) > 0.999 and float(probs[0, 0]) > 0.999


@pytest.mark.parametrize("family", ["poisson", "negbin"])
def test_posterior_predictive_counts_follow_the_emission_distribution(family):
    """At time points whose state is certain, replicates have the emission's mean
    and variance (Poisson: 30; negative binomial with concentration 4: 30 +
    30**2 / 4). 2,000 draws x 4 points: 4 standard errors on the mean, and 8% /
    15% on the variance (the sd of a sample variance is var * sqrt(2 / n) for
    Gaussian tails, more for the negative binomial's)."""
    y = jnp.array([1.0, 0.0, 2.0, 30.0, 28.0, 31.0, 29.0])
    S = 2000
    draws = {
        "rate": jnp.array([[1.0, 30.0]] * S),
        "transition": jnp.array([[[0.9, 0.1], [0.1, 0.9]]] * S),
    }
    var = 30.0
    if family == "negbin":
        draws["concentration"] = jnp.full((S,), 4.0)
        var = 30.0 + 30.0**2 / 4.0
    y_rep, _, states = hmm_posterior_predictive(jax.random.PRNGKey(1), family, draws, y)
    assert (np.asarray(states)[:, 3:] == 1).all()
    high = np.asarray(y_rep)[:, 3:].astype(np.float64).ravel()
    assert abs(high.mean() - 30.0) < 4 * np.sqrt(var / high.size)
    assert abs(high.var() / var - 1.0) < (0.08 if family == "poisson" else 0.15)
    again, _, _ = hmm_posterior_predictive(jax.random.PRNGKey(1), family, draws, y)
    np.testing.assert_array_equal(again, y_rep)  # seeded by the key


# -- Zucchini & MacDonald's earthquake fit ---------------------------------------------
def test_map_earthquakes_reproduces_zucchini_macdonald():
    """Flat priors, stationary initial distribution: the book's 2-state MLE."""
    y = load_earthquakes()["count"].to_numpy().astype(np.float64)
    with jax.enable_x64(True):
        yj = jnp.asarray(y)

        def neg_log_lik(x):
            rate = jnp.cumsum(jnp.exp(x[:2]))  # positive, ordered
            off = jax.nn.sigmoid(x[2:])
            g = jnp.array([[1 - off[0], off[0]], [off[1], 1 - off[1]]])
            le = poisson_log_emission(yj, rate)
            return -forward_log_likelihood(stationary_distribution(g), g, le)

        fun = jax.jit(jax.value_and_grad(neg_log_lik))
        res = optimize.minimize(
            lambda x: tuple(np.asarray(v, np.float64) for v in fun(jnp.asarray(x))),
            np.array([np.log(10.0), np.log(10.0), -2.0, -2.0]),
            jac=True,
            method="BFGS",
            options={"gtol": 1e-8},
        )
        rate = np.cumsum(np.exp(res.x[:2]))
        off = 1 / (1 + np.exp(-res.x[2:]))
    ref = json.loads((DATA.parent / "earthquakes_poisson_hmm_mle.json").read_text())["2_state"]
    # The book: -log L = 342.3183, rates 15.472 and 26.125.
    assert abs(res.fun - 342.3183) < 1e-3
    assert abs(res.fun - ref["neg_loglik"]) < 1e-4
    np.testing.assert_allclose(rate, [15.472, 26.125], atol=2e-3)
    np.testing.assert_allclose(rate, ref["lambda_"], rtol=1e-4)
    gamma = np.asarray(ref["Gamma"])
    np.testing.assert_allclose(off, [gamma[0, 1], gamma[1, 0]], rtol=1e-3)


# -- posteriordb references -------------------------------------------------------------
def _posteriordb(name):
    folder = DATA / name
    return json.loads((folder / "data.json").read_text()), json.loads(
        (folder / "summary.json").read_text()
    )["stats"]


def hmm_example_model(y, num_states=2):
    """posteriordb hmm_example: Gaussian emissions (sd 1), uniform initial state."""
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(num_states)))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(num_states)))
    mu = numpyro.sample("mu", PositiveOrdered(dist.Normal(jnp.array([3.0, 10.0]), 1.0)))
    trans = jnp.stack([theta1, theta2])
    log_em = dist.Normal(mu, 1.0).log_prob(y[:, None])
    init = jnp.ones(num_states) / num_states
    numpyro.factor("log_lik", forward_log_likelihood(init, trans, log_em))


def hmm_drive_model(u, v, alpha, num_states=2):
    """posteriordb hmm_drive_0: exponential emissions for 1/speed and hoop distance."""
    theta1 = numpyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(alpha[1]))
    loc = jnp.array([0.0, 3.0])
    phi = numpyro.sample("phi", PositiveOrdered(dist.Normal(loc, 1.0)))
    lam = numpyro.sample("lambda", PositiveOrdered(dist.Normal(loc, 1.0)))
    trans = jnp.stack([theta1, theta2])
    log_em = dist.Exponential(phi).log_prob(u[:, None]) + dist.Exponential(lam).log_prob(v[:, None])
    numpyro.factor("log_lik", forward_log_likelihood(jnp.ones(num_states) / num_states, trans, log_em))


def _check_against_reference(idata, ref, names):
    table = raybayes.summary(idata, round_to="none")
    assert (table["r_hat"] < 1.01).all(), table
    for name in names:
        row, r = table.loc[name], ref[name]
        tol = 3.3 * np.sqrt(row["mcse_mean"] ** 2 + (r["sd"] / 100) ** 2)
        assert abs(row["mean"] - r["mean"]) < tol, (name, row["mean"], r["mean"], tol)
        # The sd agrees to within 10% (an ESS of >= 400 gives about 3.5% error).
        assert abs(row["sd"] - r["sd"]) < 0.1 * r["sd"], (name, row["sd"], r["sd"])


def test_nuts_hmm_example_matches_posteriordb():
    data, ref = _posteriordb("hmm_example-hmm_example")
    idata = raybayes.sample(
        hmm_example_model, jnp.asarray(data["y"], jnp.float32),
        num_chains=4, num_warmup=500, num_samples=1000, seed=1,
        backend="local", progress_bar=False,
    )
    names = {"theta1[0]": "theta1[1]", "theta1[1]": "theta1[2]", "theta2[0]": "theta2[1]",
             "theta2[1]": "theta2[2]", "mu[0]": "mu[1]", "mu[1]": "mu[2]"}
    _check_renamed(idata, ref, names)


def _check_renamed(idata, ref, names):
    ref0 = {ours: ref[theirs] for ours, theirs in names.items()}
    _check_against_reference(idata, ref0, list(names))


@pytest.mark.slow
def test_nuts_hmm_drive_0_matches_posteriordb():
    data, ref = _posteriordb("bball_drive_event_0-hmm_drive_0")
    idata = raybayes.sample(
        hmm_drive_model, jnp.asarray(data["u"], jnp.float32), jnp.asarray(data["v"], jnp.float32),
        jnp.asarray(data["alpha"], jnp.float32),
        num_chains=4, num_warmup=1000, num_samples=2000, seed=2,
        backend="local", progress_bar=False, target_accept_prob=0.9,
    )
    names = {f"{p}[{i}]": f"{p}[{i + 1}]" for p in ("theta1", "theta2", "phi", "lambda") for i in range(2)}
    _check_renamed(idata, ref, names)
