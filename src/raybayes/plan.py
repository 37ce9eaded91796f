"""Automatic partitioning: which plate to split a model along, and why.

:func:`plan` traces the model once, lists every plate that could be split, and for
each estimates

* the bytes communicated per optimisation iteration: the global parameters (those
  outside the split plate) sent to every shard and their gradients reduced back,
  ``2 * num_global * bytes_per_value * num_shards``. Local parameters stay on their
  shard and cost nothing on the network;
* the memory of one shard: its slice of the data, the data every shard needs whole,
  its local parameters and a copy of the global ones.

It picks the split with the fewest bytes per iteration (ties: less memory per shard).
Splitting a hierarchical model along the plate that owns its local latent variables
(products, stores, series) gives data and model parallelism at once; splitting along
the observations makes every parameter global.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from raybayes.core.partition import Partition, assign_entities, shard_model_kwargs
from raybayes.core.shard_density import trace_latent_sites
from raybayes.core.tracing import (
    ModelStructure,
    _record_sites,
    abstract_trace,
    bind_arguments,
    model_structure,
)
from raybayes.errors import ConfigurationError

__all__ = ["Plan", "CandidateSplit", "check_partition", "plan", "resolve_split"]


@dataclass
class CandidateSplit:
    """One way of splitting a model.

    Attributes:
        plate: the split plate.
        partition: the :class:`~raybayes.core.Partition`, or ``None`` when the
            plate cannot be split.
        num_entities: the plate's size.
        num_global: unconstrained global parameters (communicated).
        num_local: unconstrained local parameters, all shards together.
        bytes_per_iteration: bytes sent and received by the driver per iteration.
        memory_per_shard_bytes: data + parameters held by one shard.
        feasible: whether this split can run with the requested shards.
        reason: why not, or a note.
    """

    plate: str
    partition: Partition | None
    num_entities: int
    num_global: int = 0
    num_local: int = 0
    bytes_per_iteration: int = 0
    memory_per_shard_bytes: int = 0
    feasible: bool = True
    reason: str = ""


@dataclass
class Plan:
    """The chosen split and the candidates it was chosen from.

    Attributes:
        num_shards: shards to run (1 when nothing can be split).
        chosen: the cheapest feasible :class:`CandidateSplit`, or ``None``.
        candidates: every plate considered, cheapest first.
        bytes_per_value: 4 (float32) or 8 (float64).
        explanation: what the plan found, in words ("observations follow
            `data`; `g` indexes `groups`; split `groups` into 2 shards: ...").
        model_args, model_kwargs: the arguments to run with (positional ones
            bound to their names).
    """

    num_shards: int
    chosen: CandidateSplit | None
    candidates: list[CandidateSplit] = field(default_factory=list)
    bytes_per_value: int = 4
    explanation: str = ""
    model_args: tuple = ()
    model_kwargs: dict = field(default_factory=dict, repr=False)

    @property
    def partition(self) -> Partition | None:
        """The partition to run with (``None``: one shard, no split)."""
        return self.chosen.partition if self.chosen is not None else None

    def __str__(self) -> str:
        lines = [
            f"raybayes plan: {self.num_shards} shard(s), "
            f"{self.bytes_per_value}-byte parameters"
        ]
        if self.explanation:
            lines.append(f"  {self.explanation}.")
        header = (
            f"  {'plate':<14}{'entities':>10}{'global':>10}{'local':>10}"
            f"{'net/iter':>12}{'mem/shard':>12}  note"
        )
        lines.append(header)
        for c in self.candidates:
            mark = "*" if c is self.chosen else " "
            lines.append(
                f"{mark} {c.plate:<14}{c.num_entities:>10}{c.num_global:>10}"
                f"{c.num_local:>10}{_fmt_bytes(c.bytes_per_iteration):>12}"
                f"{_fmt_bytes(c.memory_per_shard_bytes):>12}  {c.reason}"
            )
        if self.chosen is None:
            lines.append("no plate can be split: running on 1 shard.")
            return "\n".join(lines)
        c = self.chosen
        lines.append(
            f"chosen: split plate {c.plate!r}. Each iteration sends the {c.num_global} "
            f"global parameters to {self.num_shards} shard(s) and reduces their "
            f"gradients ({_fmt_bytes(c.bytes_per_iteration)}); the {c.num_local} local "
            f"parameters stay on their shard."
        )
        others = [o for o in self.candidates if o.feasible and o is not c]
        for o in others:
            if c.bytes_per_iteration > 0:
                ratio = o.bytes_per_iteration / c.bytes_per_iteration
                lines.append(
                    f"  splitting {o.plate!r} instead would send {ratio:.1f}x more."
                )
        return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def _array_kwargs(model_kwargs):
    return {
        k: np.asarray(v)
        for k, v in model_kwargs.items()
        if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) >= 1
    }


def _mapping_entries(model_kwargs, size):
    """``"arg.key"`` of every array entry of a mapping argument whose leading axis
    has the plate's size (e.g. per-product centring weights): a shard takes its
    rows of it. Their paths through the model are not followed (chosen by shape,
    as arrays whose dependencies are unknown; the shard check traces them)."""
    return [
        f"{k}.{key}"
        for k, v in model_kwargs.items()
        if isinstance(v, Mapping)
        for key, value in v.items()
        if isinstance(value, (np.ndarray, jax.Array))
        and np.ndim(value) >= 1
        and np.shape(value)[0] == size
    ]


def _coupling(structure, latent_in_plate, local):
    """Why no shard can evaluate its part alone, or ``None``: a site outside the
    shard's plates whose log density (or value) depends on latent sites of the
    split plate as a whole (a mean over the plate, say) would see only the
    shard's entries."""
    for name, deps in structure.depends_on.items():
        hit = sorted(deps & latent_in_plate)
        if name not in local and hit:
            return (
                f"site {name!r} lies outside it but depends on its latent site "
                f"{hit[0]!r} as a whole (e.g. a sum or mean over the plate); a "
                "shard sees only its own entries"
            )
    return None


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _follow_axis(value, size, reached, structure, plate):
    """The axis of ``value`` that follows ``plate`` (of ``size``), or ``None``.

    The leading axis when it has the plate's size; else the axis the plate's
    dimension takes in a reached site of the plate (nested plates, ``dim=-2``).
    """
    shape = np.shape(value)
    if shape and shape[0] == size:
        return 0
    for name in reached:
        site = structure.sites.get(name)
        if site is None or plate not in site.plate_names:
            continue
        dim = dict(site.plates)[plate]
        axis = len(shape) - site.event_dim + dim
        if 0 <= axis < len(shape) and shape[axis] == size:
            return axis
    return None


def _candidate(plate, size, structure, model_kwargs, arrays):
    """``(Partition or None, description or reason, size argument candidates)``
    for splitting ``plate``."""
    sites = structure.sites
    in_plate = {n for n, s in sites.items() if plate in s.plate_names}
    latent_in_plate = {
        n for n in in_plate if sites[n].type == "sample" and not sites[n].is_observed
    }
    observed_in_plate = {n for n in in_plate if sites[n].is_observed}
    ints = {
        k: v
        for k, v in model_kwargs.items()
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    }
    size_args = tuple(k for k, v in ints.items() if int(v) == size)
    reaches = structure.reaches
    index_args = set()
    for g in structure.gathers:
        if g.axis_size == size and g.operand_sites & latent_in_plate:
            index_args |= {
                k
                for k in g.index_args
                if k in arrays
                and arrays[k].ndim == 1
                and np.issubdtype(arrays[k].dtype, np.integer)
            }
    untracked = set(arrays) - set(structure.tracked)

    def reached(k):
        return reaches.get(k, frozenset())

    # A gather over several axes (gamma[t, c[p]]) names every index argument of
    # every axis: keep those whose values fit this plate, whose length is that of
    # a plate they reach, and (if still several) that use every entry.
    index_args = {
        k
        for k in index_args
        if arrays[k].size and 0 <= arrays[k].min() and arrays[k].max() < size
    }
    if len(index_args) > 1:
        index_args = {
            k
            for k in index_args
            if any(
                structure.plate_sizes.get(name) == arrays[k].shape[0]
                for n in reached(k) - in_plate
                for name, _ in sites[n].plates
            )
        } or index_args
    if len(index_args) > 1:
        index_args = {
            k for k in index_args if len(np.unique(arrays[k])) == size
        } or index_args

    if not index_args or observed_in_plate and not latent_in_plate:
        if not observed_in_plate:
            return (
                None,
                (
                    "no observation lies in this plate and no integer argument indexes "
                    "its latent variables"
                ),
                (),
            )
        # The observations live in this plate: split its rows.
        entity, axes = [], []
        for k, v in arrays.items():
            hits = reached(k) & in_plate if k in structure.tracked else in_plate
            if not hits:
                continue
            axis = _follow_axis(v, size, hits, structure, plate)
            if axis is None:
                continue
            entity.append(k)
            if axis:
                axes.append((k, axis))
        entity += _mapping_entries(model_kwargs, size)
        if not entity:
            return None, f"no argument has one row per entry of this plate ({size})", ()
        for k in entity:
            outside = sorted(n for n in reached(k) - in_plate)
            if outside:
                return (
                    None,
                    (
                        f"argument {k!r} follows this plate but also reaches "
                        f"{outside[0]!r} outside it; a shard's rows would change that "
                        "site. Compute it from the whole data outside the model "
                        "(pass it as an argument)"
                    ),
                    (),
                )
        why = _coupling(structure, latent_in_plate, in_plate)
        if why:
            return None, why, ()
        described = ", ".join(f"`{k}`" for k in entity)
        guessed = " (by shape)" if set(entity) & untracked else ""
        return (
            Partition(
                plate,
                entity_args=tuple(entity),
                size_arg=None,
                size=int(size),
                arg_axes=tuple(axes),
            ),
            f"observations follow `{plate}` ({described}{guessed})",
            size_args,
        )
    if len(index_args) > 1:
        return (
            None,
            (
                f"several integer arguments index its latent variables "
                f"({', '.join(sorted(index_args))}); pass partition= to say which one "
                "the observations follow"
            ),
            (),
        )
    (index_arg,) = index_args
    num_obs = int(arrays[index_arg].shape[0])
    obs_sites = reached(index_arg) - in_plate
    obs_plates = {
        name
        for n in obs_sites
        for name, _ in sites[n].plates
        if structure.plate_sizes.get(name) == num_obs
    }
    if len(obs_plates) != 1:
        why = "no plate" if not obs_plates else f"plates {sorted(obs_plates)}"
        return (
            None,
            (
                f"`{index_arg}` indexes it, but the sites it reaches lie in {why} of "
                f"{num_obs} entries; put them in one numpyro.plate"
            ),
            (),
        )
    (obs_plate,) = obs_plates
    in_obs = {n for n, s in sites.items() if obs_plate in s.plate_names}
    local = in_plate | in_obs
    entity, obs = [], []
    for k, v in arrays.items():
        if k == index_arg:
            continue
        hits = reached(k) if k in structure.tracked else local
        if not hits & local:
            continue
        gathered = any(
            index_arg in g.index_args and k in g.operand_args and g.axis_size == size
            for g in structure.gathers
        )
        if np.shape(v)[0] == num_obs and hits & in_obs:
            obs.append(k)
        elif np.shape(v)[0] == size and (
            gathered or hits & in_plate or k not in structure.tracked
        ):
            entity.append(k)
    entity += _mapping_entries(model_kwargs, size)
    for k in [index_arg, *entity, *obs]:
        outside = sorted(n for n in reached(k) - local)
        if outside:
            return (
                None,
                (
                    f"`{index_arg}` maps `{obs_plate}` to it, but {k!r} also reaches "
                    f"{outside[0]!r}, which lies outside both plates and would not "
                    "follow the split"
                ),
                (),
            )
    why = _coupling(structure, latent_in_plate, local)
    if why:
        return None, why, ()
    text = f"observations follow `{obs_plate}`"
    if obs:
        text += f" ({', '.join(f'`{k}`' for k in obs)})"
    text += f"; `{index_arg}` indexes `{plate}`"
    if entity:
        text += f" (with {', '.join(f'`{k}`' for k in entity)})"
    return (
        Partition(
            plate,
            entity_args=tuple(entity),
            index_arg=index_arg,
            obs_args=tuple(obs),
            obs_plate=obs_plate,
            size_arg=None,
            size=int(size),
        ),
        text,
        size_args,
    )


def _check_shards(model, model_args, model_kwargs, part, num_shards, structure):
    """Trace the first and last shard: ``None`` when they look right, else why not.

    A shard must see its own entries of the split plate (and of the observation
    plate), every other plate whole, and every global site at its full shape.
    """
    counts = (
        np.ones(part.num_entities(model_kwargs))
        if part.index_arg is None
        else np.bincount(
            np.asarray(model_kwargs[part.index_arg]),
            minlength=part.num_entities(model_kwargs),
        )
    )
    specs = assign_entities(counts, num_shards, part.plate)
    chosen = sorted({0, len(specs) - 1})
    local = part.local_plates
    for s in chosen:
        spec = specs[s]
        shard = shard_model_kwargs(model_kwargs, part, spec)
        try:
            tr = abstract_trace(model, model_args, shard)
        except Exception as err:  # noqa: BLE001 - reported as the reason
            return (
                f"the model does not run on shard {s}'s data "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}): it "
                f"must size plate `{part.plate}` from its arguments (e.g. "
                f"numpyro.plate({part.plate!r}, len(y))) and use each row within it"
            )
        _, sizes = _record_sites(tr)
        expected = {part.plate: spec.num_entities}
        if part.obs_plate is not None:
            expected[part.obs_plate] = int(np.asarray(shard[part.index_arg]).shape[0])
        for name, n in structure.plate_sizes.items():
            want = expected.get(name, n)
            got = sizes.get(name)
            if got is not None and got != want:
                if name == part.plate:
                    return (
                        f"on shard {s} plate `{name}` still has {got} entries instead "
                        f"of {want}: its size does not come from the data; write "
                        f"numpyro.plate({name!r}, len(...)) or pass the size as an "
                        "argument"
                    )
                return (
                    f"on shard {s} plate `{name}` has {got} entries instead of {want}"
                )
        for name, site in tr.items():
            rec = structure.sites.get(name)
            if rec is None or site["type"] != "sample" or site.get("is_observed"):
                continue
            frames = {f.name for f in site.get("cond_indep_stack", ())}
            if not frames & local and tuple(np.shape(site["value"])) != rec.shape:
                return (
                    f"on shard {s} the global site {name!r} has shape "
                    f"{tuple(np.shape(site['value']))} instead of {rec.shape}"
                )
    return None


def _verified(model, model_args, model_kwargs, part, size_args, num_shards, structure):
    """The partition (with the size argument that works), or ``(None, reason)``."""
    shards = max(2, int(num_shards))
    if part.num_entities(model_kwargs) < shards:
        return part, None  # too small: reported by the caller
    reason = None
    for size_arg in (None, *size_args):
        trial = dataclasses.replace(part, size_arg=size_arg)
        why = _check_shards(model, model_args, model_kwargs, trial, shards, structure)
        if why is None:
            return trial, None
        reason = reason or why
    return None, reason


def plan(
    model: Callable,
    model_kwargs: Mapping[str, Any] | None = None,
    num_shards: int = 1,
    *,
    model_args: tuple = (),
    partitions: list[Partition] | None = None,
    bytes_per_value: int | None = None,
    verbose: bool = False,
) -> Plan:
    """Choose the plate to split a model along, for ``num_shards`` shards.

    The model is read, not guessed at: plate sizes come from its trace, and which
    data arguments follow a plate, and which integer arguments index it, come from
    the jaxpr of its site log densities (:func:`raybayes.core.tracing.model_structure`):

    * an array *follows* a plate when it reaches a site inside the plate and has an
      axis of the plate's size (the leading one, or the plate's dimension under
      nested plates);
    * an integer array *indexes* a plate when it gives the indices of a gather
      (``a[g]``) of a latent site of that plate; the observations then follow it.

    Every candidate is checked by tracing its first and last shard: each must see
    its own entries of the split plate, every other plate whole and every global
    site at full shape. A candidate that fails says why (``CandidateSplit.reason``).

    Args:
        model: a NumPyro model.
        model_kwargs: its keyword arguments (NumPy arrays and scalars).
        num_shards: S, the number of shards wanted.
        model_args: positional model arguments; bound to their names first (see
            :func:`raybayes.core.tracing.bind_arguments`) so that they can be split.
        partitions: candidate splits given explicitly (the override); by default
            every plate of the model is considered.
        bytes_per_value: 4 or 8; by default that of JAX's default float.
        verbose: print the plan.

    Returns:
        :class:`Plan`; ``str(plan)`` explains the choice in words,
        ``plan.model_kwargs`` holds the (bound) arguments to run with.

    Raises:
        ConfigurationError: ``num_shards`` < 1; every splittable plate has fewer
            entries than ``num_shards``; or ``num_shards`` > 1 and no plate can be
            split (the message gives each plate's reason and what to do).

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(g, y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("groups", int(g.max()) + 1):
        ...         a = numpyro.sample("a", dist.Normal(mu, 1))
        ...     with numpyro.plate("data", len(g)):
        ...         numpyro.sample("y", dist.Normal(a[g], 1), obs=y)
        >>> g = np.repeat(np.arange(4), 3)
        >>> p = plan(model, {"g": g, "y": np.zeros(12)}, num_shards=2)
        >>> for part in p.explanation.split("; "):
        ...     print(part)
        observations follow `data` (`y`)
        `g` indexes `groups`
        split `groups` into 2 shards: 2 groups and 6 rows each
    """
    if int(num_shards) < 1:
        raise ConfigurationError(f"num_shards={num_shards}; use an integer >= 1.")
    num_shards = int(num_shards)
    model_args, model_kwargs = bind_arguments(model, model_args, model_kwargs)
    if bytes_per_value is None:
        bytes_per_value = 8 if jax.config.jax_enable_x64 else 4
    structure = model_structure(model, model_args, model_kwargs)
    sizes = structure.plate_sizes
    arrays = _array_kwargs(model_kwargs)
    total_data = sum(v.nbytes for v in arrays.values())
    _check_enumeration(structure)

    if partitions is None:
        found = []
        for plate_name, size in sizes.items():
            part, note, size_args = _candidate(
                plate_name, size, structure, model_kwargs, arrays
            )
            if part is not None:
                part, why = _verified(
                    model,
                    model_args,
                    model_kwargs,
                    part,
                    size_args,
                    num_shards,
                    structure,
                )
                if part is None:
                    note = why
            found.append((plate_name, size, part, note))
    else:
        found = [
            (p.plate, sizes.get(p.plate, p.num_entities(model_kwargs)), p, "given")
            for p in partitions
        ]

    candidates = []
    for plate_name, size, part, note in found:
        cand = CandidateSplit(plate_name, part, int(size), reason=note)
        if part is None:
            cand.feasible = False
            candidates.append(cand)
            continue
        try:
            sites, _ = trace_latent_sites(model, model_kwargs, part, model_args)
        except ConfigurationError as err:
            cand.feasible, cand.partition, cand.reason = False, None, str(err)
            candidates.append(cand)
            continue
        cand.num_global = sum(
            int(np.prod(s.unconstrained_shape))
            for s in sites.values()
            if not s.is_local
        )
        cand.num_local = sum(
            int(np.prod(s.unconstrained_shape)) for s in sites.values() if s.is_local
        )
        split_names = set(part.entity_args) | set(part.obs_args)
        if part.index_arg:
            split_names.add(part.index_arg)
        split_bytes = sum(arrays[k].nbytes for k in split_names if k in arrays)
        shards = min(num_shards, int(size))
        cand.bytes_per_iteration = 2 * cand.num_global * bytes_per_value * shards
        cand.memory_per_shard_bytes = int(
            split_bytes / shards
            + (total_data - split_bytes)
            + (cand.num_local / shards + cand.num_global) * bytes_per_value
        )
        if size < num_shards:
            cand.feasible = False
            cand.reason = f"only {size} entries for {num_shards} shards"
        candidates.append(cand)

    feasible = [c for c in candidates if c.feasible]
    order = lambda c: (not c.feasible, c.bytes_per_iteration, c.memory_per_shard_bytes)  # noqa: E731
    candidates.sort(key=order)
    if not feasible:
        too_small = [
            c
            for c in candidates
            if c.partition is not None and c.num_entities < num_shards
        ]
        if too_small:
            listing = ", ".join(f"{c.plate!r} has {c.num_entities}" for c in too_small)
            raise ConfigurationError(
                f"num_shards={num_shards} is more than the entries of every plate that "
                f"can be split ({listing}); use num_shards <= "
                f"{max(c.num_entities for c in too_small)}."
            )
        reasons = (
            "; ".join(f"{c.plate!r}: {c.reason}" for c in candidates)
            or "it has no numpyro.plate"
        )
        if num_shards > 1:
            raise ConfigurationError(
                f"num_shards={num_shards}, but the model has no plate that can be "
                f"split ({reasons}). Run with num_shards=1, put the observations in a "
                "numpyro.plate whose size comes from the data, or pass partition=."
            )
        result = Plan(1, None, candidates, bytes_per_value)
    else:
        result = Plan(num_shards, min(feasible, key=order), candidates, bytes_per_value)
    result.model_args, result.model_kwargs = model_args, model_kwargs
    if result.chosen is not None:
        result.explanation = _explain(result, model_kwargs)
    else:
        result.explanation = "no plate is split: the whole model is one shard"
    if verbose:
        print(result)
    return result


def _explain(result: Plan, model_kwargs) -> str:
    c = result.chosen
    part = c.partition
    S = result.num_shards
    specs = assign_entities(
        np.ones(c.num_entities)
        if part.index_arg is None
        else np.bincount(
            np.asarray(model_kwargs[part.index_arg]), minlength=c.num_entities
        ),
        S,
        part.plate,
    )
    entries = sorted({s.num_entities for s in specs})
    each = "each" if len(entries) == 1 else "per shard"
    counts = (
        f"{entries[0]:,}" if len(entries) == 1 else f"{entries[0]:,} to {entries[-1]:,}"
    )
    text = f"{c.reason}; split `{part.plate}` into {_plural(S, 'shard')}: {counts} "
    text += "rows" if part.index_arg is None else part.plate
    if part.index_arg is not None:
        index = np.asarray(model_kwargs[part.index_arg])
        rows = sorted(
            {
                int(((index >= s.entity_start) & (index < s.entity_stop)).sum())
                for s in specs
            }
        )
        rtext = f"{rows[0]:,}" if len(rows) == 1 else f"{rows[0]:,} to {rows[-1]:,}"
        text += f" and {rtext} rows"
    return text + f" {each}"


def _check_enumeration(structure) -> None:
    """Discrete latent sites that are not enumerated cannot be fitted here.

    Sites marked ``infer={"enumerate": "parallel"}`` are summed out of the shard
    log density (``numpyro.contrib.funsor``); whether they fit a split is checked
    with the partition (:func:`~raybayes.core.shard_density.trace_latent_sites`).
    """
    discrete = [
        n
        for n, s in structure.sites.items()
        if s.type == "sample"
        and not s.is_observed
        and s.is_discrete
        and not s.enumerated
    ]
    if discrete:
        name = discrete[0]
        raise ConfigurationError(
            f"latent site {name!r} ({len(discrete)} discrete latent site(s) in all) "
            "cannot be fitted by MAP, Laplace or SVI here: it is discrete and not "
            "enumerated. Mark it infer={'enumerate': 'parallel'} (or decorate the "
            "model with numpyro.contrib.funsor.config_enumerate) to sum it out, "
            "marginalise it in the model (e.g. dist.MixtureSameFamily), or run "
            "raybayes.sample."
        )


def resolve_split(
    model: Callable,
    model_args: tuple,
    model_kwargs: Mapping[str, Any] | None,
    num_shards: int,
    partition: Partition | None,
) -> tuple[tuple, dict, Partition | None, int]:
    """The arguments, partition and shard count a shard algorithm runs with.

    With ``num_shards=1`` and no partition a plan is not needed: the plate the
    plan would split is used when there is one (its sites are local blocks, the
    arrowhead structure of the Laplace step), and otherwise the whole model is one
    block. With more shards :func:`plan` chooses the split, unless a partition is
    given.

    Returns:
        ``(model_args, model_kwargs, partition, num_shards)`` with positional
        arguments bound to their names.

    Raises:
        ConfigurationError: see :func:`plan`; also a latent discrete site, and a
            given partition that does not fit the model (:func:`check_partition`).
    """
    model_args, model_kwargs = bind_arguments(model, model_args, model_kwargs)
    if partition is not None:
        check_partition(model, model_args, model_kwargs, partition, num_shards)
        return model_args, model_kwargs, partition, int(num_shards)
    if int(num_shards) == 1:
        _check_enumeration(_site_structure(model, model_args, model_kwargs))
        # A split plate on one shard still gives Laplace its arrowhead (local
        # blocks); a model without one runs as a single block.
        try:
            chosen = plan(model, model_kwargs, 1, model_args=model_args)
        except ConfigurationError:
            return model_args, model_kwargs, None, 1
        return model_args, model_kwargs, chosen.partition, 1
    chosen = plan(model, model_kwargs, num_shards, model_args=model_args)
    return chosen.model_args, chosen.model_kwargs, chosen.partition, chosen.num_shards


def check_partition(
    model: Callable,
    model_args: tuple,
    model_kwargs: Mapping[str, Any],
    partition: Partition,
    num_shards: int,
) -> None:
    """Check a partition given by the user the way :func:`plan` checks its own.

    The model is traced (abstractly, no compute) on the first and the last shard's
    data: each must see its own entries of the split plate (and of the observation
    plate), every other plate whole and every global site at its full shape. With
    ``num_shards=1`` the split into 2 shards is checked, since the partition still
    decides which sites are local blocks.

    Args:
        model: the NumPyro model.
        model_args: its positional arguments (bound ones excluded).
        model_kwargs: its keyword arguments (the whole data).
        partition: the user's :class:`~raybayes.core.partition.Partition`.
        num_shards: S.

    Raises:
        ConfigurationError: the plate is not in the model, or a shard's trace does
            not match the whole model's (the message says what differs on which
            shard and what to do); also the errors of
            :meth:`Partition.validate <raybayes.core.partition.Partition.validate>`.
        DataValidationError: see
            :meth:`Partition.validate <raybayes.core.partition.Partition.validate>`.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(x, y):
        ...     b = numpyro.sample("b", dist.Normal(0, 1))
        ...     with numpyro.plate("data", len(y)):
        ...         numpyro.sample("y", dist.Normal(b * x, 1), obs=y)
        >>> kw = {"x": np.ones(4), "y": np.ones(4)}
        >>> check_partition(model, (), kw, Partition("data", ("x", "y")), 2)
        >>> try:
        ...     check_partition(model, (), kw, Partition("data", ("y",)), 2)
        ... except ConfigurationError as err:
        ...     print(str(err)[:60])
        partition=Partition(plate='data', entity_args=('y',)) does n
    """
    structure = _site_structure(model, model_args, model_kwargs)
    label = _partition_label(partition)
    if partition.plate not in structure.plate_sizes:
        plates = ", ".join(f"`{p}`" for p in structure.plate_sizes) or "none"
        raise ConfigurationError(
            f"partition={label} names plate `{partition.plate}`, which the model "
            f"does not have (its plates: {plates}); name one of them, or leave "
            "partition=None and let raybayes.plan choose the split."
        )
    partition.validate(model_kwargs)
    shards = max(2, int(num_shards))
    if partition.num_entities(model_kwargs) < shards:
        return  # more shards than entries: reported when the shards are assigned
    why = _check_shards(
        model, model_args, model_kwargs, partition, shards, structure
    )
    if why is not None:
        raise ConfigurationError(
            f"partition={label} does not fit the model: {why}. Name every argument "
            "that follows the plate in entity_args (per-entity arrays) or obs_args "
            "with index_arg (per-observation arrays), or leave partition=None and "
            "let raybayes.plan find the split."
        )


def _partition_label(partition: Partition) -> str:
    """``Partition(plate=..., <the fields that are set>)``."""
    fields = [f"plate={partition.plate!r}"]
    for f in dataclasses.fields(partition)[1:]:
        value = getattr(partition, f.name)
        if value not in (None, ()):
            fields.append(f"{f.name}={value!r}")
    return f"Partition({', '.join(fields)})"


def _site_structure(model, model_args, model_kwargs):
    """The sites of a model only (no jaxpr), as a ``ModelStructure``."""
    tr = abstract_trace(model, model_args, model_kwargs)
    sites, sizes = _record_sites(tr)
    return ModelStructure(sites, sizes, {}, (), frozenset())
