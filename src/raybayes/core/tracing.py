"""What a model is made of, read without running it.

* :func:`abstract_trace`: one NumPyro trace of a model, taken abstractly (nothing
  compiled or run).
* :func:`model_structure`: which data arguments reach which sites, and which
  integer arguments index which latent sites (``a[g]``), from the jaxpr of the
  model's site log densities.
* :func:`bind_arguments`: positional model arguments bound to their names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

__all__ = [
    "Gather",
    "ModelStructure",
    "SiteRecord",
    "abstract_trace",
    "bind_arguments",
    "model_structure",
]


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
    if (
        trace is not None
        and concrete_observations
        and any(
            isinstance(site.get("value"), jax.core.Tracer)
            for site in trace.values()
            if site["type"] == "sample"
            and site.get("is_observed")
            and type(site.get("fn")).__name__ != "Unit"  # numpyro.factor
        )
    ):
        trace = None
    if trace is None:
        trace = handlers.trace(traced).get_trace(*model_args, **model_kwargs)
    return trace


def bind_arguments(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[tuple, dict]:
    """Positional model arguments bound to their parameter names.

    A split can only replace arguments it can name, so the positional arguments of
    ``model(J, y, sigma)`` become keyword arguments. Arguments the signature cannot
    name (``*args``) stay positional.

    Args:
        model: the model function.
        model_args: positional arguments.
        model_kwargs: keyword arguments.

    Returns:
        ``(remaining_positional, keyword_arguments)``.

    Example:
        >>> def model(J, y, sigma=None): ...
        >>> bind_arguments(model, (8, [1.0]), {"sigma": 2.0})
        ((), {'J': 8, 'y': [1.0], 'sigma': 2.0})
    """
    model_kwargs = dict(model_kwargs or {})
    if not model_args:
        return (), model_kwargs
    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):
        return tuple(model_args), model_kwargs
    named = [
        p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD,)
    ]
    if any(p.kind == p.POSITIONAL_ONLY for p in sig.parameters.values()):
        return tuple(model_args), model_kwargs
    if len(model_args) > len(named):
        return tuple(model_args), model_kwargs
    out = dict(zip(named, model_args, strict=False))
    clash = set(out) & set(model_kwargs)
    if clash:
        raise TypeError(
            f"model argument(s) {sorted(clash)} given both by position and by name."
        )
    out.update(model_kwargs)
    return (), out


@dataclass(frozen=True)
class SiteRecord:
    """One site of the model, as the structure analysis sees it.

    Attributes:
        name: site name.
        type: ``"sample"`` or ``"deterministic"``.
        plates: ``(plate name, dim)`` of the enclosing plates, outermost first.
        shape: value shape.
        event_dim: number of event dimensions of the distribution.
        is_observed: an observed sample site (``numpyro.factor`` included).
        is_discrete: a latent with a discrete support.
        enumerated: marked ``infer={"enumerate": "parallel"}`` (summed out).
    """

    name: str
    type: str
    plates: tuple
    shape: tuple
    event_dim: int = 0
    is_observed: bool = False
    is_discrete: bool = False
    enumerated: bool = False

    @property
    def plate_names(self) -> frozenset:
        return frozenset(p for p, _ in self.plates)


@dataclass(frozen=True)
class Gather:
    """An indexing ``operand[index]`` of a model value by a data argument.

    Attributes:
        index_args: the data arguments the indices are computed from.
        operand_sites: the latent sites the indexed value is computed from.
        axis_size: size of the indexed axis of the operand.
        operand_args: the data arguments the indexed value is computed from.
    """

    index_args: frozenset
    operand_sites: frozenset
    axis_size: int
    operand_args: frozenset = frozenset()


@dataclass(frozen=True)
class ModelStructure:
    """Which data arguments reach which sites, and which index which latents.

    Found from one abstract trace of the model and the jaxpr of its site log
    densities, with the data and the latent values as inputs: an argument
    *reaches* a site when the site's log density (or a deterministic value)
    depends on it; an integer argument *indexes* a latent site when it gives the
    indices of a gather whose operand depends on that site.

    Attributes:
        sites: site name -> :class:`SiteRecord`, in trace order.
        plate_sizes: plate name -> size.
        reaches: array argument -> names of the sites it reaches.
        gathers: every gather with data-dependent indices.
        tracked: the arguments whose dependencies are known (others were needed
            as concrete values by the model, e.g. ``G = int(g.max()) + 1``; an
            integer argument used that way is still recognised as an index when
            the gather's indices equal its values).
        depends_on: site name -> the latent sites its log density (or its value,
            for a deterministic site) depends on.
    """

    sites: dict
    plate_sizes: dict
    reaches: dict
    gathers: tuple
    tracked: frozenset
    depends_on: dict = field(default_factory=dict)


def _record_sites(trace) -> tuple[dict, dict]:
    sites, sizes = {}, {}
    for name, site in trace.items():
        if site["type"] not in ("sample", "deterministic"):
            continue
        frames = site.get("cond_indep_stack", ())
        for f in frames:
            sizes.setdefault(f.name, int(f.size))
        fn = site.get("fn")
        support = getattr(fn, "support", None)
        sites[name] = SiteRecord(
            name=name,
            type=site["type"],
            plates=tuple((f.name, int(f.dim)) for f in reversed(frames)),
            shape=tuple(np.shape(site["value"])),
            event_dim=len(getattr(fn, "event_shape", ())) if fn is not None else 0,
            is_observed=bool(site.get("is_observed")),
            is_discrete=bool(getattr(support, "is_discrete", False)),
            enumerated=(site.get("infer") or {}).get("enumerate") == "parallel",
        )
    return sites, sizes


_CALL_PRIMITIVES = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "checkpoint",
    "custom_lin",
}


def _sub_jaxprs(eqn):
    for key, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns") and hasattr(inner, "invars"):
                yield key, inner


def _propagate(jaxpr, in_deps, const_deps, gathers):
    """Forward dependency labels through ``jaxpr``; collects gathers."""
    env = {}

    def read(v):
        if type(v).__name__ == "Literal":
            return frozenset()
        return env.get(v, frozenset())

    for v, d in zip(jaxpr.constvars, const_deps, strict=False):
        env[v] = d
    for v, d in zip(jaxpr.invars, in_deps, strict=True):
        env[v] = d
    columns = {}  # index arrays stacked along their last axis: deps per column
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        union = frozenset().union(*ins) if ins else frozenset()
        name = eqn.primitive.name
        if name == "concatenate" and eqn.outvars[0].aval.ndim:
            if eqn.params["dimension"] == eqn.outvars[0].aval.ndim - 1:
                cols = []
                for v, d in zip(eqn.invars, ins, strict=True):
                    width = v.aval.shape[-1] if v.aval.ndim else 1
                    cols += columns.get(v, [d] * width)
                columns[eqn.outvars[0]] = cols
        elif name == "convert_element_type" and eqn.invars[0] in columns:
            columns[eqn.outvars[0]] = columns[eqn.invars[0]]
        if name == "gather":
            operand, indices = ins[0], ins[1]
            dnums = eqn.params["dimension_numbers"]
            shape = eqn.invars[0].aval.shape
            cols = columns.get(eqn.invars[1])
            if cols is None or len(cols) != len(dnums.start_index_map):
                cols = [indices] * len(dnums.start_index_map)
            for axis, deps in zip(dnums.start_index_map, cols, strict=True):
                gathers.append((deps, operand, int(shape[axis])))
        elif name in ("dynamic_slice", "dynamic_update_slice"):
            for axis, idx in enumerate(ins[1 if name == "dynamic_slice" else 2 :]):
                if idx:
                    gathers.append((idx, ins[0], int(eqn.invars[0].aval.shape[axis])))
        outs = None
        subs = list(_sub_jaxprs(eqn))
        for _, inner in subs:
            if len(inner.invars) == len(eqn.invars):
                inner_out = _propagate(inner, ins, (), gathers)
                if name in _CALL_PRIMITIVES and len(inner_out) == len(eqn.outvars):
                    outs = inner_out
            elif len(inner.invars) == len(eqn.invars) - 1:  # cond branches
                _propagate(inner, ins[1:], (), gathers)
            else:
                _propagate(inner, [union] * len(inner.invars), (), gathers)
        if outs is None:
            outs = [union] * len(eqn.outvars)
        for v, d in zip(eqn.outvars, outs, strict=True):
            env[v] = d
    return [read(v) for v in jaxpr.outvars]


def model_structure(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
) -> ModelStructure:
    """How the data arguments of a model reach its sites (see :class:`ModelStructure`).

    Args:
        model: a NumPyro model.
        model_args: positional arguments (never followed).
        model_kwargs: keyword arguments; arrays of one or more dimensions are
            followed through the model.

    Returns:
        :class:`ModelStructure`.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(g, y):
        ...     with numpyro.plate("groups", int(g.max()) + 1):
        ...         a = numpyro.sample("a", dist.Normal(0, 1))
        ...     with numpyro.plate("data", len(g)):
        ...         numpyro.sample("y", dist.Normal(a[g], 1), obs=y)
        >>> s = model_structure(model, (), {"g": np.array([0, 1, 1]), "y": np.zeros(3)})
        >>> s.plate_sizes, sorted(s.reaches["y"])
        ({'groups': 2, 'data': 3}, ['y'])
        >>> [(sorted(x.index_args), sorted(x.operand_sites)) for x in s.gathers]
        [(['g'], ['a'])]
    """
    model_kwargs = dict(model_kwargs or {})
    trace = abstract_trace(model, model_args, model_kwargs)
    sites, sizes = _record_sites(trace)
    arrays = {
        k: v
        for k, v in model_kwargs.items()
        if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) >= 1
    }
    latents = {
        name: jax.ShapeDtypeStruct(
            jnp.shape(site["value"]), jnp.result_type(site["value"])
        )
        for name, site in trace.items()
        if site["type"] == "sample" and not site.get("is_observed")
    }
    integer = {
        k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.integer)
    }
    attempts = [set(arrays), set(arrays) - integer, set()]
    for followed in attempts:
        result = _try_structure(
            model, model_args, model_kwargs, arrays, latents, followed, integer
        )
        if result is not None:
            reaches, gathers, depends_on = result
            return ModelStructure(
                sites, sizes, reaches, gathers, frozenset(followed), depends_on
            )
    return ModelStructure(sites, sizes, {}, (), frozenset())


def _try_structure(model, model_args, model_kwargs, arrays, latents, followed, integer):
    names = sorted(followed)
    fixed = {k: v for k, v in model_kwargs.items() if k not in followed}
    box = {}

    def run(traced_arrays, latent_values):
        seeded = handlers.substitute(handlers.seed(model, 0), data=latent_values)
        tr = handlers.trace(seeded).get_trace(
            *model_args, **fixed, **dict(zip(names, traced_arrays, strict=True))
        )
        out, order = [], []
        for name, site in tr.items():
            if site["type"] == "sample":
                value = site["fn"].log_prob(site["value"])
            elif site["type"] == "deterministic":
                value = site["value"]
            else:
                continue
            order.append(name)
            out.append(jnp.asarray(value))
        box["order"] = order
        return out

    latent_names = sorted(latents)
    try:
        closed = jax.make_jaxpr(
            lambda a, lat: run(a, dict(zip(latent_names, lat, strict=True)))
        )(
            [
                jax.ShapeDtypeStruct(np.shape(arrays[k]), jnp.asarray(arrays[k]).dtype)
                for k in names
            ],
            [latents[k] for k in latent_names],
        )
    except Exception:  # noqa: BLE001 - the model needs concrete values: follow fewer
        return None
    jaxpr = closed.jaxpr
    in_deps = [frozenset({("arg", k)}) for k in names]
    in_deps += [frozenset({("site", k)}) for k in latent_names]
    # Integer arguments the model needed concrete: recognise them among the
    # constants by value (an index used as ``a[g]`` is kept as is).
    const_deps = []
    for c in closed.consts:
        label = frozenset()
        arr = np.asarray(c)
        if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
            for k in sorted(integer - set(followed)):
                v = np.asarray(arrays[k])
                if v.shape == arr.shape and np.array_equal(v, arr):
                    label = label | {("arg", k)}
        const_deps.append(label)
    gathers_raw = []
    out_deps = _propagate(jaxpr, in_deps, const_deps, gathers_raw)
    reaches = {k: set() for k in arrays}
    depends_on = {}
    for site, deps in zip(box["order"], out_deps, strict=True):
        depends_on[site] = frozenset(k for kind, k in deps if kind == "site")
        for kind, k in deps:
            if kind == "arg" and k in reaches:
                reaches[k].add(site)
    gathers = []
    for idx, operand, axis_size in gathers_raw:
        index_args = frozenset(k for kind, k in idx if kind == "arg")
        operand_sites = frozenset(k for kind, k in operand if kind == "site")
        operand_args = frozenset(k for kind, k in operand if kind == "arg")
        if index_args and (operand_sites or operand_args):
            g = Gather(index_args, operand_sites, axis_size, operand_args)
            if g not in gathers:
                gathers.append(g)
    return {k: frozenset(v) for k, v in reaches.items()}, tuple(gathers), depends_on
