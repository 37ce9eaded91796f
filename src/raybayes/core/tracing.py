"""One NumPyro trace of a model, taken abstractly (nothing compiled or run)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from numpyro import handlers

__all__ = ["abstract_trace"]


def abstract_trace(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    substitute_fn: Callable | None = None,
    concrete_observations: bool = False,
) -> dict:
    """The NumPyro trace of ``model(*model_args, **model_kwargs)``, traced abstractly.

    The model runs once under ``jax.make_jaxpr``: site names, shapes, plates and
    distributions are those of an eager run, but nothing is compiled or executed.
    Run eagerly, a model with a ``lax.scan`` (an HMM's forward algorithm) compiles
    the scan on every call, seconds each. The values of latent sites in the
    returned trace are abstract (use their shapes only); observations passed as
    data stay concrete.

    Falls back to an eager trace when the abstract one fails (a model with Python
    control flow on sampled values), or, with ``concrete_observations``, when an
    observed site's value is computed by the model.

    Args:
        model: a NumPyro model.
        model_args, model_kwargs: its arguments.
        seed: the seed handler's seed.
        substitute_fn: optional ``substitute_fn`` of ``numpyro.handlers.substitute``
            (e.g. ``init_to_uniform`` for improper priors).
        concrete_observations: require concrete values at observed sample sites
            (``numpyro.factor`` sites excepted).

    Returns:
        The trace, an ordered dict of site name -> site message.
    """
    model_kwargs = dict(model_kwargs or {})
    traced = handlers.seed(model, seed)
    if substitute_fn is not None:
        traced = handlers.substitute(traced, substitute_fn=substitute_fn)
    box = {}

    def run():
        box["trace"] = handlers.trace(traced).get_trace(*model_args, **model_kwargs)

    try:
        jax.make_jaxpr(run)()
        trace = box["trace"]
    except Exception:  # noqa: BLE001 - any failure: the eager trace decides
        trace = None
    if trace is not None and concrete_observations and any(
        isinstance(site.get("value"), jax.core.Tracer)
        for site in trace.values()
        if site["type"] == "sample"
        and site.get("is_observed")
        and type(site.get("fn")).__name__ != "Unit"  # numpyro.factor
    ):
        trace = None
    if trace is None:
        trace = handlers.trace(traced).get_trace(*model_args, **model_kwargs)
    return trace
