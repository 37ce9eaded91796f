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

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from raybayes.core.partition import Partition
from raybayes.core.tracing import abstract_trace
from raybayes.core.shard_density import trace_latent_sites
from raybayes.errors import ConfigurationError, RaybayesWarning

__all__ = ["Plan", "CandidateSplit", "plan"]


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
    """

    num_shards: int
    chosen: CandidateSplit | None
    candidates: list[CandidateSplit] = field(default_factory=list)
    bytes_per_value: int = 4

    @property
    def partition(self) -> Partition | None:
        """The partition to run with (``None``: one shard, no split)."""
        return self.chosen.partition if self.chosen is not None else None

    def __str__(self) -> str:
        lines = [
            f"raybayes plan: {self.num_shards} shard(s), "
            f"{self.bytes_per_value}-byte parameters"
        ]
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


def _plate_sizes(tr):
    sizes, observed_plates = {}, []
    for site in tr.values():
        if site["type"] != "sample":
            continue
        frames = site.get("cond_indep_stack", ())
        for f in frames:
            sizes.setdefault(f.name, f.size)
        if site.get("is_observed"):
            observed_plates.append({f.name for f in frames})
    return sizes, observed_plates


def _candidate_partition(plate, size, sizes, observed_plates, model_kwargs, arrays):
    """A Partition for ``plate``, or ``(None, reason)``."""
    ints = {
        k: v
        for k, v in model_kwargs.items()
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    }
    size_args = [k for k, v in ints.items() if int(v) == size]
    others = [p for p, n in sizes.items() if p != plate and n == size]
    if others:
        # Plate sizes coincide (say as many weeks as products): an argument named
        # after another plate of that size (num_times for "times") sizes that one.
        size_args = [
            k for k in size_args
            if not any(o.rstrip("s").lower() in k.lower() for o in others)
        ]
    if len(size_args) > 1:
        stem = plate.rstrip("s").lower()
        named = [k for k in size_args if stem in k.lower()]
        if len(named) != 1:
            return None, (
                f"more than one integer argument equals its size {size} "
                f"({', '.join(size_args)}); pass partition= to say which one sizes it"
            )
        size_args = named
    size_arg = size_args[0] if size_args else None
    if observed_plates and all(plate in p for p in observed_plates):
        # The observations live in this plate: split its rows.
        entity = tuple(k for k, v in arrays.items() if v.shape[0] == size)
        if not entity:
            return None, "no argument has one row per entry of this plate"
        return Partition(plate, entity_args=entity, size_arg=size_arg), "rows split"
    # A plate of latent variables: observations must follow it through an index.
    obs_plates = {name for p in observed_plates for name in p if name != plate}
    obs_sized = [(name, sizes[name]) for name in obs_plates]
    if len(obs_sized) != 1:
        return None, "observations are not in one plate that could follow this one"
    obs_plate, num_obs = obs_sized[0]
    index = [
        k
        for k, v in arrays.items()
        if v.shape == (num_obs,)
        and np.issubdtype(v.dtype, np.integer)
        and v.min() >= 0
        and v.max() < size
        and len(np.unique(v)) == size
    ]
    if len(index) > 1:
        stem = plate.rstrip("s").lower()
        named = [k for k in index if stem in k.lower()]
        index = named if len(named) == 1 else index
    if len(index) != 1:
        why = "no" if not index else f"an ambiguous ({index})"
        return (
            None,
            f"{why} integer argument maps observations to entries of this plate",
        )
    index_arg = index[0]
    entity = tuple(
        k for k, v in arrays.items() if v.shape[0] == size and k != index_arg
    )
    obs = tuple(
        k for k, v in arrays.items() if v.shape[0] == num_obs and k != index_arg
    )
    return (
        Partition(
            plate,
            entity_args=entity,
            index_arg=index_arg,
            obs_args=obs,
            obs_plate=obs_plate,
            size_arg=size_arg,
        ),
        f"observations follow {index_arg!r}",
    )


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

    Args:
        model: a NumPyro model.
        model_kwargs: its keyword arguments (NumPy arrays and scalars).
        num_shards: S, the number of shards wanted.
        model_args: positional model arguments (never split).
        partitions: candidate splits given explicitly; by default every plate of
            the model is considered and its arguments are inferred: arrays with one
            row per plate entry, and for a plate of latent variables the integer
            argument that maps each observation to its entry.
        bytes_per_value: 4 or 8; by default that of JAX's default float.
        verbose: print the plan.

    Returns:
        :class:`Plan`; ``str(plan)`` explains the choice.

    Raises:
        ConfigurationError: ``num_shards`` < 1, or every splittable plate has fewer
            entries than ``num_shards``.

    Warns:
        RaybayesWarning: the model has no plate that can be split; it runs on one
            shard.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> p = plan(model, {"y": np.zeros(10)}, num_shards=2)
        >>> p.partition.plate, p.chosen.num_global
        ('obs', 1)
    """
    if int(num_shards) < 1:
        raise ConfigurationError(f"num_shards={num_shards}; use an integer >= 1.")
    model_kwargs = dict(model_kwargs or {})
    if bytes_per_value is None:
        bytes_per_value = 8 if jax.config.jax_enable_x64 else 4
    tr = abstract_trace(model, model_args, model_kwargs)
    sizes, observed_plates = _plate_sizes(tr)
    arrays = _array_kwargs(model_kwargs)
    total_data = sum(v.nbytes for v in arrays.values())

    if partitions is None:
        found = []
        for plate, size in sizes.items():
            part, note = _candidate_partition(
                plate, size, sizes, observed_plates, model_kwargs, arrays
            )
            found.append((plate, size, part, note))
    else:
        found = [
            (p.plate, sizes.get(p.plate, p.num_entities(model_kwargs)), p, "given")
            for p in partitions
        ]

    candidates = []
    for plate, size, part, note in found:
        cand = CandidateSplit(plate, part, int(size), reason=note)
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
        shards = min(int(num_shards), int(size))
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
            or "it has no plate"
        )
        warnings.warn(
            f"the model has no plate that can be split ({reasons}); running on 1 shard. "
            "Put the observations in a numpyro.plate, or pass partitions=.",
            RaybayesWarning,
            stacklevel=2,
        )
        result = Plan(1, None, candidates, bytes_per_value)
    else:
        result = Plan(
            int(num_shards),
            feasible[0] if feasible else None,
            candidates,
            bytes_per_value,
        )
        result.chosen = min(feasible, key=order)
    if verbose:
        print(result)
    return result
