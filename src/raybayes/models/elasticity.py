"""Hierarchical price-elasticity model (NumPyro)."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer.reparam import LocScaleReparam

__all__ = ["elasticity_model"]


def elasticity_model(
    log_price,
    product_idx,
    time_idx,
    category_of_product,
    num_categories: int,
    num_times: int,
    units=None,
    likelihood: str = "negbin",
    centered: bool = False,
):
    """Hierarchical price elasticity of every product, pooled within categories.

    ``log E[units_it] = beta_i log(price_it) + gamma_{c(i),t} + delta_i``, with
    product ``i`` (e.g. store x brand), category ``c`` (e.g. brand) and period ``t``.

    Priors (non-centred parameterization, ``z ~ N(0, 1)``)::

        beta_global ~ N(-2, 1)
        beta_category_c = beta_global + sigma_category * z_c       sigma_* ~ HalfNormal(1)
        beta_i = beta_category_c(i) + sigma_beta * z_i
        delta_i = mu_delta + sigma_delta * z_delta_i               mu_delta ~ N(0, 10)
        gamma_{t,c} = sigma_gamma * z_gamma_{t,c}
        units_it ~ NegativeBinomial2(mean, concentration)          concentration ~ Exp(0.1)
                   (or Poisson(mean) with likelihood="poisson")

    ``centered=True`` samples ``delta`` and ``gamma`` in the centred form instead
    (via :class:`numpyro.infer.reparam.LocScaleReparam`; their sample sites are then
    ``delta``/``gamma`` instead of ``delta_decentered``/``gamma_decentered``). The
    centred form can sample better when each intercept is informed by many
    observations, but it has no joint mode (MAP degenerates as the scales go to 0).

    Plates: ``categories`` (C), ``products`` (P), ``times`` (T, outer) x
    ``categories`` for gamma, and ``obs`` (N). All indices are precomputed
    (:func:`raybayes.datasets.prepare_elasticity_data`), so the model has no Python
    loop over products and its cost is linear in N.

    Args:
        log_price: ``(N,)`` log price (centred within product, as prepared).
        product_idx: ``(N,)`` int, product of each observation, in ``[0, P)``.
        time_idx: ``(N,)`` int, period of each observation, in ``[0, T)``.
        category_of_product: ``(P,)`` int, category of each product, in ``[0, C)``.
        num_categories: C. num_times: T.
        units: ``(N,)`` observed counts, or ``None`` to sample the prior predictive.
        likelihood: ``"negbin"`` (default; real sales are overdispersed) or
            ``"poisson"``.
        centered: sample the intercepts ``delta`` and effects ``gamma`` centred.

    Sites of interest: ``beta`` (P,) product elasticities, ``beta_category`` (C,),
    ``beta_global``.

    References:
        Montgomery, A. L. (1997). Creating micro-marketing pricing strategies using
        supermarket scanner data. Marketing Science 16(4), 315-337.
        Betancourt, M. & Girolami, M. (2015). Hamiltonian Monte Carlo for
        hierarchical models. (non-centred parameterization)
    """
    if likelihood not in ("negbin", "poisson"):
        raise ValueError(f"likelihood={likelihood!r}; use 'negbin' or 'poisson'.")
    reparam = {} if centered else {"gamma": LocScaleReparam(0.0), "delta": LocScaleReparam(0.0)}
    num_products = category_of_product.shape[0]
    num_obs = log_price.shape[0]
    beta_global = numpyro.sample("beta_global", dist.Normal(-2.0, 1.0))
    sigma_category = numpyro.sample("sigma_category", dist.HalfNormal(1.0))
    sigma_beta = numpyro.sample("sigma_beta", dist.HalfNormal(1.0))
    sigma_delta = numpyro.sample("sigma_delta", dist.HalfNormal(1.0))
    sigma_gamma = numpyro.sample("sigma_gamma", dist.HalfNormal(1.0))
    mu_delta = numpyro.sample("mu_delta", dist.Normal(0.0, 10.0))
    with numpyro.plate("categories", num_categories, dim=-1):
        z_category = numpyro.sample("z_category", dist.Normal(0.0, 1.0))
        beta_category = numpyro.deterministic(
            "beta_category", beta_global + sigma_category * z_category
        )
        with numpyro.plate("times", num_times, dim=-2), numpyro.handlers.reparam(config=reparam):
            gamma = numpyro.sample("gamma", dist.Normal(0.0, sigma_gamma))
    with numpyro.plate("products", num_products, dim=-1):
        z_beta = numpyro.sample("z_beta", dist.Normal(0.0, 1.0))
        beta = numpyro.deterministic(
            "beta", beta_category[category_of_product] + sigma_beta * z_beta
        )
        with numpyro.handlers.reparam(config=reparam):
            delta = numpyro.sample("delta", dist.Normal(mu_delta, sigma_delta))
    log_mu = (
        beta[product_idx] * log_price
        + gamma[time_idx, category_of_product[product_idx]]
        + delta[product_idx]
    )
    if likelihood == "negbin":
        concentration = numpyro.sample("concentration", dist.Exponential(0.1))
        # NegativeBinomial2 evaluates log p with betaln, which stays accurate in
        # float32 for counts in the thousands; the lgamma differences of
        # NegativeBinomialLogits do not, and their rounding noise makes NUTS
        # saturate its tree depth.
        obs_dist = dist.NegativeBinomial2(jnp.exp(log_mu), concentration)
    else:
        obs_dist = dist.Poisson(jnp.exp(log_mu))
    with numpyro.plate("obs", num_obs, dim=-1):
        numpyro.sample("units", obs_dist, obs=units)
