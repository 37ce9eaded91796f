"""Price-elasticity data: validation, index building, and a simulator with known truth.

All indices are computed here, outside the model, so that the model has no Python
loops over products and scales from 10^5 to 10^8 rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from raybayes.errors import DataValidationError

__all__ = [
    "ElasticityData",
    "prepare_elasticity_data",
    "simulate_elasticity",
    "validate_elasticity_frame",
]


def _fail(df, mask, column, what, fix):
    bad = np.flatnonzero(np.asarray(mask))
    example = df.iloc[int(bad[0])].to_dict()
    raise DataValidationError(
        f"column {column!r}: {len(bad)} of {len(df)} rows {what} "
        f"(first at row {int(bad[0])}: {example}). {fix}",
        column=column,
        num_bad_rows=len(bad),
        example=example,
    )


def validate_elasticity_frame(
    df: pd.DataFrame,
    *,
    product_cols=("store", "brand"),
    category_col: str = "brand",
    time_col: str = "week",
    price_col: str = "price",
    units_col: str = "units",
) -> None:
    """Check a sales table before any compute starts.

    Raises:
        DataValidationError: missing columns; an empty table; NaN, inf, negative or
            non-integer units; NaN, inf or non-positive prices; missing ids. The
            message names the column, the number of bad rows and one example row.
    """
    needed = list(dict.fromkeys([*product_cols, category_col, time_col, price_col, units_col]))
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"missing column(s) {missing}; the table has {list(df.columns)}. Rename your "
            f"columns or pass product_cols=, category_col=, time_col=, price_col=, "
            f"units_col= to match.",
            column=missing[0],
        )
    if len(df) == 0:
        raise DataValidationError(
            "the sales table is empty (0 rows); check the filter that produced it.",
        )
    for col in [*product_cols, category_col, time_col]:
        miss = df[col].isna().to_numpy()
        if miss.any():
            _fail(df, miss, col, "are missing", "Drop or fill these rows.")
    units = pd.to_numeric(df[units_col], errors="coerce").to_numpy(dtype=float)
    if (bad := ~np.isfinite(units)).any():
        _fail(df, bad, units_col, "are NaN, inf or not numbers", "Drop or fix these rows.")
    if (bad := units < 0).any():
        _fail(df, bad, units_col, "are negative", "Units sold must be counts >= 0.")
    if (bad := units != np.round(units)).any():
        _fail(df, bad, units_col, "are not integers", "Units sold must be whole counts.")
    price = pd.to_numeric(df[price_col], errors="coerce").to_numpy(dtype=float)
    if (bad := ~np.isfinite(price)).any():
        _fail(df, bad, price_col, "are NaN, inf or not numbers", "Drop or fix these rows.")
    if (bad := price <= 0).any():
        _fail(df, bad, price_col, "are zero or negative", "Prices must be > 0 (log price).")


@dataclass
class ElasticityData:
    """Arrays for :func:`raybayes.models.elasticity_model`, with their labels.

    Attributes:
        log_price: ``(num_obs,)`` float32, log price, centred within each product
            (so the product intercept absorbs the mean; the elasticity is unchanged).
        product_idx: ``(num_obs,)`` int32, product (store x brand) of each row.
        time_idx: ``(num_obs,)`` int32, time period (week) of each row.
        category_of_product: ``(num_products,)`` int32, category (brand) of each
            product.
        units: ``(num_obs,)`` int32 units sold, or ``None``.
        products: ``pandas.DataFrame`` of the product keys, row ``i`` = product ``i``.
        categories: labels of the categories, in index order.
        times: labels of the periods, in index order.
        mean_log_price: ``(num_products,)`` the per-product mean removed from
            log price.
    """

    log_price: np.ndarray
    product_idx: np.ndarray
    time_idx: np.ndarray
    category_of_product: np.ndarray
    units: np.ndarray | None
    products: pd.DataFrame
    categories: np.ndarray
    times: np.ndarray
    mean_log_price: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_obs(self) -> int:
        return len(self.log_price)

    @property
    def num_products(self) -> int:
        return len(self.category_of_product)

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    @property
    def num_times(self) -> int:
        return len(self.times)

    def model_kwargs(
        self,
        likelihood: str = "negbin",
        with_units: bool = True,
        centered: bool | str | dict = False,
    ) -> dict:
        """Keyword arguments of :func:`raybayes.models.elasticity_model`.

        Args:
            likelihood: ``"negbin"`` or ``"poisson"``.
            with_units: pass the observed units (``False``: prior predictive).
            centered: the model's ``centered`` argument; ``"auto"`` passes the
                weights of :meth:`centering` (requires the units).
        """
        if isinstance(centered, str):
            if centered != "auto":
                raise ValueError(
                    f"centered={centered!r}; use True, False, 'auto' or a dict."
                )
            centered = self.centering(likelihood=likelihood)
        kwargs = dict(
            log_price=self.log_price,
            product_idx=self.product_idx,
            time_idx=self.time_idx,
            category_of_product=self.category_of_product,
            num_categories=self.num_categories,
            num_times=self.num_times,
            units=self.units if with_units else None,
            likelihood=likelihood,
        )
        if centered is not False:
            kwargs["centered"] = centered
        return kwargs

    def centering(self, likelihood: str = "negbin", min_scale: float = 0.05) -> dict:
        """Centring weights of the model's four blocks, from how much data informs them.

        For a normal effect ``theta ~ N(m, sigma)`` observed with data precision
        ``I``, the parameterization ``theta = m + sigma^(1-w) (theta~ - w m)``
        decorrelates the effect from its scale and location best at
        ``w = sigma^2 I / (1 + sigma^2 I)`` (Papaspiliopoulos, Roberts & Skold 2007;
        Gorinova, Moore & Hoffman 2020): ``w -> 1`` (centred) for data-rich
        elements, ``w -> 0`` (non-centred) for sparse ones. Here ``I`` is the Fisher
        information of the log mean summed over each element's rows,
        ``sum mu phi / (mu + phi)`` (``mu`` is the observed count, floored at 1/2;
        ``phi`` a moment estimate of the negative-binomial concentration), times,
        for a product elasticity, the squared log price **less its category-period
        mean**: the category's period effects absorb the promotions a category
        runs in every store at once, so a product's elasticity is informed only by
        how its price departs from its category's that period (the information
        given the other effects, a Schur complement; on the orange-juice data a
        median 7% of the plain ``sum x^2`` information). A category's elasticity is
        informed by its products' and by the prior of the period effects it trades
        against. ``sigma`` is a moment estimate of each block's scale from
        per-product and per-period means of ``log(units + 1/2)`` and per-product
        slopes around their category's mean, floored at ``min_scale``. The weights
        are rough by design: they only choose a parameterization, the posterior is
        the same.

        Args:
            likelihood: ``"negbin"`` or ``"poisson"`` (``phi = inf``).
            min_scale: floor of the moment estimates of the scales.

        Returns:
            ``{"beta_category": (C,), "beta": (P,), "delta": (P,), "gamma": (T, C)}``
            (the ``"delta"`` weights apply to the products' levels, see
            :func:`raybayes.models.elasticity_model`)
            float32 weights in ``[0, 1]``, for the model's ``centered=``.

        Raises:
            ValueError: the data has no units.

        References:
            Papaspiliopoulos, O., Roberts, G. O. & Skold, M. (2007). A general
            framework for the parametrization of hierarchical models. Statistical
            Science 22(1), 59-73. https://doi.org/10.1214/088342307000000014
            Gorinova, M., Moore, D. & Hoffman, M. (2020). Automatic
            reparameterisation of probabilistic programs. ICML.
            https://arxiv.org/abs/1906.03028

        Examples:
            >>> df, _ = simulate_elasticity(3, 30, 52, seed=0)
            >>> w = prepare_elasticity_data(
            ...     df, product_cols=("product",), category_col="category"
            ... ).centering()
            >>> {k: v.shape for k, v in w.items()}
            {'beta_category': (3,), 'beta': (30,), 'delta': (30,), 'gamma': (52, 3)}
        """
        m = self._moments("centering", likelihood, min_scale)
        from raybayes.models.reparam import centering_weight

        T, C = self.num_times, self.num_categories
        return {
            "beta_category": centering_weight(m["sigma_category"], m["info_category"]),
            "beta": centering_weight(m["sigma_beta"], m["info_beta_given_gamma"]),
            "delta": centering_weight(m["sigma_delta"], m["info_delta"]),
            "gamma": centering_weight(m["sigma_gamma"], m["info_gamma"]).reshape(T, C),
        }

    def initial_values(
        self,
        likelihood: str = "negbin",
        centered: bool | str | dict = "auto",
        min_scale: float = 0.05,
    ) -> dict:
        """A starting point for MCMC near the posterior, from moment estimates.

        Each product's level is the mean of its ``log(units + 1/2)``, its
        elasticity the slope of that on log price, a category's elasticity the
        mean of its products', the period effects the category-period means of
        what is left, and the scales and the concentration the moment estimates of
        :meth:`centering`, mapped to the sample sites of the parameterization
        ``centered`` chooses (:func:`raybayes.models.elasticity_sample_sites`).
        Started here (e.g. with :func:`raybayes.mcmc.init_near_value`), chains
        skip the long first stretch of warmup in which NUTS, started at random
        points of ``(-2, 2)``, moves hundreds of intercepts near ``log(units)``
        with tiny steps; the posterior is unchanged.

        Args:
            likelihood: ``"negbin"`` or ``"poisson"``.
            centered: the parameterization passed to the model (``"auto"``: the
                weights of :meth:`centering`).
            min_scale: floor of the scale estimates.

        Returns:
            Site name -> float32 array of constrained values.

        Raises:
            ValueError: the data has no units, or a bad ``centered``.

        Examples:
            >>> df, _ = simulate_elasticity(3, 30, 52, seed=0)
            >>> data = prepare_elasticity_data(
            ...     df, product_cols=("product",), category_col="category")
            >>> data.initial_values()["level_decentered"].shape
            (30,)
        """
        from raybayes.models.elasticity import elasticity_sample_sites

        m = self._moments("initial_values", likelihood, min_scale)
        centered = self._resolve_centered(likelihood, centered)
        T, C = self.num_times, self.num_categories
        gamma = m["period_mean"].reshape(T, C)
        # A product's mean log count is its delta plus its category's mean
        # period effect (the period means are deviations, near zero on average).
        delta = m["product_mean"] - gamma.mean(axis=0)[self.category_of_product]
        effects = dict(
            beta_global=np.mean(m["slope_category_mean"]),
            sigma_category=m["sigma_category"], sigma_beta=m["sigma_beta"],
            sigma_delta=m["sigma_delta"], sigma_gamma=m["sigma_gamma"],
            mu_delta=np.mean(delta), beta_category=m["slope_category_mean"],
            beta=m["slope"], delta=delta, gamma=gamma,
        )
        if likelihood != "poisson":
            effects["concentration"] = m["phi"]
        return elasticity_sample_sites(effects, self.category_of_product, centered)

    def initial_inverse_mass(
        self,
        likelihood: str = "negbin",
        centered: bool | str | dict = "auto",
        min_scale: float = 0.05,
    ) -> dict:
        """A diagonal inverse mass matrix to start NUTS with, from the information.

        Each element of a block gets the variance ``1 / (I + 1 / s^2)`` of a normal
        effect with prior scale ``s`` and data information ``I`` (those of
        :meth:`centering`), mapped to its sample site
        (:func:`raybayes.models.elasticity_site_variances`); ``log sigma`` of a
        block of ``n`` elements gets ``1 / (2 n)``, ``mu_delta``
        ``sigma_delta^2 / P + sigma_gamma^2 / (T C)`` (the second term: shifting
        ``mu_delta`` against every week effect is informed by the week effects'
        prior only), ``beta_global`` ``1 / (1 + C / sigma_category^2)``. The
        concentration is left out (the sampler's own default applies). NUTS
        started from ``1 / |gradient|`` at the initial point gets variances
        wrong by up to 500x on the orange-juice data (``mu_delta``,
        ``sigma_gamma``), and its first adaptation window then takes deep trees.

        Args:
            likelihood: ``"negbin"`` or ``"poisson"``.
            centered: the parameterization passed to the model.
            min_scale: floor of the scale estimates.

        Returns:
            NumPyro's structured form: ``{(site,): (size,) variances}``, for
            ``kernel_kwargs={"inverse_mass_matrix": ...}`` of
            :func:`raybayes.sample` with ``low_rank_mass``.

        Raises:
            ValueError: the data has no units, or a bad ``centered``.

        Examples:
            >>> sales, _ = simulate_elasticity(2, 10, 26, seed=1)
            >>> prepared = prepare_elasticity_data(sales, product_cols=("product",),
            ...                                    category_col="category")
            >>> prepared.initial_inverse_mass()[("gamma_decentered",)].shape
            (52,)
        """
        from raybayes.models.elasticity import elasticity_site_variances

        m = self._moments("initial_inverse_mass", likelihood, min_scale)
        centered = self._resolve_centered(likelihood, centered)
        P, T, C = self.num_products, self.num_times, self.num_categories

        def var(info, s):
            return 1.0 / (info + 1.0 / s**2)

        variances = dict(
            beta_category=var(m["info_category"], m["sigma_category"]),
            beta=var(m["info_beta_given_gamma"], m["sigma_beta"]),
            delta=var(m["info_delta"], m["sigma_delta"]),
            gamma=var(m["info_gamma"], m["sigma_gamma"]).reshape(T, C),
            sigma_category=1.0 / (2 * C), sigma_beta=1.0 / (2 * P),
            sigma_delta=1.0 / (2 * P), sigma_gamma=1.0 / (2 * T * C),
            mu_delta=m["sigma_delta"] ** 2 / P + m["sigma_gamma"] ** 2 / (T * C),
            beta_global=1.0 / (1.0 + C / m["sigma_category"] ** 2),
        )
        sites = elasticity_site_variances(variances, m, centered)
        return {(k,): np.ravel(v) for k, v in sites.items()}

    def _resolve_centered(self, likelihood, centered):
        """The model's ``centered`` argument for ``centered`` (``"auto"`` resolved)."""
        return self.model_kwargs(likelihood, centered=centered).get("centered", False)

    def _moments(self, caller: str, likelihood: str, min_scale: float) -> dict:
        """Moment estimates of the model's effects, scales and informations.

        Shared by :meth:`centering` and :meth:`initial_values`: per-product means
        and slopes of ``log(units + 1/2)``, category-period means of what is left,
        each block's scale (floored at ``min_scale``), the negative-binomial
        concentration and the Fisher information of each element.
        """
        if self.units is None:
            raise ValueError(f"{caller}() needs the observed units; this data has none")
        P, T, C = self.num_products, self.num_times, self.num_categories
        p, t = self.product_idx, self.time_idx
        c = self.category_of_product[p]
        tc = t * C + c
        y = self.units.astype(np.float64)
        ly = np.log(y + 0.5)
        x = self.log_price.astype(np.float64)

        def group_mean(values, idx, n):
            count = np.bincount(idx, minlength=n)
            return np.bincount(idx, weights=values, minlength=n) / np.maximum(count, 1)

        product_mean = group_mean(ly, p, P)
        resid = ly - product_mean[p]
        # Within-product slope on log price: the rough elasticity of each product
        # (before removing the period means, which absorb promotions run by a
        # category across its products).
        sxx = np.bincount(p, weights=x * x, minlength=P)
        slope = np.bincount(p, weights=x * resid, minlength=P) / np.maximum(sxx, 1e-12)
        period_mean = group_mean(resid - slope[p] * x, tc, T * C)
        resid = resid - slope[p] * x - period_mean[tc]
        mu = np.maximum(y, 0.5)
        if likelihood == "poisson":
            phi = np.inf
            info_row = mu
        else:
            # Var log(y) ~ 1/phi + 1/mu for large counts.
            excess = np.mean(resid**2) - np.mean(1.0 / mu)
            phi = 1.0 / max(excess, 1e-3)
            info_row = mu * phi / (mu + phi)
        info_delta = np.bincount(p, weights=info_row, minlength=P)
        info_gamma = np.bincount(tc, weights=info_row, minlength=T * C)
        info_beta = np.bincount(p, weights=info_row * x * x, minlength=P)
        # Given the category-period effects (free parameters of the model), a
        # product's elasticity sees only its price's departure from the
        # (information-weighted) mean price of its category that period.
        tc_price = np.bincount(tc, weights=info_row * x, minlength=T * C) / np.maximum(
            info_gamma, 1e-12
        )
        x_within = x - tc_price[tc]
        info_beta_given_gamma = np.bincount(
            p, weights=info_row * x_within * x_within, minlength=P
        )

        def scale(estimates, info):
            noise = np.mean(1.0 / np.maximum(info, 1e-12))
            return float(np.sqrt(max(np.var(estimates) - noise, min_scale**2)))

        cat = self.category_of_product
        num_in_category = np.maximum(np.bincount(cat, minlength=C), 1)
        slope_category_mean = (
            np.bincount(cat, weights=slope, minlength=C) / num_in_category
        )
        sigma_delta = scale(product_mean, info_delta)
        sigma_gamma = scale(period_mean, info_gamma)
        # The products' spread around their category (beta ~ N(beta_category, s)).
        sigma_beta = scale(slope - slope_category_mean[cat], info_beta)
        # A category's elasticity is informed by its products' elasticities and by
        # the prior of its period effects: shifting it by a moves every period
        # effect by -a times the category's mean log price that period.
        prec_product = 1.0 / (
            sigma_beta**2 + 1.0 / np.maximum(info_beta_given_gamma, 1e-12)
        )
        tc_weight = np.bincount(tc, minlength=T * C) > 0
        info_category = np.bincount(cat, weights=prec_product, minlength=C)
        info_category += np.bincount(
            np.arange(T * C) % C, weights=tc_weight * tc_price**2, minlength=C
        ) / sigma_gamma**2
        sigma_category = scale(slope_category_mean, np.bincount(
            cat, weights=1.0 / (sigma_beta**2 + 1.0 / np.maximum(info_beta, 1e-12)),
            minlength=C,
        ))

        return dict(
            product_mean=product_mean, slope=slope, period_mean=period_mean,
            slope_category_mean=slope_category_mean, phi=phi,
            sigma_category=sigma_category, sigma_beta=sigma_beta,
            sigma_delta=sigma_delta, sigma_gamma=sigma_gamma,
            info_category=info_category, info_beta_given_gamma=info_beta_given_gamma,
            info_delta=info_delta, info_gamma=info_gamma,
        )

    def coords(self) -> dict:
        """ArviZ coordinates of the model's plates."""
        return {
            "categories": np.asarray(self.categories),
            "products": np.arange(self.num_products),
            "times": np.asarray(self.times),
        }


def prepare_elasticity_data(
    df: pd.DataFrame,
    *,
    product_cols=("store", "brand"),
    category_col: str = "brand",
    time_col: str = "week",
    price_col: str = "price",
    units_col: str = "units",
    center_log_price: bool = True,
) -> ElasticityData:
    """Validate a sales table and build the index arrays of the elasticity model.

    Args:
        df: one row per product x period.
        product_cols: columns whose combination identifies a product.
        category_col: column of the category (constant within a product).
        time_col: column of the period.
        price_col: price (> 0); units_col: units sold (integers >= 0).
        center_log_price: subtract each product's mean log price.

    Returns:
        :class:`ElasticityData`.

    Raises:
        DataValidationError: see :func:`validate_elasticity_frame`; also a product
            that appears in more than one category.
    """
    product_cols = list(product_cols)
    validate_elasticity_frame(
        df,
        product_cols=product_cols,
        category_col=category_col,
        time_col=time_col,
        price_col=price_col,
        units_col=units_col,
    )
    keys = df[product_cols].drop_duplicates().sort_values(product_cols).reset_index(drop=True)
    product_idx = (
        df[product_cols].merge(keys.reset_index(), on=product_cols, how="left")["index"].to_numpy()
    )
    categories, category_idx = np.unique(df[category_col].to_numpy(), return_inverse=True)
    times, time_idx = np.unique(df[time_col].to_numpy(), return_inverse=True)
    category_of_product = np.full(len(keys), -1, dtype=np.int64)
    category_of_product[product_idx] = category_idx
    check = category_of_product[product_idx] != category_idx
    if check.any():
        _fail(
            df, check, category_col, "put a product in more than one category",
            "Each product must belong to one category.",
        )
    log_price = np.log(df[price_col].to_numpy(dtype=np.float64))
    mean_lp = np.bincount(product_idx, weights=log_price, minlength=len(keys)) / np.bincount(
        product_idx, minlength=len(keys)
    )
    if center_log_price:
        log_price = log_price - mean_lp[product_idx]
    else:
        mean_lp = np.zeros(len(keys))
    return ElasticityData(
        log_price=log_price.astype(np.float32),
        product_idx=product_idx.astype(np.int32),
        time_idx=time_idx.astype(np.int32),
        category_of_product=category_of_product.astype(np.int32),
        units=df[units_col].to_numpy().astype(np.int32),
        products=keys,
        categories=categories,
        times=times,
        mean_log_price=mean_lp,
    )


def simulate_elasticity(
    num_categories: int = 10,
    num_products: int = 1000,
    num_weeks: int = 156,
    *,
    seed: int = 0,
    beta_global: float = -2.0,
    sigma_category: float = 0.35,
    sigma_beta: float = 0.5,
    sigma_gamma: float = 0.3,
    mean_log_units: float = 3.0,
    sd_log_units: float = 1.0,
    concentration: float = 5.0,
    likelihood: str = "negbin",
):
    """Simulate weekly sales of ``num_products`` products with known elasticities.

    The generative process is the one of :func:`raybayes.models.elasticity_model`:
    ``log E[units_it] = beta_i log(price_it) + gamma_{c(i),t} + delta_i``, with
    ``beta_i ~ N(beta_c(i), sigma_beta)``, ``beta_c ~ N(beta_global, sigma_category)``.
    Products are assigned to categories round-robin; every product is observed
    every week (``num_products * num_weeks`` rows). With the defaults the true
    product elasticities have sd about 0.61 and the category means explain all but
    sd 0.5 of them.

    Args:
        num_categories: number of categories.
        num_products: number of products.
        num_weeks: number of weeks.
        seed: NumPy seed.
        likelihood: ``"negbin"`` (concentration ``concentration``) or ``"poisson"``.

    Returns:
        ``(df, truth)``: ``df`` has columns ``product``, ``category``, ``week``,
        ``price``, ``units``; ``truth`` maps ``beta`` ``(num_products,)``,
        ``beta_category`` ``(num_categories,)``, ``beta_global`` and the scales to
        their true values.
    """
    rng = np.random.default_rng(seed)
    category_of_product = np.arange(num_products) % num_categories
    beta_category = beta_global + sigma_category * rng.standard_normal(num_categories)
    beta = beta_category[category_of_product] + sigma_beta * rng.standard_normal(num_products)
    delta = mean_log_units + sd_log_units * rng.standard_normal(num_products)
    gamma = sigma_gamma * rng.standard_normal((num_weeks, num_categories))
    base_log_price = np.log(rng.uniform(1.0, 10.0, num_products))
    product = np.repeat(np.arange(num_products), num_weeks)
    week = np.tile(np.arange(num_weeks), num_products)
    # Promotions: a price cut of 0-40% in about 30% of weeks, plus small noise.
    promo = rng.random(len(product)) < 0.3
    cut = np.where(promo, rng.uniform(0.0, 0.4, len(product)), 0.0)
    log_price = base_log_price[product] + np.log1p(-cut) + 0.05 * rng.standard_normal(len(product))
    centred = log_price - np.bincount(product, weights=log_price)[product] / num_weeks
    log_mu = beta[product] * centred + gamma[week, category_of_product[product]] + delta[product]
    mu = np.exp(log_mu)
    if likelihood == "poisson":
        units = rng.poisson(mu)
    else:
        units = rng.poisson(rng.gamma(concentration, mu / concentration))
    df = pd.DataFrame(
        {
            "product": product,
            "category": category_of_product[product],
            "week": week,
            "price": np.exp(log_price),
            "units": units.astype(np.int64),
        }
    )
    truth = dict(
        beta=beta,
        beta_category=beta_category,
        beta_global=beta_global,
        sigma_category=sigma_category,
        sigma_beta=sigma_beta,
        sigma_gamma=sigma_gamma,
        concentration=concentration,
        delta=delta,
        gamma=gamma,
    )
    return df, truth
