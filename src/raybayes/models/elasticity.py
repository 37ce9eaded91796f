"""Hierarchical price-elasticity model (NumPyro)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.reparam import LocScaleReparam

from raybayes.models.negbin import NegativeBinomialLogMean

__all__ = [
    "elasticity_model",
    "elasticity_sample_sites",
    "elasticity_site_variances",
    "CENTERING_BLOCKS",
]


def elasticity_model(
    log_price,
    product_idx,
    time_idx,
    category_of_product,
    num_categories: int,
    num_times: int,
    units=None,
    likelihood: str = "negbin",
    centered: bool | Mapping = False,
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
        units_it ~ NB2(mean, concentration)                concentration ~ Exp(0.1)
                   (or Poisson(mean) with likelihood="poisson")

    ``centered`` chooses the parameterization of the four hierarchical blocks
    (Papaspiliopoulos, Roberts & Skold 2007; Betancourt & Girolami 2015):

    - ``False`` (default): all non-centred, with the sample sites ``z_category``,
      ``z_beta``, ``delta_decentered`` and ``gamma_decentered``.
    - ``True``: ``delta`` and ``gamma`` centred (sites ``delta``, ``gamma``), the
      elasticities non-centred as above. The centred form samples better when each
      intercept is informed by many observations, but it has no joint mode (MAP
      degenerates as the scales go to 0).
    - a mapping from the blocks :data:`CENTERING_BLOCKS` (``"beta_category"``,
      ``"beta"``, ``"delta"``, ``"gamma"``) to centring weights ``w`` in
      ``[0, 1]``, scalars or arrays of the block's shape (``(C,)``, ``(P,)``,
      ``(P,)``, ``(T, C)``); missing blocks get 0. Each block is sampled through
      :class:`numpyro.infer.reparam.LocScaleReparam` (``w = 1`` centred, ``w = 0``
      non-centred, in between partially centred; Gorinova, Moore & Hoffman 2020),
      with the sample site ``<block>_decentered`` (or ``<block>`` where a scalar
      ``w = 1``) and the block itself as a deterministic site. In this mode the
      intercepts are sampled as each product's level ``delta_i + mean_t
      gamma_{t,c(i)}`` (site ``level``, prior ``N(mu_delta + mean_t gamma_{t,c(i)},
      sigma_delta)``, i.e. the same prior on ``delta``): the data identify the
      level, not ``delta`` and ``gamma`` apart, and sampling ``delta`` itself
      leaves a ridge (posterior correlation near -0.9 on the orange-juice data)
      that a diagonal mass matrix cannot follow.
      :meth:`raybayes.datasets.ElasticityData.centering` picks the weights from how
      much data informs each element.

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
        centered: ``False``, ``True`` or a mapping block -> weights (see above).

    Sites of interest: ``beta`` (P,) product elasticities, ``beta_category`` (C,),
    ``beta_global``.

    References:
        Montgomery, A. L. (1997). Creating micro-marketing pricing strategies using
        supermarket scanner data. Marketing Science 16(4), 315-337.
        Betancourt, M. & Girolami, M. (2015). Hamiltonian Monte Carlo for
        hierarchical models. In Current Trends in Bayesian Methodology with
        Applications, CRC Press. https://arxiv.org/abs/1312.0906
        Papaspiliopoulos, O., Roberts, G. O. & Skold, M. (2007). A general framework
        for the parametrization of hierarchical models. Statistical Science 22(1),
        59-73. https://doi.org/10.1214/088342307000000014
        Gorinova, M., Moore, D. & Hoffman, M. (2020). Automatic reparameterisation of
        probabilistic programs. ICML. https://arxiv.org/abs/1906.03028

    Raises:
        ValueError: an unknown ``likelihood``, block name, or a weight outside [0, 1].
        TypeError: ``centered`` is neither a bool nor a mapping.
    """
    if likelihood not in ("negbin", "poisson"):
        raise ValueError(f"likelihood={likelihood!r}; use 'negbin' or 'poisson'.")
    weights = _centering_weights(centered)
    num_products = category_of_product.shape[0]
    num_obs = log_price.shape[0]
    beta_global = numpyro.sample("beta_global", dist.Normal(-2.0, 1.0))
    sigma_category = numpyro.sample("sigma_category", dist.HalfNormal(1.0))
    sigma_beta = numpyro.sample("sigma_beta", dist.HalfNormal(1.0))
    sigma_delta = numpyro.sample("sigma_delta", dist.HalfNormal(1.0))
    sigma_gamma = numpyro.sample("sigma_gamma", dist.HalfNormal(1.0))
    mu_delta = numpyro.sample("mu_delta", dist.Normal(0.0, 10.0))
    reparam = {name: LocScaleReparam(w) for name, w in weights.items() if w is not None}
    if weights["beta"] is not None:
        reparam["level"] = reparam.pop("delta")
    with numpyro.handlers.reparam(config=reparam):
        with numpyro.plate("categories", num_categories, dim=-1):
            if weights["beta_category"] is None:
                z_category = numpyro.sample("z_category", dist.Normal(0.0, 1.0))
                beta_category = numpyro.deterministic(
                    "beta_category", beta_global + sigma_category * z_category
                )
            else:
                beta_category = numpyro.sample(
                    "beta_category", dist.Normal(beta_global, sigma_category)
                )
            with numpyro.plate("times", num_times, dim=-2):
                gamma = numpyro.sample("gamma", dist.Normal(0.0, sigma_gamma))
        with numpyro.plate("products", num_products, dim=-1):
            beta_mean = beta_category[category_of_product]
            if weights["beta"] is None:
                z_beta = numpyro.sample("z_beta", dist.Normal(0.0, 1.0))
                beta = numpyro.deterministic("beta", beta_mean + sigma_beta * z_beta)
            else:
                beta = numpyro.sample("beta", dist.Normal(beta_mean, sigma_beta))
            if weights["beta"] is None:
                delta = numpyro.sample("delta", dist.Normal(mu_delta, sigma_delta))
            else:
                # The data identify delta_i + mean_t gamma_{t,c(i)} (a product's level),
                # not delta and gamma apart: sample the level, with the same prior on
                # delta (a shift, unit Jacobian). This removes the ridge between each
                # product's delta and its category's mean week effect.
                shift = jnp.mean(gamma, axis=0)[category_of_product]
                level = numpyro.sample(
                    "level", dist.Normal(mu_delta + shift, sigma_delta)
                )
                delta = numpyro.deterministic("delta", level - shift)
    log_mu = (
        beta[product_idx] * log_price
        + gamma[time_idx, category_of_product[product_idx]]
        + delta[product_idx]
    )
    if likelihood == "negbin":
        concentration = numpyro.sample("concentration", dist.Exponential(0.1))
        # The log pmf in softplus + Stirling form: float32-accurate for counts in
        # the thousands (the plain lgamma differences are not, and their rounding
        # noise makes NUTS saturate its tree depth) and cheaper to differentiate
        # than NegativeBinomial2's betaln.
        obs_dist = NegativeBinomialLogMean(log_mu, concentration)
    else:
        obs_dist = dist.Poisson(jnp.exp(log_mu))
    with numpyro.plate("obs", num_obs, dim=-1):
        numpyro.sample("units", obs_dist, obs=units)


#: The blocks whose parameterization ``centered=`` chooses, in model order.
CENTERING_BLOCKS = ("beta_category", "beta", "delta", "gamma")


def elasticity_sample_sites(
    effects: Mapping, category_of_product, centered=False
) -> dict:
    """The values of :func:`elasticity_model`'s sample sites for given effects.

    Maps a point in the model's natural parameters to the sites that the
    parameterization chosen by ``centered`` samples (``z_*``, ``<block>`` or
    ``<block>_decentered``, ``level``), e.g. to start chains there. A partially
    centred block ``theta ~ N(m, s)`` with weight ``w`` is sampled as
    ``theta~ = w m + (theta - m) s^(w - 1)`` (the inverse of
    :class:`numpyro.infer.reparam.LocScaleReparam`'s map).

    Args:
        effects: ``beta_global``, ``sigma_category``, ``sigma_beta``,
            ``sigma_delta``, ``sigma_gamma``, ``mu_delta`` (scalars; scales > 0),
            ``beta_category`` ``(C,)``, ``beta`` ``(P,)``, ``delta`` ``(P,)``,
            ``gamma`` ``(T, C)`` and, for the negative binomial, ``concentration``.
        category_of_product: ``(P,)`` int, category of each product.
        centered: the model's ``centered`` argument (bool or mapping of weights).

    Returns:
        Site name -> float32 array, constrained values (as ``init_to_value`` takes).

    Raises:
        KeyError: an effect is missing. ValueError, TypeError: as
            :func:`elasticity_model` for a bad ``centered``.

    Examples:
        >>> import numpy as np
        >>> effects = dict(beta_global=-2.0, sigma_category=0.5, sigma_beta=0.5,
        ...                sigma_delta=1.0, sigma_gamma=0.5, mu_delta=3.0,
        ...                beta_category=np.full(2, -2.0), beta=np.full(3, -2.5),
        ...                delta=np.full(3, 3.0), gamma=np.zeros((4, 2)))
        >>> sorted(elasticity_sample_sites(effects, np.array([0, 0, 1])))[:3]
        ['beta_global', 'delta_decentered', 'gamma_decentered']
    """
    weights = _centering_weights(centered)
    e = {k: np.asarray(v, np.float64) for k, v in effects.items()}
    cat = np.asarray(category_of_product)
    out = {k: e[k] for k in ("beta_global", "sigma_category", "sigma_beta",
                             "sigma_delta", "sigma_gamma", "mu_delta")}
    if "concentration" in e:
        out["concentration"] = e["concentration"]

    def put(name, theta, loc, scale, w):
        site = _site_name(name, w)
        if w is None:  # the classic non-centred site
            out[site] = (theta - loc) / scale
        else:
            w = np.asarray(w, np.float64)
            out[site] = w * loc + (theta - loc) * scale ** (w - 1.0)

    put("category" if weights["beta_category"] is None else "beta_category",
        e["beta_category"], e["beta_global"], e["sigma_category"],
        weights["beta_category"])
    put("beta", e["beta"], e["beta_category"][cat], e["sigma_beta"], weights["beta"])
    put("gamma", e["gamma"], 0.0, e["sigma_gamma"], weights["gamma"])
    if weights["beta"] is None:
        put("delta", e["delta"], e["mu_delta"], e["sigma_delta"], weights["delta"])
    else:
        shift = e["gamma"].mean(axis=0)[cat]
        put("level", e["delta"] + shift, e["mu_delta"] + shift, e["sigma_delta"],
            weights["delta"])
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def elasticity_site_variances(
    variances: Mapping, effects: Mapping, centered=False
) -> dict:
    """Approximate posterior variances of :func:`elasticity_model`'s sample sites.

    The companion of :func:`elasticity_sample_sites` for an initial diagonal
    inverse mass matrix: a block element ``theta ~ N(m, s)`` with posterior
    variance ``v`` has, sampled with centring weight ``w``, the variance
    ``v s^(2 (w - 1))`` (``v / s^2`` non-centred, ``v`` centred; ``m`` held
    fixed). The scalar sites' variances are passed through, in their
    unconstrained units (``log`` for the scales and the concentration).

    Args:
        variances: posterior variances of ``beta_category`` ``(C,)``, ``beta``
            ``(P,)``, ``delta`` ``(P,)`` (of the products' levels where the model
            samples them), ``gamma`` ``(T, C)``, and of any scalar site to set.
        effects: the scales ``sigma_category``, ``sigma_beta``, ``sigma_delta``,
            ``sigma_gamma``.
        centered: the model's ``centered`` argument.

    Returns:
        Site name -> float32 array of variances (unconstrained coordinates).

    Raises:
        KeyError: a block's variance or scale is missing.

    Examples:
        >>> v = elasticity_site_variances(
        ...     dict(beta_category=[0.01], beta=[0.04], delta=[0.01], gamma=[[0.01]]),
        ...     dict(sigma_category=0.5, sigma_beta=0.5, sigma_delta=1.0,
        ...          sigma_gamma=0.5))
        >>> float(v["z_beta"][0])  # non-centred: 0.04 / 0.5^2
        0.1599999964237213
    """
    weights = _centering_weights(centered)
    out = {k: np.asarray(v, np.float64) for k, v in variances.items()
           if k not in CENTERING_BLOCKS}
    scales = dict(beta_category="sigma_category", beta="sigma_beta",
                  delta="sigma_delta", gamma="sigma_gamma")
    for block, scale_name in scales.items():
        w = weights[block]
        name = {"beta_category": "category" if w is None else "beta_category",
                "delta": "delta" if weights["beta"] is None else "level"}.get(
                    block, block)
        scale = float(effects[scale_name])
        factor = scale**-2.0 if w is None else scale ** (
            2.0 * (np.asarray(w, np.float64) - 1.0))
        out[_site_name(name, w)] = np.asarray(variances[block], np.float64) * factor
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _site_name(name: str, w) -> str:
    """The sample site of block ``name`` under centring weight ``w`` (None: z)."""
    if w is None:
        return f"z_{name}"
    if isinstance(w, float) and w == 1.0:
        return name
    return f"{name}_decentered"


def _centering_weights(centered) -> dict:
    """Block -> LocScaleReparam weight, or ``None`` for the classic ``z_*`` sites."""
    if isinstance(centered, (bool, np.bool_)):
        w = 1.0 if centered else 0.0
        return {"beta_category": None, "beta": None, "delta": w, "gamma": w}
    if not isinstance(centered, Mapping):
        raise TypeError(
            f"centered={centered!r}; pass True, False, or a mapping from blocks "
            f"{CENTERING_BLOCKS} to centring weights in [0, 1] (see "
            "ElasticityData.centering)."
        )
    unknown = set(centered) - set(CENTERING_BLOCKS)
    if unknown:
        raise ValueError(
            f"centered has unknown block(s) {sorted(unknown)}; the blocks are "
            f"{CENTERING_BLOCKS}."
        )
    weights = {}
    for name in CENTERING_BLOCKS:
        w = centered.get(name, 0.0)
        if not isinstance(w, jax.core.Tracer):
            arr = np.asarray(w, dtype=float)
            if not np.all((arr >= 0.0) & (arr <= 1.0)):
                bad = arr[~((arr >= 0.0) & (arr <= 1.0))]
                raise ValueError(
                    f"centered[{name!r}] has {bad.size} weight(s) outside [0, 1] "
                    f"(e.g. {bad.flat[0]}); use 1 for centred, 0 for non-centred."
                )
            w = float(arr) if arr.ndim == 0 else jnp.asarray(arr, jnp.float32)
        weights[name] = w
    return weights
