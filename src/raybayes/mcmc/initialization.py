"""Starting points of chains (NumPyro init strategies)."""

from __future__ import annotations

from functools import partial

__all__ = ["init_near_value"]


def init_near_value(site=None, values=None, radius: float = 0.1):
    """Start each chain at given values, jittered uniformly in the unconstrained space.

    Like :func:`numpyro.infer.init_to_value`, but every site in ``values`` starts at
    ``T(T^-1(value) + u)``, ``u ~ Uniform(-radius, radius)`` elementwise (``T`` the
    bijection to the site's support), drawn from the chain's own key: chains start
    near a good point yet apart, so that R-hat still compares chains from
    different starts (as Stan's ``init_radius``, around a point instead of 0).
    Sites not in ``values`` start as :func:`numpyro.infer.init_to_uniform`.

    Args:
        site: the site (NumPyro passes it); ``None`` returns the strategy.
        values: site name -> constrained value (array of the site's shape).
        radius: half-width of the jitter in unconstrained units, ``>= 0``.

    Returns:
        With ``site=None``, the strategy for ``init_strategy=``; else the site's
        initial value.

    Raises:
        ValueError: a negative ``radius``.

    Examples:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer.util import initialize_model
        >>> def model():
        ...     numpyro.sample("s", dist.HalfNormal(1.0))
        >>> info = initialize_model(jax.random.PRNGKey(0), model,
        ...                         init_strategy=init_near_value(values={"s": 2.0}))
        >>> abs(float(info.param_info.z["s"]) - 0.693) <= 0.1
        True
    """
    if not radius >= 0:
        raise ValueError(f"radius={radius!r} must be >= 0, e.g. 0.1.")
    if site is None:
        return partial(init_near_value, values=dict(values or {}), radius=radius)
    from numpyro.infer.initialization import init_to_uniform

    values = values or {}
    if (site["type"] != "sample" or site["is_observed"] or site["name"] not in values
            or site["fn"].support.is_discrete):
        return init_to_uniform(site)
    import jax
    import jax.numpy as jnp
    from numpyro.distributions import biject_to

    transform = biject_to(site["fn"].support)
    shape = site["fn"].shape(site["kwargs"].get("sample_shape") or ())
    value = jnp.broadcast_to(jnp.asarray(values[site["name"]], jnp.result_type(float)),
                             shape)
    unconstrained = transform.inv(value)
    noise = jax.random.uniform(site["kwargs"]["rng_key"], unconstrained.shape,
                               minval=-radius, maxval=radius)
    return transform(unconstrained + noise)
