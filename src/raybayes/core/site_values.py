"""Constrained site values of one shard for a batch of unconstrained draws (pure JAX).

The model is run on the shard's data with the latent sites substituted, so the
values of deterministic sites come out with the latent ones. Which sites follow the
split plate, and on which axis, is read from one trace; the driver concatenates the
shards' values on that axis (:func:`raybayes.distributed.merge_shard_values`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from raybayes.core.shard_density import ShardLogDensity

__all__ = ["constrained_site_values"]


def constrained_site_values(
    density: ShardLogDensity, global_draws, local_draws
) -> tuple[dict, dict]:
    """Constrained latent and deterministic sites of one shard for a batch of draws.

    Args:
        density: the shard's :class:`~raybayes.core.ShardLogDensity` (its model,
            data, partition and layout).
        global_draws: ``(D, G)`` unconstrained globals.
        local_draws: ``(D, P_s, k)`` unconstrained locals of this shard.

    Returns:
        ``(values, local_axes)``: site -> ``(D, *shape)`` NumPy array and, for the
        sites of the split plate, the entity axis of the site value (without the
        draw axis). Sites of the observation plate alone are left out.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     s = numpyro.sample("s", dist.LogNormal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(0, s), obs=y)
        >>> d = ShardLogDensity(model, {"y": np.zeros(3)})
        >>> values, axes = constrained_site_values(d, np.zeros((2, 1)),
        ...                                        np.zeros((2, 0, 0)))
        >>> values["s"].tolist(), axes  # exp(0) twice; no split plate
        ([1.0, 1.0], {})
    """
    d = density
    partition = d.partition
    arrays = {k: jnp.asarray(v) for k, v in d.arrays.items()}
    plate = partition.plate if partition is not None else None
    obs_plate = partition.obs_plate if partition is not None else None
    trace = functools.partial(_trace, d)
    # one jitted function per density structure, shared by the shards (the data
    # passed as an argument, not as a closure constant): repeated calls with
    # draws of the same shape compile once
    batched = d.compiled.constrained_site_values
    g = jnp.asarray(global_draws, dtype=jnp.result_type(float))
    lm = jnp.asarray(local_draws, dtype=g.dtype)
    values = batched(g, lm, arrays)
    # which sites follow the split plate, and on which axis: the trace's structure
    # (site types and plates) does not depend on the values, so it is kept too
    tr = getattr(d, "_constrained_site_trace", None)
    if tr is None:
        tr = trace(g[0], lm[0], arrays)
        d._constrained_site_trace = tr
    out, axes = {}, {}
    for name, value in values.items():
        frames = tr[name].get("cond_indep_stack", ())
        names = {f.name for f in frames}
        if name in d.sites and d.sites[name].is_local:
            axes[name] = d.sites[name].constrained_entity_axis
        elif plate in names:
            frame = next(f for f in frames if f.name == plate)
            axes[name] = np.ndim(value) - 1 + frame.dim
        elif obs_plate is not None and obs_plate in names:
            continue
        elif (
            partition is not None
            and tr[name]["type"] == "deterministic"
            and not names  # in another plate, its axis is that plate's
            and d.num_local_entities
            and np.shape(value)[1:2] == (d.num_local_entities,)
            and partition.plate != obs_plate
        ):
            # A deterministic of the split plate, outside the plate context.
            axes[name] = 0
        out[name] = np.asarray(value)
    return out, axes


def _trace(d: ShardLogDensity, g, lm, arrays):
    params = d.constrain(d.unflatten(g, lm))
    return handlers.trace(
        handlers.substitute(handlers.seed(d.model, 0), params)
    ).get_trace(*d.model_args, **arrays, **d.static_kwargs)


def _values(d: ShardLogDensity, g, lm, arrays):
    return {
        name: site["value"]
        for name, site in _trace(d, g, lm, arrays).items()
        if (site["type"] == "deterministic") or (name in d.sites)
    }
