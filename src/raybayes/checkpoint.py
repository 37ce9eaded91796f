"""Checkpoint files that hold only arrays and plain metadata, never code.

A checkpoint is one NumPy ``.npz`` archive: every array leaf of the saved pytree is
one entry, and the tree's structure (dicts, lists, tuples, NamedTuples, ``None``,
Python numbers and strings) is a JSON document stored in the same archive as a
``uint8`` array. Reading uses ``numpy.load(allow_pickle=False)`` and ``json``, so a
checkpoint file cannot run code when it is loaded, whoever wrote it.

NamedTuples (NumPyro's ``HMCState``, Optax's optimizer states) are rebuilt from a
registry of known types, looked up by the name recorded in the file; a name that is
not in the registry is an error, never an import. JAX PRNG keys are stored as their
``uint32`` key data.

Checkpoints of earlier raybayes versions were pickles (``*.pkl``). They are not read:
:func:`load_checkpoint` refuses with :class:`~raybayes.errors.ConfigurationError`
when only the old file is there.

A checkpoint folder also holds its run's configuration, ``run.json``
(:func:`open_run`): the settings that change the results and a fingerprint of the
input (:func:`data_fingerprint`), compared on a rerun so that a run resumes only
with the same settings and data (:func:`describe_changes` words the differences).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from raybayes.errors import ConfigurationError
from raybayes.io import atomic_path

__all__ = [
    "RUN_FILE",
    "content_hash",
    "data_fingerprint",
    "describe_changes",
    "load_checkpoint",
    "open_run",
    "plain",
    "register_state_type",
    "save_checkpoint",
]

_FORMAT = "raybayes-checkpoint/1"
_META = "__structure__"
_REGISTRY: dict[str, type] = {}
_DEFAULTS_LOADED = False


def register_state_type(cls: type) -> type:
    """Allow checkpoints to hold the NamedTuple type ``cls``.

    Args:
        cls: a ``typing.NamedTuple`` class (its ``_fields`` are used).

    Returns:
        ``cls`` (usable as a class decorator).

    Raises:
        TypeError: ``cls`` is not a NamedTuple class.

    Examples:
        >>> from typing import NamedTuple
        >>> class Counter(NamedTuple):
        ...     count: int
        >>> register_state_type(Counter) is Counter
        True
    """
    if not (
        isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")
    ):
        raise TypeError(f"{cls!r} is not a NamedTuple class")
    _REGISTRY[_type_name(cls)] = cls
    return cls


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_default_types() -> None:
    """Register the NamedTuple states of the libraries raybayes runs (once)."""
    global _DEFAULTS_LOADED
    if _DEFAULTS_LOADED:
        return
    _DEFAULTS_LOADED = True
    import importlib

    for module_name in (
        "numpyro.infer.hmc",
        "numpyro.infer.hmc_util",
        "numpyro.infer.mcmc",
        "optax",
        "optax.tree_utils",
        "optax.contrib",
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - optional parts of the libraries
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, tuple)
                and hasattr(value, "_fields")
            ):
                _REGISTRY.setdefault(_type_name(value), value)


# -- encoding ------------------------------------------------------------------------
def _encode_key(key):
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, np.bool_)):
        return {"bool": bool(key)}
    if isinstance(key, (int, np.integer)):
        return {"int": int(key)}
    if isinstance(key, tuple):
        return {"tuple": [_encode_key(k) for k in key]}
    raise TypeError(
        f"checkpoint dict keys must be str, int or tuples of them, not {key!r}"
    )


def _decode_key(code):
    if isinstance(code, str):
        return code
    if "int" in code:
        return int(code["int"])
    if "bool" in code:
        return bool(code["bool"])
    return tuple(_decode_key(k) for k in code["tuple"])


def _encode(value, path: str, arrays: dict[str, np.ndarray]):
    if value is None:
        return {"t": "none"}
    if isinstance(value, (bool, np.bool_)) and not isinstance(value, np.ndarray):
        return {"t": "bool", "v": bool(value)}
    if isinstance(value, int):
        return {"t": "int", "v": value}
    if isinstance(value, float):
        return {"t": "float", "v": repr(value)}
    if isinstance(value, str):
        return {"t": "str", "v": value}
    if isinstance(value, dict):
        return {
            "t": "dict",
            "k": [_encode_key(k) for k in value],
            "v": [_encode(v, f"{path}[{k!r}]", arrays) for k, v in value.items()],
        }
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        name = _type_name(type(value))
        _load_default_types()
        if _REGISTRY.get(name) is not type(value):
            raise TypeError(
                f"cannot checkpoint {path} of type {name}: not a registered state "
                "type; "
                "call raybayes.checkpoint.register_state_type on it first."
            )
        return {
            "t": "namedtuple",
            "name": name,
            "v": [
                _encode(getattr(value, f), f"{path}.{f}", arrays) for f in value._fields
            ],
        }
    if isinstance(value, (list, tuple)):
        return {
            "t": type(value).__name__,
            "v": [_encode(v, f"{path}[{i}]", arrays) for i, v in enumerate(value)],
        }
    return _encode_array(value, path, arrays)


def _encode_array(value, path, arrays):
    entry = f"a{len(arrays)}"
    key_impl = None
    try:
        import jax

        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(
            value.dtype, jax.dtypes.prng_key
        ):
            key_impl = str(jax.random.key_impl(value))
            value = jax.random.key_data(value)
    except ImportError:  # pragma: no cover - jax is a dependency
        pass
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise TypeError(
            f"cannot checkpoint {path}: {type(value).__name__} is not an array"
        )
    arrays[entry] = array
    code = {"t": "array", "entry": entry, "path": path}
    if isinstance(value, np.generic):
        code["t"] = "scalar"
    if key_impl is not None:
        code["key_impl"] = key_impl
    return code


def _decode(code, arrays):
    kind = code["t"]
    if kind == "none":
        return None
    if kind in ("bool", "int", "str"):
        return code["v"]
    if kind == "float":
        return float(code["v"])
    if kind == "dict":
        keys = [_decode_key(k) for k in code["k"]]
        return {k: _decode(v, arrays) for k, v in zip(keys, code["v"], strict=True)}
    if kind in ("list", "tuple", "namedtuple"):
        items = [_decode(v, arrays) for v in code["v"]]
        if kind == "list":
            return items
        if kind == "tuple":
            return tuple(items)
        _load_default_types()
        cls = _REGISTRY.get(code["name"])
        if cls is None:
            raise ConfigurationError(
                f"the checkpoint holds a state of type {code['name']!r}, which is "
                "not a known state type; it was written by other code. Register the "
                "type with "
                "raybayes.checkpoint.register_state_type, or use a new checkpoint_dir."
            )
        return cls(*items)
    if kind in ("array", "scalar"):
        array = arrays[code["entry"]]
        if "key_impl" in code:
            import jax

            return jax.random.wrap_key_data(array, impl=code["key_impl"])
        return array[()] if kind == "scalar" else array
    raise ConfigurationError(f"unknown entry kind {kind!r} in the checkpoint")


# -- files ---------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, tree: Any) -> Path:
    """Write ``tree`` to ``path`` as an ``.npz`` archive, atomically.

    Args:
        path: the file to write (conventionally ``*.npz``); its folder is created.
        tree: a pytree of arrays (NumPy or JAX, PRNG keys included), Python numbers,
            strings and ``None``, in dicts (str, int or tuple keys), lists, tuples
            and registered NamedTuples (see :func:`register_state_type`).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: a leaf that is not an array or plain value, or an unregistered
            NamedTuple type (a programming error; nothing is written).

    Examples:
        >>> import tempfile, numpy as np
        >>> path = save_checkpoint(tempfile.mkdtemp() + "/s.npz", {"x": np.arange(3)})
        >>> load_checkpoint(path)["x"].tolist()
        [0, 1, 2]
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    structure = {"format": _FORMAT, "tree": _encode(tree, "state", arrays)}
    arrays[_META] = np.frombuffer(json.dumps(structure).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def load_checkpoint(path: str | os.PathLike, *, legacy_name: str | None = None) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint`; no code is run.

    Args:
        path: the ``.npz`` file.
        legacy_name: the file name the same state had in the old pickle format
            (e.g. ``"state.pkl"``), looked for in the same folder when ``path`` is
            missing.

    Returns:
        The saved pytree, with NumPy arrays as leaves (JAX PRNG keys as keys), or
        ``None`` if neither ``path`` nor the legacy file exists.

    Raises:
        ConfigurationError: only a checkpoint of the old pickle format is there (it
            is never unpickled: unpickling can run arbitrary code), or the file is
            not a raybayes checkpoint.

    Examples:
        >>> import tempfile
        >>> load_checkpoint(tempfile.mkdtemp() + "/missing.npz") is None
        True
    """
    path = Path(path)
    if not path.exists():
        legacy = path.with_name(legacy_name or path.stem + ".pkl")
        if legacy.exists():
            raise ConfigurationError(
                f"{str(legacy)!r} is a checkpoint in the old pickle format, which "
                "raybayes no longer reads because loading a pickle can run arbitrary "
                "code. Delete the checkpoint folder (or use a new checkpoint_dir) and "
                "rerun to write one in the new format (.npz + JSON)."
            )
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        structure = json.loads(arrays.pop(_META).tobytes().decode())
    except (ValueError, KeyError, OSError) as err:
        raise ConfigurationError(
            f"{str(path)!r} is not a raybayes checkpoint ({err}); delete it or use "
            "a new checkpoint_dir."
        ) from None
    if structure.get("format") != _FORMAT:
        raise ConfigurationError(
            f"{str(path)!r} has checkpoint format {structure.get('format')!r}; this "
            f"raybayes reads {_FORMAT!r}. Use a new checkpoint_dir."
        )
    return _decode(structure["tree"], arrays)


# -- run configurations (reruns) -----------------------------------------------------
#: The file of a checkpoint folder that stores its run's configuration.
RUN_FILE = "run.json"


def plain(value: Any) -> Any:
    """``value`` as it reads back from JSON, so stored and new settings compare.

    Examples:
        >>> plain({"a": (1, 2)})
        {'a': [1, 2]}
    """
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _hash_into(h, value) -> None:
    """Feed ``value`` (arrays, numbers, strings, containers of them) to ``h``."""
    if value is None or isinstance(value, str):
        h.update(repr(value).encode())
        return
    if isinstance(value, dict):
        h.update(b"dict")
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _hash_into(h, value[k])
        return
    if isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _hash_into(h, item)
        return
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - not array-like: only its type counts
        array = None
    if array is None or array.dtype.hasobject:
        h.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())
        return
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())


def content_hash(value: Any) -> str:
    """BLAKE2b (16 bytes, hex) of a value's arrays: dtype, shape and bytes of each.

    Numbers, strings, ``None`` and dicts, lists and tuples of them count by value;
    other objects by their type only.

    Examples:
        >>> import numpy as np
        >>> content_hash(np.zeros(2)) == content_hash(np.zeros(2, "f4"))
        False
    """
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    _hash_into(h, value)
    return h.hexdigest()


def data_fingerprint(
    model: Any, model_args: tuple = (), model_kwargs: dict | None = None
) -> dict[str, Any]:
    """A cheap fingerprint of a model and its data, to notice changed input on rerun.

    Each argument's content hash is BLAKE2b (16 bytes) over each array's dtype,
    shape and bytes (numbers, strings and containers of them included; other
    objects count by their type only). Arguments are named by the model's
    signature where it binds (``args[i]`` otherwise).

    Args:
        model: the model function (its qualified name is recorded).
        model_args: its positional arguments.
        model_kwargs: its keyword arguments.

    Returns:
        ``{"model": qualified name, "data": {argument name: hex digest}}``.

    Examples:
        >>> import numpy as np
        >>> def model(y): ...
        >>> fp = data_fingerprint(model, (np.zeros(3),))
        >>> sorted(fp["data"]), fp == data_fingerprint(model, (np.zeros(3),))
        (['y'], True)
    """
    import inspect

    model_kwargs = dict(model_kwargs or {})
    try:
        named = dict(
            inspect.signature(model).bind_partial(*model_args, **model_kwargs).arguments
        )
    except (TypeError, ValueError):
        named = {f"args[{i}]": a for i, a in enumerate(model_args)}
        named.update(model_kwargs)
    data = {str(name): content_hash(value) for name, value in named.items()}
    # The qualified name only: the module of the same function is ``__main__`` in a
    # script and its file's name when imported, and a rerun may do either.
    qualname = getattr(model, "__qualname__", type(model).__qualname__)
    return {"model": qualname, "data": data}


def describe_changes(
    old: dict, new: dict, keys, *, at_least=(), at_most=()
) -> list[str]:
    """The settings that differ between a stored and a new run, as readable lines.

    Args:
        old: the stored settings (as read from JSON).
        new: the new settings (passed through :func:`plain` here).
        keys: the settings to compare; ``"data"`` (a dict of argument digests, see
            :func:`data_fingerprint`) is compared per argument.
        at_least: keys whose value may grow on a rerun (e.g. ``target_ess``).
        at_most: keys whose value may shrink on a rerun (e.g. ``target_rhat``).

    Returns:
        One line per changed setting, e.g. ``"num_warmup: 500 -> 300"`` or
        ``"data: y changed"`` (``"data: not stored by the first run"`` for a key
        that the stored settings lack); empty when nothing changed.

    Examples:
        >>> describe_changes({"a": 1, "b": 2}, {"a": 1, "b": 3}, ["a", "b"])
        ['b: 2 -> 3']
    """
    new = plain(new)
    lines = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if key not in old and key in new:
            # a run.json of an earlier version, which did not record this setting
            lines.append(f"{key}: not stored by the first run")
            continue
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if name not in a:
                    lines.append(f"data: {name} added")
                elif name not in b:
                    lines.append(f"data: {name} removed")
                elif a[name] != b[name]:
                    lines.append(f"data: {name} changed")
            continue
        if a == b:
            continue
        if a is not None and b is not None:
            if key in at_least and b >= a:
                continue
            if key in at_most and b <= a:
                continue
        lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def open_run(
    directory: str | os.PathLike,
    config: dict,
    *,
    keys,
    at_least=(),
    at_most=(),
    overwrite: bool = False,
    checkpoint_files=(),
) -> bool:
    """Store a run's configuration in its checkpoint folder, or check a rerun's.

    On the first run ``config`` is written to ``directory/run.json`` (atomically).
    On a rerun the stored configuration is compared with ``config`` over ``keys``
    (see :func:`describe_changes`); the settings not in ``keys`` may change freely.

    Args:
        directory: the checkpoint folder (created if missing).
        config: the run's settings (JSON-able; ``plain`` is applied).
        keys: the settings that must match for the run to resume.
        at_least: keys that may grow on a rerun.
        at_most: keys that may shrink on a rerun.
        overwrite: delete ``run.json`` and the files matching ``checkpoint_files``
            (glob patterns; folders included) first, so that the run starts fresh.
        checkpoint_files: the glob patterns of the folder's checkpoint files.

    Returns:
        True when the folder already held this run's configuration (it resumes).

    Raises:
        ConfigurationError: the folder holds a run whose settings or data differ;
            names each change (``num_warmup: 500 -> 300``, ``data: y changed``)
            and the fix (``overwrite=True`` or a new ``checkpoint_dir``).

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> first = open_run(d, {"seed": 0}, keys=["seed"])
        >>> first, open_run(d, {"seed": 0}, keys=["seed"])
        (False, True)
    """
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RUN_FILE
    if overwrite:
        for pattern in (RUN_FILE, *checkpoint_files):
            for old_file in directory.glob(pattern):
                if old_file.is_dir():
                    shutil.rmtree(old_file)
                else:
                    old_file.unlink()
    config = plain(config)
    if path.exists():
        old = json.loads(path.read_text())
        changes = describe_changes(
            old, config, keys, at_least=at_least, at_most=at_most
        )
        if changes:
            raise ConfigurationError(
                f"checkpoint_dir={str(directory)!r} holds a run with other settings "
                f"or data ({'; '.join(changes)}); a rerun resumes only the same run. "
                "Pass overwrite=True to discard its checkpoint and start over, or use "
                "a new checkpoint_dir."
            )
        return True
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    return False
