"""Sum of shard log densities == full log density (value and gradient), property test.

Four models: hierarchical price elasticity (split by product), logistic regression
(split by row), the inference-gym radon contextual-effects model (split by county)
and a fleet of independent two-state Poisson HMMs (split by series).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raybayes.core import (
    Partition,
    ShardLogDensity,
    assign_entities,
    shard_log_density,
    shard_model_kwargs,
)
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.errors import ConfigurationError
from raybayes.models.elasticity import elasticity_model

RADON_DIR = Path(__file__).parents[1] / "data" / "radon"


# ----------------------------------------------------------------------- models
def logistic_model(X, y=None):
    d = X.shape[1]
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 5.0))
    coef = numpyro.sample("coef", dist.Normal(jnp.zeros(d), 1.0).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ coef + intercept), obs=y)


def radon_model(
    county_idx, floor, floor_by_county, log_uranium, num_counties, log_radon=None
):
    """inference-gym "radon contextual effects" (Minnesota, HalfNormal scales)."""
    mean = numpyro.sample("county_effect_mean", dist.Normal(0.0, 1.0))
    scale = numpyro.sample("county_effect_scale", dist.HalfNormal(1.0))
    with numpyro.plate("counties", num_counties):
        county_effect = numpyro.sample("county_effect", dist.Normal(mean, scale))
    weight = numpyro.sample("weight", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
    sigma = numpyro.sample("log_radon_scale", dist.HalfNormal(1.0))
    loc = (
        weight[0] * log_uranium
        + weight[1] * floor
        + weight[2] * floor_by_county
        + county_effect[county_idx]
    )
    with numpyro.plate("obs", county_idx.shape[0]):
        numpyro.sample("log_radon", dist.Normal(loc, sigma), obs=log_radon)


def _poisson_hmm_loglik(counts, log_rates, p_stay):
    """Forward algorithm of a 2-state Poisson HMM, uniform start. counts (T,)."""
    log_trans = jnp.log(
        jnp.stack(
            [
                jnp.stack([p_stay[0], 1 - p_stay[0]]),
                jnp.stack([1 - p_stay[1], p_stay[1]]),
            ]
        )
    )
    log_emit = dist.Poisson(jnp.exp(log_rates)).log_prob(counts[:, None])  # (T, 2)
    alpha = jnp.log(0.5) + log_emit[0]

    def step(alpha, le):
        alpha = jax.nn.logsumexp(alpha[:, None] + log_trans, axis=0) + le
        return alpha, None

    alpha, _ = jax.lax.scan(step, alpha, log_emit[1:])
    return jax.nn.logsumexp(alpha)


def hmm_fleet_model(counts):
    """Independent 2-state Poisson HMMs, one per series, sharing their two rates."""
    log_rates = numpyro.sample(
        "log_rates", dist.Normal(jnp.array([1.0, 2.5]), 1.0).to_event(1)
    )
    with numpyro.plate("series", counts.shape[0]):
        p_stay = numpyro.sample("p_stay", dist.Beta(2.0 * jnp.ones(2), 2.0).to_event(1))
        loglik = jax.vmap(_poisson_hmm_loglik, in_axes=(0, None, 0))(
            counts, log_rates, p_stay
        )
        numpyro.factor("hmm", loglik)


# ------------------------------------------------------------------- datasets
def elasticity_case():
    df, _ = simulate_elasticity(num_categories=3, num_products=12, num_weeks=6, seed=1)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    partition = Partition(
        "products",
        entity_args=("category_of_product",),
        index_arg="product_idx",
        obs_args=("log_price", "time_idx", "units"),
        obs_plate="obs",
    )
    return elasticity_model, data.model_kwargs(), partition, 12


def logistic_case():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((48, 3)).astype(np.float32)
    y = (rng.random(48) < 0.5).astype(np.int32)
    return (
        logistic_model,
        {"X": X, "y": y},
        Partition("obs", entity_args=("X", "y")),
        48,
    )


def radon_case():
    df = pd.read_csv(RADON_DIR / "radon_MN_inference_gym.csv")
    kwargs = dict(
        county_idx=df.county_idx.to_numpy(np.int32),
        floor=df.floor.to_numpy(np.float32),
        floor_by_county=df.floor_by_county.to_numpy(np.float32),
        log_uranium=df.log_uranium.to_numpy(np.float32),
        num_counties=85,
        log_radon=df.log_radon.to_numpy(np.float32),
    )
    partition = Partition(
        "counties",
        index_arg="county_idx",
        obs_args=("floor", "floor_by_county", "log_uranium", "log_radon", "county_idx"),
        obs_plate="obs",
        size_arg="num_counties",
    )
    return radon_model, kwargs, partition, 85


def hmm_case():
    rng = np.random.default_rng(2)
    counts = rng.poisson(rng.choice([3.0, 12.0], size=(12, 25))).astype(np.float32)
    return (
        hmm_fleet_model,
        {"counts": counts},
        Partition("series", entity_args=("counts",)),
        12,
    )


CASES = {
    "elasticity": elasticity_case,
    "logistic": logistic_case,
    "radon": radon_case,
    "hmm_fleet": hmm_case,
}
_BUILT = {}


def _case(name):
    if name not in _BUILT:
        _BUILT[name] = CASES[name]()
    return _BUILT[name]


def _random_params(density, seed):
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, s in enumerate(density.sites.values()):
        out[s.name] = 0.7 * jax.random.normal(
            jax.random.fold_in(key, i), s.unconstrained_shape
        )
    return out


def _shard_params(full_density, shard_density, params, spec):
    out = {}
    for s in shard_density.sites.values():
        v = params[s.name]
        if s.is_local:
            v = jnp.take(
                v, jnp.arange(spec.entity_start, spec.entity_stop), axis=s.entity_axis
            )
        out[s.name] = v
    return out


# ---------------------------------------------------------------------- tests
_JITTED = {}


def _value_and_grad(name, num_shards, density, params, arrays):
    """One compiled function per (model, S): every shard of a case has one shape."""
    key = (name, num_shards, tuple(sorted((k, np.shape(v)) for k, v in arrays.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(jax.value_and_grad(density.log_density_params))
    return _JITTED[key](params, {k: jnp.asarray(v) for k, v in arrays.items()})


def _arrays(density, kwargs):
    return {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}


# Elasticity, logistic and HMM cases have 12 entities of equal size, so for S in
# {1, 2, 3, 4} every shard has one shape (one compilation per S); radon's counties
# differ in size. The slow-to-compile models (HMM scan, elasticity, radon) are split
# in fewer ways; the logistic case covers every S, and S = 1.
SHARD_COUNTS = {
    "elasticity": [3],
    "logistic": [1, 2, 3, 4],
    "hmm_fleet": [3],
    "radon": [3],
}


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), data=st.data())
def test_sum_over_shards_equals_full_log_joint_and_gradient(name, seed, data):
    num_shards = data.draw(st.sampled_from(SHARD_COUNTS[name]), label="num_shards")
    model, kwargs, partition, num_entities = _case(name)
    full = ShardLogDensity(model, kwargs)  # unsplit, every site at scale 1
    params = _random_params(full, seed)
    full_value, full_grad = _value_and_grad(
        name, 0, full, params, _arrays(full, kwargs)
    )

    specs = assign_entities(num_entities, num_shards, partition.plate)
    total = 0.0
    grad_global = {s.name: 0.0 for s in full.sites.values()}
    grad_local = {s.name: [] for s in full.sites.values()}
    for spec in specs:
        shard_kwargs = shard_model_kwargs(kwargs, partition, spec)
        dens = ShardLogDensity(model, shard_kwargs, partition, num_shards)
        assert dens.num_local_entities in (0, spec.num_entities)
        p = _shard_params(full, dens, params, spec)
        value, grad = _value_and_grad(
            name, num_shards, dens, p, _arrays(dens, shard_kwargs)
        )
        total = total + value
        for s in dens.sites.values():
            if s.is_local:
                grad_local[s.name].append((s.entity_axis, grad[s.name]))
            else:
                grad_global[s.name] = grad_global[s.name] + grad[s.name]

    scale = 1.0 + abs(float(full_value))
    assert abs(float(total) - float(full_value)) <= 2e-5 * scale
    for name_, g_full in full_grad.items():
        if grad_local[name_]:
            axis = grad_local[name_][0][0]
            g = jnp.concatenate([g for _, g in grad_local[name_]], axis=axis)
        else:
            g = grad_global[name_]
        tol = 2e-5 * (1.0 + float(jnp.max(jnp.abs(g_full))))
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(g_full), atol=tol, rtol=1e-4
        )


def test_constrained_shard_log_density_sums_to_numpyro_log_density():
    model, kwargs, partition, _ = _case("elasticity")
    full = ShardLogDensity(model, kwargs)
    values = full.constrain(_random_params(full, 7))
    expected, _ = numpyro.infer.util.log_density(model, (), kwargs, values)
    specs = assign_entities(12, 3, "products")
    total = 0.0
    for spec in specs:
        shard_kwargs = shard_model_kwargs(kwargs, partition, spec)
        dens = ShardLogDensity(model, shard_kwargs, partition, 3)
        shard_values = dict(values)
        for s in dens.local_sites:
            shard_values[s.name] = jnp.take(
                values[s.name],
                jnp.arange(spec.entity_start, spec.entity_stop),
                axis=s.constrained_entity_axis,
            )
        total += shard_log_density(
            model, shard_kwargs, shard_values, partition=partition, num_shards=3
        )
    assert abs(float(total) - float(expected)) <= 1e-5 * abs(float(expected))


def test_global_sites_are_scaled_and_local_sites_are_not():
    model, kwargs, partition, _ = _case("elasticity")
    spec = assign_entities(12, 4, "products")[0]
    shard_kwargs = shard_model_kwargs(kwargs, partition, spec)
    dens4 = ShardLogDensity(model, shard_kwargs, partition, 4)
    dens1 = ShardLogDensity(model, shard_kwargs, partition, 1)
    local = {s.name for s in dens4.local_sites}
    assert "z_beta" in local and not local & {"beta_global", "z_category", "sigma_beta"}
    assert all("products" in s.plates for s in dens4.local_sites)
    # Moving beta_global changes its prior (global, scaled by 1/S) and the shard's
    # likelihood (local, unscaled): the S=1 and S=4 differences differ by 3/4 prior.
    g, lm = dens4.init_global(), dens4.init_local()
    idx = [s.name for s in dens4.global_sites].index("beta_global")
    offset = sum(int(np.prod(s.unconstrained_shape)) for s in dens4.global_sites[:idx])
    g2 = g.at[offset].set(1.0)
    diff4 = float(dens4.log_density(g2, lm) - dens4.log_density(g, lm))
    diff1 = float(dens1.log_density(g2, lm) - dens1.log_density(g, lm))
    prior = float(
        dist.Normal(-2.0, 1.0).log_prob(1.0) - dist.Normal(-2.0, 1.0).log_prob(0.0)
    )
    assert abs((diff1 - diff4) - 0.75 * prior) < 1e-3


def test_discrete_latent_site_is_a_clear_error():
    model, kwargs, partition, _ = _case("elasticity")
    with pytest.raises(ConfigurationError, match="'units' is discrete"):
        ShardLogDensity(model, {**kwargs, "units": None})


def test_more_shards_than_entities_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="only 12 entities"):
        assign_entities(12, 13, "products")


def test_assign_entities_balances_observations():
    counts = np.array([100, 1, 1, 1, 1, 100, 1, 1])
    specs = assign_entities(counts, 2)
    work = [counts[s.entity_start : s.entity_stop].sum() for s in specs]
    assert work == [103, 103]
    assert [s.num_entities for s in assign_entities(3, 3)] == [1, 1, 1]


def test_radon_data_provenance_is_kept():
    meta = json.loads(
        (
            RADON_DIR
            / "radon_contextual_effects_minnesota_halfnormal.ground_truth.json"
        ).read_text()
    )
    assert meta["license"].startswith("Apache-2.0")
    assert len(pd.read_csv(RADON_DIR / "radon_MN_inference_gym.csv")) == 919


def test_global_hessian_of_a_shard_without_local_sites():
    """A split along the observations leaves no local sites: the Hessian columns
    (once a ZeroDivisionError in the batched products) are the globals' only."""
    model, kwargs, partition, _ = _case("logistic")
    spec = assign_entities(48, 2)[1]
    shard = ShardLogDensity(
        model, shard_model_kwargs(kwargs, partition, spec), partition, 2
    )
    assert shard.num_local_entities == 0
    g = 0.1 * jnp.ones(shard.num_global)
    hgg, hlg = shard.global_hessian_columns(g, shard.init_local(), batch_size=3)
    dense = jax.hessian(lambda x: shard.value_and_grad(x, shard.init_local())[0])(g)
    np.testing.assert_allclose(hgg, dense, rtol=1e-4, atol=1e-5)
    assert hlg.shape[-1] == shard.num_global and hlg.size == 0


def _schools(sigma, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_shards_of_one_shape_share_their_compiled_functions():
    kwargs = {
        "sigma": np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]),
        "y": np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]),
    }
    part = Partition("school", entity_args=("sigma", "y"))
    with jax.enable_x64(True):
        a, b = [
            ShardLogDensity(_schools, shard_model_kwargs(kwargs, part, s), part, 2)
            for s in assign_entities(8, 2, "school")
        ]
        assert a.num_local_entities == b.num_local_entities == 4
        assert a.compiled is b.compiled
        g = jnp.array([1.0, 0.5])
        lm = jnp.asarray(np.linspace(-1.0, 2.0, 4)[:, None])
        # one executable, each shard's own data: the shards' values add up to the
        # full model's (computed by a density of another structure)
        lm_b = lm[::-1] + 0.25
        va, _, _ = a.value_and_grad(g, lm)
        vb, _, _ = b.value_and_grad(g, lm_b)
        assert a.compiled.value_and_grad._cache_size() == 1
        full = ShardLogDensity(_schools, kwargs, part, 1)
        assert full.compiled is not a.compiled
        v_full, _, _ = full.value_and_grad(g, jnp.concatenate([lm, lm_b]))
        assert float(va) + float(vb) == pytest.approx(float(v_full), rel=1e-12)
        # the Hessian in one pass: the dense Hessian's blocks
        hgg, hlg, blocks = a.hessian_blocks(g, lm, batch_size=4)
        dense = jax.jit(jax.hessian(lambda v: -a.log_density(v[:2], v[2:, None])))(
            jnp.concatenate([g, lm[:, 0]])
        )
        np.testing.assert_allclose(hgg, dense[:2, :2], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(hlg[:, 0, :], dense[2:, :2], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            blocks[:, 0, 0], np.diag(dense[2:, 2:]), rtol=1e-10, atol=1e-12
        )
