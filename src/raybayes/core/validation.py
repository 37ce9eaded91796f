"""Checks of a model's data made before any compute starts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from raybayes.errors import DataValidationError

__all__ = ["check_observed_data"]


def _concrete(value) -> np.ndarray | None:
    import jax

    if value is None or isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except Exception:  # noqa: BLE001 - not array-like: nothing to check
        return None


def _site_mask(site):
    """The site's mask: ``handlers.mask`` wraps ``fn`` in a ``MaskedDistribution``."""
    from numpyro.distributions import MaskedDistribution

    if site.get("mask") is not None:
        return site["mask"]
    fn = site.get("fn")
    while fn is not None:
        if isinstance(fn, MaskedDistribution) and not isinstance(fn._mask, bool):
            return fn._mask
        if isinstance(fn, MaskedDistribution) and fn._mask is False:
            return np.zeros((), bool)
        fn = getattr(fn, "base_dist", None)
    return None


def check_observed_data(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Refuse NaN or infinite values in a model's observed data, before compute.

    The model is traced once abstractly (:func:`raybayes.core.tracing.abstract_trace`;
    nothing is compiled or run). Every observed sample site whose value is data
    (``obs=``) is checked; entries that the site masks out (``obs_mask=`` of
    ``numpyro.sample``, or ``numpyro.handlers.mask``) are skipped.

    NaN is not read as "missing": a NaN observation makes the log density NaN (the
    sampler cannot initialise, an optimizer stops on a NaN gradient). To leave
    entries out, fill them with any finite value and mask them, e.g.
    ``numpyro.sample("y", dist.Normal(mu, 1), obs=np.nan_to_num(y),
    obs_mask=~np.isnan(y))`` (or ``with numpyro.handlers.mask(mask=~np.isnan(y))``
    around the site, which drops them without imputing them).

    A model that cannot be traced is not judged here: the entry point reports it.

    Args:
        model: a NumPyro model.
        model_args: its positional arguments.
        model_kwargs: its keyword arguments.

    Raises:
        DataValidationError: an observed site holds NaN or +-inf where it is not
            masked; the message names the site, the count and the first index
            (``column`` is the site name, ``num_bad_rows`` the count).

    Examples:
        >>> import numpy as np, numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> check_observed_data(model, (np.array([0.5, 1.0]),))
        >>> check_observed_data(model, (np.array([0.5, np.nan]),))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        raybayes.errors.DataValidationError: observed site 'y' holds 1 NaN value(s) ...
    """
    from raybayes.core.tracing import abstract_trace

    try:
        trace = abstract_trace(model, tuple(model_args), dict(model_kwargs or {}))
    except Exception:  # noqa: BLE001 - the entry point's own trace reports it
        return
    for name, site in trace.items():
        if site["type"] != "sample" or not site.get("is_observed"):
            continue
        value = _concrete(site.get("value"))
        if value is None or not np.issubdtype(value.dtype, np.inexact):
            continue
        bad = ~np.isfinite(value)
        if not bad.any():
            continue
        mask = _concrete(_site_mask(site))
        if mask is not None:
            event_dim = getattr(site.get("fn"), "event_dim", 0)
            try:
                mask = mask.astype(bool).reshape(mask.shape + (1,) * event_dim)
                bad = bad & np.broadcast_to(mask, bad.shape)
            except ValueError:
                pass  # a mask that does not broadcast: check every entry
            if not bad.any():
                continue
        nan = np.isnan(value) & bad
        kind = "NaN" if nan.any() else "infinite"
        count = int(nan.sum()) if nan.any() else int(bad.sum())
        first = tuple(int(i) for i in np.argwhere(nan if nan.any() else bad)[0])
        extra = ""
        if nan.any() and (bad & ~nan).any():
            extra = f" and {int((bad & ~nan).sum())} infinite value(s)"
        raise DataValidationError(
            f"observed site {name!r} holds {count} {kind} value(s){extra} (of "
            f"{value.size}), the first at index {first}. NaN or inf in observed data "
            "is not treated as missing. Fix or drop those entries, or fill them with "
            "any finite value and mask them: numpyro.sample(name, dist, "
            "obs=np.nan_to_num(y), obs_mask=~np.isnan(y)), or wrap the site in "
            "numpyro.handlers.mask(mask=~np.isnan(y)).",
            column=name,
            num_bad_rows=count,
            example={"index": first, "value": float(value[first])},
        )
