"""Starting points of the elasticity model: the moment estimates mapped to the
sample sites of each parameterization, and the jittered init strategy."""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import initialize_model

from raybayes.datasets import prepare_elasticity_data, simulate_elasticity
from raybayes.mcmc import init_near_value
from raybayes.models import elasticity_model, elasticity_sample_sites


@pytest.fixture(scope="module")
def data():
    df, truth = simulate_elasticity(3, 24, 40, seed=1)
    return prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    ), truth


def _effects(data, rng):
    P, T, C = data.num_products, data.num_times, data.num_categories
    return dict(
        beta_global=-2.0, sigma_category=0.4, sigma_beta=0.3, sigma_delta=0.7,
        sigma_gamma=0.2, mu_delta=3.0, concentration=5.0,
        beta_category=rng.normal(-2.0, 0.4, C), beta=rng.normal(-2.0, 0.5, P),
        delta=rng.normal(3.0, 0.7, P), gamma=rng.normal(0.0, 0.2, (T, C)),
    )


@pytest.mark.parametrize("centered", ["auto", False, True, "half"])
def test_sample_sites_give_back_the_effects(data, centered):
    data, _ = data
    effects = _effects(data, np.random.default_rng(0))
    if centered == "auto":
        centered = data.centering()
    elif centered == "half":  # scalar partial weights on every block
        centered = {"beta_category": 0.5, "beta": 0.5, "delta": 0.5, "gamma": 0.5}
    sites = elasticity_sample_sites(effects, data.category_of_product, centered)
    kwargs = data.model_kwargs(centered=centered)
    tr = numpyro.handlers.trace(
        numpyro.handlers.substitute(numpyro.handlers.seed(elasticity_model, 0), sites)
    ).get_trace(**kwargs)
    latent = {k for k, s in tr.items()
              if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(sites)
    for name in ("beta_category", "beta", "delta", "gamma"):
        np.testing.assert_allclose(tr[name]["value"], effects[name], rtol=2e-5,
                                   atol=2e-5, err_msg=name)


def test_initial_values_are_near_the_simulation_truth(data):
    data, truth = data
    start = data.initial_values()
    kwargs = data.model_kwargs(centered="auto")
    tr = numpyro.handlers.trace(
        numpyro.handlers.substitute(numpyro.handlers.seed(elasticity_model, 0), start)
    ).get_trace(**kwargs)
    # The moment estimates are rough, but far closer than uniform(-2, 2) starts:
    # elasticities within about 2 of the truth, the concentration's order right.
    beta = np.asarray(tr["beta"]["value"])
    assert np.sqrt(np.mean((beta - truth["beta"]) ** 2)) < 1.5
    assert 0.2 < float(start["concentration"]) / truth["concentration"] < 5.0


def test_init_near_value_jitters_each_chain_within_the_radius():
    def model():
        numpyro.sample("s", dist.HalfNormal(1.0).expand([3]))
        numpyro.sample("m", dist.Normal(0.0, 1.0))

    strategy = init_near_value(values={"s": np.array([0.5, 1.0, 2.0])}, radius=0.1)
    starts = [initialize_model(jax.random.PRNGKey(k), model,
                               init_strategy=strategy).param_info.z for k in range(2)]
    for z in starts:  # unconstrained: log s within 0.1 of log(value)
        assert np.all(np.abs(np.asarray(z["s"]) - np.log([0.5, 1.0, 2.0])) <= 0.1)
        assert -2.0 <= float(z["m"]) <= 2.0  # not in values: init_to_uniform
    assert not np.allclose(starts[0]["s"], starts[1]["s"])
    with pytest.raises(ValueError, match="radius=-1"):
        init_near_value(values={}, radius=-1)


@pytest.mark.parametrize("centered", ["auto", False, True])
def test_initial_inverse_mass_covers_every_sample_site_but_the_concentration(
        data, centered):
    data, _ = data
    mass = data.initial_inverse_mass(centered=centered)
    kwargs = data.model_kwargs(centered=centered)
    tr = numpyro.handlers.trace(numpyro.handlers.seed(elasticity_model, 0)).get_trace(
        **kwargs)
    sizes = {k: int(np.size(s["value"])) for k, s in tr.items()
             if s["type"] == "sample" and not s["is_observed"]}
    assert {k[0] for k in mass} == set(sizes) - {"concentration"}
    for (name,), v in mass.items():
        assert v.shape == (sizes[name],), name
        assert np.all(np.isfinite(v) & (v > 0)), name


def test_low_rank_chain_starts_from_the_given_inverse_mass():
    from raybayes.mcmc.chain import NUTSChainRunner

    def model():
        numpyro.sample("a", dist.Normal(0.0, 3.0).expand([2]))
        numpyro.sample("b", dist.Normal(0.0, 0.1))

    given = np.array([9.0, 4.0], np.float32)
    runner = NUTSChainRunner(
        model, num_warmup=60, chunk_size=10, low_rank_phases=(20, 20),
        kernel_kwargs={"inverse_mass_matrix": {("a",): given}})
    state = runner.init_chain(0, np.asarray(jax.random.PRNGKey(0)))
    inv_mass = np.asarray(state.adapt_state.inverse_mass_matrix)
    np.testing.assert_allclose(inv_mass[:2], given)  # sites in sorted order: a, b
    assert inv_mass[2] != 1.0  # b: 1 / |gradient| at the start
    bad = NUTSChainRunner(model, num_warmup=60, chunk_size=10,
                          low_rank_phases=(20, 20),
                          kernel_kwargs={"inverse_mass_matrix": {("c",): given}})
    with pytest.raises(Exception, match="one diagonal per site"):
        bad.init_chain(0, np.asarray(jax.random.PRNGKey(0)))
