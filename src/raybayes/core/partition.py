"""How a model's data split into shards along one plate.

A :class:`Partition` names the split plate and says which model arguments follow it:

* ``entity_args``: arrays whose leading axis indexes the plate's entities (e.g.
  ``category_of_product``, shape ``(num_products,)``). A shard keeps its own rows.
* ``index_arg``: an integer array, one value per observation, giving the entity of
  each observation (e.g. ``product_idx``). A shard keeps the observations of its
  entities and renumbers the index to local entity ids ``0 .. num_local - 1``.
* ``obs_args``: arrays with one row per observation (``log_price``, ``units``); a
  shard keeps the rows of its own entities.
* ``obs_plate``: the plate of the observation sites, whose sites follow the split
  plate through ``index_arg`` (``"obs"``). Its sites belong to the shard.
* ``size_arg``: an optional integer argument that sets the plate's size
  (``num_times``); a shard gets its local count.
* ``size``: the plate's size when no argument gives it (the model takes it from
  the data, ``int(g.max()) + 1``); :func:`raybayes.plan` records it from the trace.
* ``arg_axes``: the axis of an entity argument that follows the plate, when it is
  not the leading one (``y`` of shape ``(num_reps, num_groups)`` under nested
  plates).

For a plain observation plate (logistic regression) there is no index: rows are the
entities, and ``entity_args`` are the per-row arrays (``X``, ``y``).

An entity argument may also be an entry of a mapping argument, named
``"argument.key"``: ``"centered.beta"`` is ``model_kwargs["centered"]["beta"]`` (the
per-product centring weights of :func:`raybayes.models.elasticity_model`). A shard
gets a copy of the mapping with its own rows of that entry.

Entities go to shards in contiguous blocks of about equal numbers of observations,
so that renumbering is a subtraction and a shard's rows are one slice when the data
are sorted by entity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raybayes.errors import ConfigurationError, DataValidationError

__all__ = [
    "Partition",
    "ShardSpec",
    "argument_value",
    "assign_entities",
    "shard_model_kwargs",
]


def argument_value(model_kwargs: Mapping[str, Any], name: str) -> Any:
    """The model argument ``name``, or the entry ``key`` of the mapping argument
    ``arg`` when ``name`` is ``"arg.key"``; ``None`` when either is missing.

    Example:
        >>> argument_value({"centered": {"beta": 1.0}}, "centered.beta")
        1.0
    """
    arg, _, key = name.partition(".")
    value = model_kwargs.get(arg)
    if not key:
        return value
    return value.get(key) if isinstance(value, Mapping) else None


def _has_argument(model_kwargs: Mapping[str, Any], name: str) -> bool:
    arg, _, key = name.partition(".")
    if not key:
        return arg in model_kwargs
    return isinstance(model_kwargs.get(arg), Mapping) and key in model_kwargs[arg]


def _set_argument(out: dict, name: str, value: Any) -> None:
    """Set ``name`` in ``out``; a mapping argument is copied before its entry is set."""
    arg, _, key = name.partition(".")
    if not key:
        out[arg] = value
    else:
        out[arg] = {**out[arg], key: value}


@dataclass(frozen=True)
class Partition:
    """Which plate to split, and which model arguments follow it.

    Attributes:
        plate: name of the split plate (``"products"``).
        entity_args: arguments indexed by the plate on their leading axis
            (``"arg.key"``: the entry ``key`` of the mapping argument ``arg``).
        index_arg: per-observation integer argument linking observations to entities,
            or ``None`` when the split plate is itself the observation plate.
        obs_args: per-observation arguments (``None`` values are allowed and kept).
        obs_plate: plate of the observation sites that follow ``index_arg``.
        size_arg: integer argument giving the plate size, replaced per shard.
        size: the plate's size when neither ``size_arg`` nor an entity argument
            gives it.
        arg_axes: ``((name, axis), ...)``: entity arguments split along an axis
            other than the leading one.

    Example:
        >>> Partition("products", entity_args=("category_of_product",),
        ...           index_arg="product_idx", obs_args=("log_price", "units"),
        ...           obs_plate="obs").local_plates == {"products", "obs"}
        True
    """

    plate: str
    entity_args: tuple[str, ...] = ()
    index_arg: str | None = None
    obs_args: tuple[str, ...] = ()
    obs_plate: str | None = None
    size_arg: str | None = None
    size: int | None = None
    arg_axes: tuple[tuple[str, int], ...] = ()

    def axis_of(self, name: str) -> int:
        """The axis of entity argument ``name`` that follows the plate (default 0)."""
        return dict(self.arg_axes).get(name, 0)

    @property
    def local_plates(self) -> frozenset[str]:
        """Plates whose sites belong to one shard (not scaled by 1/num_shards)."""
        plates = {self.plate}
        if self.obs_plate is not None:
            plates.add(self.obs_plate)
        return frozenset(plates)

    def num_entities(self, model_kwargs: Mapping[str, Any]) -> int:
        """Number of entities of the split plate in these arguments.

        Raises:
            ConfigurationError: the partition names no array to count entities with.
        """
        if self.size_arg is not None:
            return int(model_kwargs[self.size_arg])
        for name in self.entity_args:
            value = argument_value(model_kwargs, name)
            if value is not None:
                return int(np.shape(value)[self.axis_of(name)])
        if self.size is not None:
            return int(self.size)
        raise ConfigurationError(
            f"Partition(plate={self.plate!r}) names no entity array and no size_arg, "
            "so the number of entities is unknown; pass entity_args=, size_arg= or "
            "size= (or let raybayes.plan read the size from the model)."
        )

    def validate(self, model_kwargs: Mapping[str, Any]) -> None:
        """Check that the named arguments exist and agree in length.

        Raises:
            ConfigurationError: a named argument is missing.
            DataValidationError: arrays disagree in length, or the index has values
                outside ``[0, num_entities)``.
        """
        named = [*self.entity_args, *self.obs_args]
        named += [n for n in (self.index_arg, self.size_arg) if n is not None]
        missing = [n for n in named if not _has_argument(model_kwargs, n)]
        if missing:
            raise ConfigurationError(
                f"Partition(plate={self.plate!r}) names argument(s) {missing} that the "
                f"model arguments lack (they are {sorted(model_kwargs)}); fix the names."
            )
        num = self.num_entities(model_kwargs)
        for name in self.entity_args:
            value = argument_value(model_kwargs, name)
            axis = self.axis_of(name)
            if value is not None and np.shape(value)[axis] != num:
                raise DataValidationError(
                    f"argument {name!r} has {np.shape(value)[axis]} rows but plate "
                    f"{self.plate!r} has {num} entities; entity arrays must have one "
                    "row per entity.",
                    column=name,
                )
        if self.index_arg is None:
            return
        index = np.asarray(model_kwargs[self.index_arg])
        num_obs = index.shape[0]
        bad = (index < 0) | (index >= num)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataValidationError(
                f"argument {self.index_arg!r}: {int(bad.sum())} of {num_obs} values are "
                f"outside [0, {num}) (first at row {row}: {int(index[row])}); the index "
                f"must give each observation's entity of plate {self.plate!r}.",
                column=self.index_arg,
                num_bad_rows=int(bad.sum()),
                example={self.index_arg: int(index[row])},
            )
        for name in self.obs_args:
            value = model_kwargs[name]
            if value is not None and np.shape(value)[0] != num_obs:
                raise DataValidationError(
                    f"argument {name!r} has {np.shape(value)[0]} rows but "
                    f"{self.index_arg!r} has {num_obs}; per-observation arrays must "
                    "have one row per observation.",
                    column=name,
                )


@dataclass(frozen=True)
class ShardSpec:
    """Which entities (a contiguous block) and observations one shard holds.

    Attributes:
        shard_id: index of the shard, ``0 .. num_shards - 1``.
        num_shards: S.
        entity_start, entity_stop: the shard's entities are
            ``entity_start .. entity_stop - 1`` of the full plate.
    """

    shard_id: int
    num_shards: int
    entity_start: int
    entity_stop: int
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def num_entities(self) -> int:
        return self.entity_stop - self.entity_start


def assign_entities(
    counts: np.ndarray | int, num_shards: int, plate: str = "plate"
) -> list[ShardSpec]:
    """Split entities into ``num_shards`` contiguous blocks of about equal work.

    Args:
        counts: ``(num_entities,)`` observations per entity (the work it brings), or
            the number of entities (equal work each).
        num_shards: S, at least 1.
        plate: plate name, for error messages.

    Returns:
        ``num_shards`` :class:`ShardSpec`, each with at least one entity.

    Raises:
        ConfigurationError: ``num_shards`` < 1 or more shards than entities.

    Example:
        >>> [(s.entity_start, s.entity_stop) for s in assign_entities(5, 2)]
        [(0, 3), (3, 5)]
    """
    counts = np.ones(int(counts)) if np.ndim(counts) == 0 else np.asarray(counts, float)
    num = len(counts)
    if num_shards < 1:
        raise ConfigurationError(f"num_shards={num_shards}; use an integer >= 1.")
    if num_shards > num:
        raise ConfigurationError(
            f"num_shards={num_shards} but plate {plate!r} has only {num} entities; "
            f"each shard needs at least one. Use num_shards <= {num} or split another "
            "plate."
        )
    work = np.cumsum(counts + 1e-9)
    targets = work[-1] * np.arange(1, num_shards) / num_shards
    # A cut after entity b - 1 leaves work[b - 1] before it: take the b whose
    # work is nearest each target (ties: the later cut).
    after = np.clip(np.searchsorted(work, targets, side="left"), 0, num - 1)
    before = np.clip(after - 1, 0, num - 1)
    nearer_before = np.abs(work[before] - targets) < np.abs(work[after] - targets)
    cuts = np.where(nearer_before & (after > 0), before, after) + 1
    # Every shard gets at least one entity.
    cuts = np.maximum(cuts, np.arange(1, num_shards))
    cuts = np.minimum(cuts, num - num_shards + np.arange(1, num_shards))
    for k in range(1, len(cuts)):
        cuts[k] = max(cuts[k], cuts[k - 1] + 1)
    bounds = [0, *cuts.tolist(), num]
    return [
        ShardSpec(s, num_shards, int(bounds[s]), int(bounds[s + 1]))
        for s in range(num_shards)
    ]


def shard_model_kwargs(
    model_kwargs: Mapping[str, Any], partition: Partition, spec: ShardSpec
) -> dict[str, Any]:
    """The model arguments of one shard, with local entity ids.

    Args:
        model_kwargs: the full model arguments (NumPy arrays or scalars).
        partition: the split.
        spec: the shard (see :func:`assign_entities`).

    Returns:
        A copy of ``model_kwargs`` with entity arrays, observation arrays, the index
        (renumbered to ``0 .. spec.num_entities - 1``) and the size argument
        restricted to the shard. Other arguments are passed through.

    Example:
        >>> p = Partition("obs", entity_args=("x",))
        >>> shard_model_kwargs({"x": np.arange(5)}, p, assign_entities(5, 2)[1])["x"]
        array([3, 4])
    """
    out = dict(model_kwargs)
    lo, hi = spec.entity_start, spec.entity_stop
    for name in partition.entity_args:
        value = argument_value(model_kwargs, name)
        if value is not None:
            value = np.asarray(value)
            axis = partition.axis_of(name)
            _set_argument(out, name, value[(slice(None),) * axis + (slice(lo, hi),)])
    if partition.size_arg is not None:
        out[partition.size_arg] = hi - lo
    if partition.index_arg is not None:
        index = np.asarray(model_kwargs[partition.index_arg])
        mask = (index >= lo) & (index < hi)
        rows = np.flatnonzero(mask)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            rows = slice(int(rows[0]), int(rows[-1]) + 1)  # sorted data: a view
        out[partition.index_arg] = (index[rows] - lo).astype(index.dtype)
        for name in partition.obs_args:
            if name != partition.index_arg and model_kwargs[name] is not None:
                out[name] = np.asarray(model_kwargs[name])[rows]
    return out
