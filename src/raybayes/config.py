"""The public vocabulary shared by every entry point.

Every entry point (:func:`raybayes.sample`, :func:`raybayes.fit_map`,
:func:`raybayes.laplace_approximation`, :func:`raybayes.fit_svi`,
:func:`raybayes.fit_many`, the GLM estimators) takes:

- ``seed``: an integer. Every stream of randomness is derived from it with
  :func:`derive_key` (``fold_in`` of a stable stream id), never ``seed + 1``, so a
  run with seed ``s`` shares no stream with a run with seed ``s + 1``.
- the scaling configuration of :class:`ScalingConfig`: ``num_workers``,
  ``use_gpu``, ``resources_per_worker``, ``address`` (Ray's names).
- ``backend``: ``"auto"`` (the default), ``"local"``, ``"ray"`` or a backend
  instance; ``"auto"`` is resolved by :func:`resolve_backend_name`.

Renamed arguments keep their old name for one release through
:func:`renamed_argument`, which warns with a :class:`FutureWarning`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

from raybayes.errors import ConfigurationError

__all__ = [
    "CheckpointConfig",
    "ScalingConfig",
    "config_or_keywords",
    "derive_key",
    "renamed_argument",
    "resolve_backend_name",
    "resolve_scaling",
    "reject_unknown_arguments",
    "split_model_arguments",
]


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """Where the work runs: Ray's scaling vocabulary, accepted by every entry point.

    Args:
        num_workers: number of worker processes (Ray actors); ``None`` lets the
            entry point choose (one per shard, or one per CPU for chains).
        use_gpu: one GPU per worker (Ray only).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 4, "GPU": 1}``.
        address: a Ray cluster address (``"HOST:PORT"``); ``None`` uses
            ``RAY_ADDRESS`` when set, else an embedded local Ray instance.

    Raises:
        ConfigurationError: ``num_workers`` below 1, negative resources, or a
            ``use_gpu``/``resources_per_worker`` pair that disagree.

    Examples:
        >>> ScalingConfig(num_workers=4).num_workers
        4
    """

    num_workers: int | None = None
    use_gpu: bool = False
    resources_per_worker: Mapping[str, float] | None = None
    address: str | None = None

    def __post_init__(self):
        n = self.num_workers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigurationError(
                f"num_workers={n!r} is not allowed; pass a positive integer (or None to "
                "let raybayes choose)."
            )
        for name, value in (self.resources_per_worker or {}).items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigurationError(
                    f"resources_per_worker[{name!r}]={value!r} is not allowed; pass a "
                    "non-negative number, e.g. {'CPU': 1, 'GPU': 1}."
                )
        if self.resources_per_worker is not None and self.use_gpu:
            if float(self.resources_per_worker.get("GPU", 0)) <= 0:
                raise ConfigurationError(
                    "use_gpu=True with resources_per_worker that asks for no GPU; set "
                    "resources_per_worker['GPU'] or drop use_gpu."
                )

    @property
    def wants_cluster(self) -> bool:
        """True when the settings only make sense on Ray (an address, GPUs, >1 worker)."""
        return (
            self.address is not None
            or bool(os.environ.get("RAY_ADDRESS"))
            or self.use_gpu
            or self.resources_per_worker is not None
            or (self.num_workers is not None and self.num_workers > 1)
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often a run writes its checkpoint (Ray Train's name).

    Args:
        directory: the checkpoint folder; ``None``: no checkpoint. On a cluster it
            must be storage every node can reach.
        every: steps between checkpoints.
        overwrite: delete the folder's checkpoint first and start fresh (a rerun
            with other settings is refused otherwise).

    Raises:
        ConfigurationError: ``every`` is not a positive integer.

    Examples:
        >>> CheckpointConfig("ckpt", every=100).every
        100
    """

    directory: str | os.PathLike | None = None
    every: int = 500
    overwrite: bool = False

    def __post_init__(self):
        e = self.every
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ConfigurationError(
                f"CheckpointConfig(every={e!r}) is not allowed; pass a positive "
                "integer (steps between checkpoints), e.g. every=500."
            )


def config_or_keywords(name: str, config: Any, cls: type, keywords: Mapping) -> Any:
    """A frozen config object given as ``name=`` or built from its flat keywords.

    Entry points take a group of settings either as one object (e.g.
    ``checkpoint=CheckpointConfig(...)``) or, as before, as separate keywords;
    both forms are supported, not both at once.

    Args:
        name: the entry point's argument that takes the object (for messages).
        config: the object given, or ``None``.
        cls: the config class (a frozen dataclass).
        keywords: ``{field: (keyword name, value given)}``; a value equal to the
            field's default counts as not given.

    Returns:
        ``config``, or ``cls(**values)`` (validated by the class).

    Raises:
        ConfigurationError: ``config`` is not a ``cls``, or it was given together
            with one of the flat keywords (names both).

    Examples:
        >>> config_or_keywords("checkpoint", None, CheckpointConfig,
        ...                    {"every": ("checkpoint_every", 50)}).every
        50
    """
    if config is None:
        return cls(**{f: v for f, (_, v) in keywords.items()})
    if not isinstance(config, cls):
        raise ConfigurationError(
            f"{name}={config!r} is not a {cls.__name__}; pass {name}="
            f"{cls.__name__}(...) or None."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for field_name, (keyword, value) in keywords.items():
        if value is not defaults[field_name] and value != defaults[field_name]:
            raise ConfigurationError(
                f"both {name}= and {keyword}= were given; put {field_name}= in the "
                f"{cls.__name__} only."
            )
    return config


def resolve_backend_name(backend: Any, scaling: ScalingConfig, *, parallel_work: int = 1):
    """The backend an entry point uses for ``backend="auto"``.

    ``"auto"`` is Ray when the scaling configuration asks for a cluster (an address,
    ``RAY_ADDRESS``, GPUs, custom resources or ``num_workers > 1``), or when the job
    has independent pieces of work (``parallel_work > 1``: chains, shards) and this
    machine has more than one CPU; otherwise in-process, so that a one-shot job on
    one machine does not pay for workers it does not need. Other values pass through.

    Args:
        backend: ``"auto"``, ``"local"``, ``"ray"`` or a backend instance.
        scaling: the entry point's :class:`ScalingConfig`.
        parallel_work: how many pieces of the job could run at once.

    Returns:
        ``"local"``, ``"ray"`` or the backend instance given.

    Raises:
        ConfigurationError: an unknown backend name.
    """
    if not isinstance(backend, str):
        return backend
    if backend not in ("auto", "local", "ray"):
        raise ConfigurationError(
            f"backend={backend!r} is not known; use 'auto' (default), 'local' or 'ray'."
        )
    if backend != "auto":
        return backend
    if scaling.wants_cluster:
        return "ray"
    if parallel_work > 1 and (os.cpu_count() or 1) > 1:
        return "ray"
    return "local"


def resolve_scaling(
    backend: Any = "auto",
    num_workers: int | None = None,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    address: str | None = None,
    *,
    parallel_work: int | None = None,
) -> tuple[ScalingConfig, Any]:
    """An entry point's scaling configuration and backend, from its arguments.

    The one place where an entry point's ``backend``, ``num_workers``,
    ``use_gpu``, ``resources_per_worker`` and ``address`` are checked and combined.

    Args:
        backend: ``"auto"``, ``"local"``, ``"ray"`` or a backend instance.
        num_workers: see :class:`ScalingConfig`.
        use_gpu: see :class:`ScalingConfig`.
        resources_per_worker: see :class:`ScalingConfig`.
        address: see :class:`ScalingConfig`.
        parallel_work: how many pieces of the job could run at once (chains,
            shards, batches); with it ``"auto"`` is resolved
            (:func:`resolve_backend_name`). ``None``: the backend name is only
            checked, and ``"auto"`` is resolved later, when the work is known.

    Returns:
        ``(scaling, backend)``: the validated :class:`ScalingConfig`, and
        ``"local"``, ``"ray"``, ``"auto"`` (when ``parallel_work`` is ``None``) or
        the backend instance given.

    Raises:
        ConfigurationError: an unknown backend name or an invalid scaling setting
            (see :class:`ScalingConfig`).

    Examples:
        >>> scaling, name = resolve_scaling("auto", num_workers=1, parallel_work=1)
        >>> scaling.num_workers, name
        (1, 'local')
    """
    scaling = ScalingConfig(
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources_per_worker,
        address=address,
    )
    if parallel_work is None:
        resolve_backend_name(backend, scaling)  # an unknown name fails here
        return scaling, backend
    return scaling, resolve_backend_name(backend, scaling, parallel_work=parallel_work)


def derive_key(seed: int, *stream: int | str):
    """The JAX key of one stream of randomness: ``fold_in`` of each stream id in turn.

    A string id is folded as its CRC-32, so names such as ``"draws"`` give stable,
    distinct streams. ``derive_key(seed)`` is ``PRNGKey(seed)``.

    Args:
        seed: the user's integer seed.
        *stream: stable ids (chain index, shard index, group hash, a stream name).

    Returns:
        A ``jax.random.PRNGKey``-style key, shape ``(2,)``, dtype ``uint32``.

    Raises:
        ConfigurationError: ``seed`` is not an integer.

    Examples:
        >>> import jax
        >>> bool((derive_key(3, 0) == jax.random.fold_in(jax.random.PRNGKey(3), 0)).all())
        True
    """
    import jax

    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            import numpy as np

            if isinstance(seed, np.integer):
                seed = int(seed)
            else:
                raise TypeError
        except TypeError:
            raise ConfigurationError(
                f"seed={seed!r} is not an integer; pass an int such as seed=0."
            ) from None
    key = jax.random.PRNGKey(seed)
    for s in stream:
        if isinstance(s, str):
            s = zlib.crc32(s.encode())
        key = jax.random.fold_in(key, int(s) & 0xFFFFFFFF)
    return key


_MISSING = object()


def renamed_argument(
    kwargs: dict, old: str, new: str, value: Any = _MISSING, *, default: Any = None
):
    """Pop a deprecated argument name from ``kwargs`` and return the value to use.

    Used for one release after a rename: the old name still works, with a
    :class:`FutureWarning` that names the new one.

    Args:
        kwargs: the entry point's ``**kwargs`` (the old name is popped from it).
        old: the old argument name.
        new: the new argument name.
        value: the value given under the new name (leave unset when the new name
            was not passed).
        default: the new argument's default, used to tell whether it was passed.

    Returns:
        The value under the new name, or under the old one when only that was given.

    Raises:
        ConfigurationError: both names were given with different values.
    """
    if old not in kwargs:
        return default if value is _MISSING else value
    old_value = kwargs.pop(old)
    warnings.warn(
        f"{old}= is deprecated and will be removed in the next release; use {new}=.",
        FutureWarning,
        stacklevel=3,
    )
    if value is not _MISSING and value is not default and value != default:
        raise ConfigurationError(
            f"both {old}= (deprecated) and {new}= were given; pass only {new}=."
        )
    return old_value


def split_model_arguments(
    model_args: tuple, model_kwargs: Mapping[str, Any] | None, kwargs: dict
) -> tuple[tuple, dict]:
    """The ``(model_args, model_kwargs)`` of an entry point with the signature
    ``(model, *model_args, model_kwargs=None, ...)``, old call forms included.

    For one release the old forms keep working with a :class:`FutureWarning`: the
    model's keyword arguments as the first positional argument after the model (a
    :class:`~collections.abc.Mapping`), and ``model_args=`` as a keyword.

    Args:
        model_args: the entry point's ``*model_args``.
        model_kwargs: its ``model_kwargs=``.
        kwargs: its ``**kwargs`` (``model_args`` is popped from it).

    Returns:
        ``(model_args, model_kwargs)``; ``model_kwargs`` is ``{}`` when not given.

    Raises:
        ConfigurationError: the model's keyword arguments were given twice.

    Examples:
        >>> split_model_arguments((1.0,), {"y": 2}, {})
        ((1.0,), {'y': 2})
    """
    model_args = tuple(model_args)
    if model_args and isinstance(model_args[0], Mapping):
        warnings.warn(
            "passing the model's keyword arguments as the second positional argument "
            "is deprecated and will be removed in the next release; use "
            "model_kwargs=.",
            FutureWarning,
            stacklevel=3,
        )
        if model_kwargs is not None:
            raise ConfigurationError(
                "the model's keyword arguments were given twice (positionally and as "
                "model_kwargs=); pass only model_kwargs=."
            )
        model_kwargs, model_args = model_args[0], model_args[1:]
    if "model_args" in kwargs:
        old = tuple(kwargs.pop("model_args") or ())
        warnings.warn(
            "model_args= is deprecated and will be removed in the next release; pass "
            "the model's positional arguments after the model: f(model, *model_args).",
            FutureWarning,
            stacklevel=3,
        )
        if model_args and old:
            raise ConfigurationError(
                "the model's positional arguments were given twice (after the model "
                "and as model_args=); pass them only after the model."
            )
        model_args = model_args or old
    return model_args, dict(model_kwargs) if model_kwargs is not None else {}


def reject_unknown_arguments(kwargs: Mapping[str, Any], name: str) -> None:
    """Raise for keyword arguments an entry point does not take (what is left of its
    ``**kwargs`` after the deprecated names were popped).

    Raises:
        ConfigurationError: ``kwargs`` is not empty; names the first argument.
    """
    if kwargs:
        first = next(iter(kwargs))
        raise ConfigurationError(
            f"{name}() got an unknown argument {first}=; see help({name}) for the "
            "arguments it takes."
        )
