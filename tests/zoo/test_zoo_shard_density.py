"""Sum over shards == full log joint and its gradient, over the whole zoo.

For every zoo model whose default plan can split it, random unconstrained
parameters and a random number of shards (2 to 4, at most the plate's size): the
shard log densities of :class:`~raybayes.core.ShardLogDensity` (global sites
scaled by 1/S, Jacobians included), summed over the shards of the plan's
partition, equal the unsplit log density, and so do their gradients (globals
summed over shards, locals concatenated along their plate).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo_models import BY_NAME, ZOO

from raybayes.core import (
    Partition,
    ShardLogDensity,
    assign_entities,
    shard_log_density,
    shard_model_kwargs,
)
from raybayes.errors import ConfigurationError
from raybayes.plan import plan

_PLANS = {}


def _planned(zoo):
    if zoo.name not in _PLANS:
        kwargs = zoo.data()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = plan(zoo.model, kwargs, num_shards=2)
        except ConfigurationError as err:
            _PLANS[zoo.name] = (None, str(err))
        else:
            full = ShardLogDensity(zoo.model, p.model_kwargs)
            _PLANS[zoo.name] = (p, full)
    return _PLANS[zoo.name]


def _counts(p):
    part = p.partition
    n = part.num_entities(p.model_kwargs)
    if part.index_arg is None:
        return np.ones(n)
    return np.bincount(np.asarray(p.model_kwargs[part.index_arg]), minlength=n)


# A few models run by default (a plate with and without local latents, nested
# plates, positional data); the rest (the masked GLM among them; test_zoo.py
# fits it on 1 and 2 shards by default), whose compilations take 10-30 s each
# on 2 cores, with -m slow.
DEFAULT = {
    "eight_schools_noncentered",
    "logistic_regression",
    "repeated_measures",
}


@pytest.mark.parametrize(
    "zoo",
    [
        pytest.param(z, marks=() if z.name in DEFAULT else (pytest.mark.slow,))
        for z in ZOO
    ],
    ids=[z.name for z in ZOO],
)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), data=st.data())
def test_sum_over_shards_equals_full_log_joint_and_gradient(zoo, seed, data):
    p, full = _planned(zoo)
    if p is None:
        assert "num_shards=1" in full  # a clear error
        return
    part = p.partition
    num_entities = part.num_entities(p.model_kwargs)
    num_shards = data.draw(st.integers(2, min(4, num_entities)), label="num_shards")
    key = jax.random.PRNGKey(seed)
    params = {
        s.name: 0.5
        * jax.random.normal(jax.random.fold_in(key, i), s.unconstrained_shape)
        for i, s in enumerate(full.sites.values())
    }
    value, grad = jax.value_and_grad(full.log_density_params)(params)
    total = 0.0
    grad_global = {name: 0.0 for name in params}
    grad_local = {name: [] for name in params}
    for spec in assign_entities(_counts(p), num_shards, part.plate):
        kwargs = shard_model_kwargs(p.model_kwargs, part, spec)
        shard = ShardLogDensity(zoo.model, kwargs, part, num_shards)
        local_params = {}
        for s in shard.sites.values():
            v = params[s.name]
            if s.is_local:
                v = jnp.take(
                    v,
                    jnp.arange(spec.entity_start, spec.entity_stop),
                    axis=s.entity_axis,
                )
            local_params[s.name] = v
        v_s, g_s = jax.value_and_grad(shard.log_density_params)(local_params)
        total = total + v_s
        for s in shard.sites.values():
            if s.is_local:
                grad_local[s.name].append((s.entity_axis, g_s[s.name]))
            else:
                grad_global[s.name] = grad_global[s.name] + g_s[s.name]
    scale = max(1.0, abs(float(value)))
    assert float(total) == pytest.approx(float(value), rel=1e-5, abs=1e-5 * scale)
    for name, g in grad.items():
        if grad_local[name]:
            axis = grad_local[name][0][0]
            got = jnp.concatenate([x for _, x in grad_local[name]], axis=axis)
        else:
            got = grad_global[name]
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(g), rtol=1e-4, atol=1e-4 * scale, err_msg=name
        )


def test_enumerated_mixture_shards_sum_to_funsor_log_joint_and_logsumexp():
    """The mixture's assignment ``z`` is summed out within each shard: the shard
    log densities add up to NumPyro's funsor log joint of the whole data, which
    equals the mixture log likelihood written by hand (logsumexp over components).
    """
    from numpyro.contrib.funsor import enum
    from numpyro.contrib.funsor import log_density as funsor_log_density
    from scipy.special import logsumexp
    from scipy.stats import dirichlet, halfnorm, norm

    zoo = BY_NAME["gaussian_mixture_enumerated"]
    y = zoo.data()["y"]
    params = {
        "weights": np.array([0.3, 0.7]),
        "locs": np.array([-1.5, 2.5]),
        "scale": np.array(1.3),
    }
    full, _ = funsor_log_density(enum(zoo.model, -2), (), {"y": y}, params)
    tr = numpyro.handlers.trace(
        numpyro.handlers.substitute(numpyro.handlers.seed(zoo.model, 0), params)
    ).get_trace(y)
    by_hand = (
        dirichlet.logpdf(params["weights"], np.ones(2))
        + float(tr["locs"]["fn"].log_prob(params["locs"]))  # ordered prior
        + halfnorm.logpdf(params["scale"], scale=2.0)
        + logsumexp(
            np.log(params["weights"])
            + norm.logpdf(y[:, None], params["locs"], params["scale"]),
            axis=1,
        ).sum()
    )
    assert float(full) == pytest.approx(by_hand, rel=1e-6)
    part = Partition("data", entity_args=("y",))
    num_shards = 2
    total = sum(
        float(
            shard_log_density(
                zoo.model,
                shard_model_kwargs({"y": y}, part, spec),
                params,
                partition=part,
                num_shards=num_shards,
            )
        )
        for spec in assign_entities(np.ones(len(y)), num_shards, "data")
    )
    assert total == pytest.approx(by_hand, rel=1e-6)
