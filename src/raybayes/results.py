"""Posterior containers: ``arviz.InferenceData`` with plate-aware dims, and summaries.

R-hat, bulk/tail ESS and MCSE come from ArviZ (rank-normalised split R-hat and ESS of
Vehtari et al. 2021).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = [
    "draws_to_inference_data",
    "model_site_info",
    "print_summary",
    "summary",
    "to_inference_data",
]


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def model_site_info(model, model_args=(), model_kwargs=None, seed: int = 0):
    """Trace a NumPyro model once and read its plates.

    Returns:
        ``(dims, coords, observed)``: ``dims`` maps a site name to the names of its
        array dimensions (plate names where a plate owns the dimension, else
        ``"<site>_dim_<k>"``); ``coords`` maps each plate name to ``arange(size)``;
        ``observed`` maps each observed site to its value as a NumPy array.
    """
    from numpyro.infer.initialization import init_to_uniform

    from raybayes.core.tracing import abstract_trace

    model_kwargs = model_kwargs or {}
    # Substituting init_to_uniform values lets models with improper priors
    # (ImproperUniform) be traced, as NumPyro's MCMC does.
    trace = abstract_trace(model, model_args, model_kwargs, seed=seed,
                           substitute_fn=init_to_uniform, concrete_observations=True)
    dims: dict[str, list[str]] = {}
    coords: dict[str, Any] = {}
    observed: dict[str, np.ndarray] = {}
    for name, site in trace.items():
        if site["type"] not in ("sample", "deterministic"):
            continue
        value = site["value"]
        shape = tuple(np.shape(value))
        event_dim = 0
        if site["type"] == "sample":
            event_dim = len(getattr(site["fn"], "event_shape", ()))
        names = [f"{name}_dim_{k}" for k in range(len(shape))]
        for frame in site.get("cond_indep_stack", []):
            idx = len(shape) + frame.dim - event_dim
            if frame.size is None or not 0 <= idx < len(shape) or shape[idx] != frame.size:
                continue
            if site["type"] == "sample" and frame.size != shape[idx]:
                continue
            names[idx] = frame.name
            coords.setdefault(frame.name, np.arange(frame.size))
        is_factor = type(site.get("fn")).__name__ == "Unit"  # numpyro.factor
        if site["type"] == "sample" and site.get("is_observed") and not is_factor:
            observed[name] = np.asarray(value)
        if names:
            dims[name] = names
    return dims, coords, observed


def to_inference_data(
    posterior: dict[str, np.ndarray],
    sample_stats: dict[str, np.ndarray] | None = None,
    observed_data: dict[str, np.ndarray] | None = None,
    *,
    dims: dict[str, list[str]] | None = None,
    coords: dict[str, Any] | None = None,
    attrs: dict[str, Any] | None = None,
):
    """Build an ``arviz.InferenceData``.

    Args:
        posterior: site -> draws of shape ``(num_chains, num_draws, *site_shape)``.
        sample_stats: stat -> ``(num_chains, num_draws)``.
        observed_data: site -> observed value.
        dims: site -> dimension names of the site (without chain/draw).
        coords: dimension name -> coordinate values.
        attrs: attributes of the InferenceData (``idata.attrs``).

    Returns:
        ``arviz.InferenceData`` with groups ``posterior``, ``sample_stats`` and
        ``observed_data`` (where given).
    """
    az = _arviz()
    dims = dict(dims or {})
    coords = dict(coords or {})
    # Drop dims that don't fit a site (e.g. a deterministic of another shape).
    for group in (posterior, observed_data or {}):
        for name, value in group.items():
            lead = 2 if group is posterior else 0
            if name in dims and len(dims[name]) != np.ndim(value) - lead:
                dims.pop(name)
    used = {d for names in dims.values() for d in names}
    coords = {k: v for k, v in coords.items() if k in used}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        idata = az.from_dict(
            posterior=posterior,
            sample_stats=sample_stats,
            observed_data=observed_data,
            coords=coords,
            dims=dims,
            attrs=attrs or {},
        )
    return idata


def summary(idata, var_names=None, hdi_prob: float = 0.9, **kwargs):
    """Posterior summary: mean, sd, HDI, MCSE, bulk/tail ESS and R-hat (ArviZ).

    Args:
        idata: an ``arviz.InferenceData`` with a ``posterior`` group, each site of
            shape ``(num_chains, num_draws, *site_shape)`` (as returned by
            :func:`raybayes.sample`).
        var_names: sites to summarise (default: all posterior sites).
        hdi_prob: mass of the highest-density interval, in (0, 1).
        **kwargs: further arguments of :func:`arviz.summary` (e.g. ``round_to``).

    Returns:
        ``pandas.DataFrame``, one row per scalar parameter (``"theta[3]"`` for an
        element of a vector site), with columns ``mean``, ``sd``,
        ``hdi_<lower>%``, ``hdi_<upper>%``, ``mcse_mean``, ``mcse_sd``,
        ``ess_bulk``, ``ess_tail`` and ``r_hat``; ArviZ's default rounding (2
        decimals). R-hat needs at least 2 chains (NaN otherwise).

    Raises:
        KeyError: a name in ``var_names`` is not a posterior site.

    References:
        Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), Rank-normalization,
        folding, and localization: an improved R-hat for assessing convergence of
        MCMC, Bayesian Analysis 16(2). https://doi.org/10.1214/20-BA1221

    Examples:
        >>> import arviz as az
        >>> draws = np.random.default_rng(0).normal(size=(2, 500))
        >>> table = summary(az.from_dict(posterior={"mu": draws}))
        >>> list(table.index), bool(abs(table.loc["mu", "mean"]) < 0.2)
        (['mu'], True)
    """
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.summary(idata, var_names=var_names, hdi_prob=hdi_prob, kind="all", **kwargs)


def print_summary(idata, var_names=None, hdi_prob: float = 0.9) -> None:
    """Print the posterior summary table and the number of divergences.

    The table is :func:`summary`'s (mean, sd, HDI, MCSE, bulk/tail ESS, R-hat; one
    row per scalar parameter, at most 200 rows shown), printed to stdout, followed
    by ``Number of divergences: N`` when ``idata`` has a ``sample_stats`` group
    with ``diverging`` (N summed over chains and draws), as
    :meth:`numpyro.infer.MCMC.print_summary` does.

    Args:
        idata: an ``arviz.InferenceData`` with a ``posterior`` group, each site of
            shape ``(num_chains, num_draws, *site_shape)``.
        var_names: sites to summarise (default: all posterior sites).
        hdi_prob: mass of the highest-density interval, in (0, 1).

    Returns:
        ``None`` (the table goes to stdout; use :func:`summary` for a DataFrame).

    Raises:
        KeyError: a name in ``var_names`` is not a posterior site.

    References:
        Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), Rank-normalization,
        folding, and localization: an improved R-hat for assessing convergence of
        MCMC, Bayesian Analysis 16(2). https://doi.org/10.1214/20-BA1221

    Examples:
        >>> import contextlib, io
        >>> import arviz as az
        >>> rng = np.random.default_rng(0)
        >>> idata = az.from_dict(
        ...     posterior={"mu": rng.normal(size=(2, 100))},
        ...     sample_stats={"diverging": np.zeros((2, 100), dtype=bool)},
        ... )
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):
        ...     print_summary(idata)
        >>> "r_hat" in out.getvalue(), out.getvalue().rstrip().splitlines()[-1]
        (True, 'Number of divergences: 0')
    """
    import pandas as pd

    table = summary(idata, var_names=var_names, hdi_prob=hdi_prob)
    with pd.option_context("display.max_rows", 200, "display.width", 120):
        print(table)
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        print(f"\nNumber of divergences: {int(idata.sample_stats['diverging'].sum())}")


def draws_to_inference_data(
    values: dict[str, np.ndarray],
    axes: dict[str, int],
    plate: str | None,
    attrs: dict[str, Any] | None = None,
):
    """InferenceData (one chain) of draws assembled over shards.

    Sites that follow the split plate get the plate's name as their entity
    dimension, with coordinates ``0 .. num_entities - 1``.

    Args:
        values: site -> ``(num_draws, *site_shape)`` constrained draws (the output
            of :func:`raybayes.distributed.constrained_values`).
        axes: site -> entity axis of the site value (without the draw axis).
        plate: name of the split plate, or ``None``.
        attrs: attributes of the InferenceData.

    Returns:
        ``arviz.InferenceData`` with a ``posterior`` group of shape
        ``(1, num_draws, *site_shape)`` per site.
    """
    dims = {}
    for name, value in values.items():
        if name in axes and plate is not None:
            names = [f"{name}_dim_{k}" for k in range(np.ndim(value) - 1)]
            names[axes[name]] = plate
            dims[name] = names
    coords = {}
    if axes and plate is not None:
        first = next(iter(axes))
        coords = {plate: np.arange(values[first].shape[axes[first] + 1])}
    return to_inference_data(
        {k: np.asarray(v)[None] for k, v in values.items()},
        dims=dims,
        coords=coords,
        attrs=attrs or {},
    )
