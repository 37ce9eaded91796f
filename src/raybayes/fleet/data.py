"""The input of a fleet job: a hive-partitioned Parquet data set, its groups and checks.

The data set is opened with an explicit schema: the columns of the first readable
file, the value column read as ``float64`` whatever each file stores (so a null or
NaN count is missing in every file, whether it stores ``int64`` or ``float64``),
and the partition fields as strings. A file that cannot be read (empty, truncated)
therefore makes only its own group ``invalid``, not the whole job.

Each group's input has a fingerprint (its files' paths, sizes and modification
times), stored in its manifest record, so that a rerun notices a file that changed
since the group was fitted or rejected.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raybayes.errors import ConfigurationError, DataValidationError

__all__ = [
    "FleetInput",
    "open_input",
    "validate_group",
]


def _data_files(root: Path, exclude: Path | None = None) -> list[Path]:
    """Data files under ``root`` as pyarrow lists them (skips ``.x`` and ``_x``)."""
    if root.is_file():
        return [root]
    out = []
    skip = exclude.resolve() if exclude is not None else None
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith((".", "_")) and (Path(folder) / d).resolve() != skip
        )
        out += [Path(folder) / f for f in sorted(files) if not f.startswith((".", "_"))]
    return out


def _partition_fields(root: Path, path: Path) -> dict[str, str]:
    parts = path.relative_to(root).parts[:-1] if root.is_dir() else ()
    return {
        unquote(p.split("=", 1)[0]): unquote(p.split("=", 1)[1])
        for p in parts
        if "=" in p
    }


class FleetInput:
    """A fleet job's data set: files, schema, groups and per-group fingerprints.

    Built by :func:`open_input`; reads file footers (one schema) and folder names,
    never rows, except when a group key is stored inside the files.

    Attributes:
        root: the data folder.
        schema: the ``pyarrow.Schema`` every file is read with.
        groups: sorted list of group keys (dicts key column -> value).
        files: ``(relative path, size in bytes, modification time in ns)`` of
            every data file.
    """

    def __init__(
        self,
        root: Path,
        schema: pa.Schema,
        groups: list[dict],
        files: list,
        files_of: dict[str, list[int]] | None,
    ):
        self.root = root
        self.schema = schema
        self.groups = groups
        self.files = files
        self._files_of = files_of

    def fingerprint(self, gid: str) -> str:
        """SHA-256 (16 hex digits) of the group's files' paths, sizes and mtimes.

        When the group keys are partition folders, only the group's own files count;
        otherwise every file of the data set does.
        """
        idx = (
            self._files_of.get(gid, [])
            if self._files_of is not None
            else range(len(self.files))
        )
        text = "\n".join(
            f"{self.files[i][0]}\t{self.files[i][1]}\t{self.files[i][2]}" for i in idx
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def group_files(self, gid: str) -> list[str] | None:
        """Relative paths of the group's files (``None``: keys inside the files)."""
        if self._files_of is None:
            return None
        return [self.files[i][0] for i in self._files_of.get(gid, [])]


def schema_bytes(schema: pa.Schema) -> bytes:
    """The schema serialized (to hand it to workers)."""
    return schema.serialize().to_pybytes()


def dataset_from(
    root: str | Path,
    schema: pa.Schema | bytes,
    files: list[str] | None = None,
    exclude: str | Path | None = None,
):
    """``pyarrow.dataset.Dataset`` read with ``schema`` (no file is inspected).

    Args:
        root: the data folder.
        schema: from :class:`FleetInput` (or its serialized bytes).
        files: paths relative to ``root`` to read (default: every data file).
        exclude: a folder inside ``root`` to leave out (the job's output folder).
    """
    if isinstance(schema, (bytes, bytearray)):
        schema = pa.ipc.read_schema(pa.py_buffer(schema))
    part = pa.schema([f for f in schema if f.metadata == {b"raybayes": b"partition"}])
    root = Path(root)
    if files is None:
        paths = [
            str(p)
            for p in _data_files(root, None if exclude is None else Path(exclude))
        ]
    else:
        paths = [str(root / f) for f in files]
    return ds.dataset(
        paths,
        format="parquet",
        schema=schema,
        partitioning=ds.partitioning(part, flavor="hive") if len(part) else None,
        partition_base_dir=str(root),
    )


def open_input(
    data: str | Path,
    group_keys: list[str],
    time_column: str,
    value_column: str,
    exclude: str | Path | None = None,
) -> FleetInput:
    """List the files and groups of a fleet data set and fix its schema.

    Args:
        data: folder of a hive-partitioned Parquet data set (``k1=v1/k2=v2/*.parquet``).
        group_keys: key columns (partition fields or columns of the files).
        time_column, value_column: the timestamps and the counts.
        exclude: a folder inside ``data`` that is not data (the output folder).

    Returns:
        :class:`FleetInput`.

    Raises:
        ConfigurationError: the folder does not exist, holds no readable Parquet
            file, or lacks a key, time or value column (names it and the available
            columns).
    """
    root = Path(data)
    if not root.exists():
        raise ConfigurationError(
            f"data={str(data)!r} does not exist; pass the folder of a hive-partitioned "
            "Parquet data set."
        )
    paths = _data_files(root, None if exclude is None else Path(exclude))
    file_schema = None
    for p in paths:
        try:
            file_schema = pq.read_schema(p)
            break
        except (pa.ArrowException, OSError):
            continue
    if file_schema is None:
        raise ConfigurationError(
            f"no readable Parquet file under {str(data)!r} ({len(paths)} files found)."
        )
    parts = [_partition_fields(root, p) for p in paths]
    part_names = list(dict.fromkeys(k for d in parts for k in d))
    fields = []
    for f in file_schema:
        if f.name in part_names:
            continue
        fields.append(pa.field(f.name, pa.float64()) if f.name == value_column else f)
    fields += [
        pa.field(k, pa.string(), metadata={"raybayes": "partition"}) for k in part_names
    ]
    schema = pa.schema(fields)
    names = schema.names
    for role, cols in (
        ("group key", group_keys),
        ("time", [time_column]),
        ("value", [value_column]),
    ):
        missing = [c for c in cols if c not in names]
        if missing:
            raise ConfigurationError(
                f"{role} column {missing[0]!r} is not in the data set {str(data)!r}; "
                f"available columns: {names}. Fix --group-keys / the column names."
            )
    files = []
    for p in paths:
        st = p.stat()
        rel = p.relative_to(root).as_posix() if root.is_dir() else p.name
        files.append((rel, st.st_size, st.st_mtime_ns))
    from raybayes.fleet import store

    if all(k in part_names for k in group_keys):
        files_of: dict[str, list[int]] | None = {}
        keys = {}
        for i, d in enumerate(parts):
            if all(k in d for k in group_keys):
                key = {k: d[k] for k in group_keys}
                gid = store.group_id(key)
                keys[gid] = key
                files_of.setdefault(gid, []).append(i)
        groups = list(keys.values())
    else:
        files_of = None
        table = dataset_from(root, schema, exclude=exclude).to_table(columns=group_keys)
        table = table.group_by(group_keys).aggregate([])
        groups = [
            dict(zip(group_keys, row, strict=True))
            for row in zip(
                *[table.column(k).to_pylist() for k in group_keys], strict=True
            )
        ]
    groups.sort(key=store.group_id)
    return FleetInput(root, schema, groups, files, files_of)


def _bad(message, column, rows, example):
    return DataValidationError(
        message, column=column, num_bad_rows=int(rows), example=example
    )


def _timestamps(col: pa.ChunkedArray, time_column: str) -> np.ndarray:
    """The time column as ``datetime64[ns]``; null or unparseable values are errors."""
    nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
    if nulls.any():
        first = int(np.flatnonzero(nulls)[0])
        raise _bad(
            f"null timestamps in column {time_column!r}: {int(nulls.sum())} rows, "
            "first "
            f"at row {first} of the group. Drop those rows or fill in their times.",
            time_column,
            nulls.sum(),
            {"row": first},
        )
    typ = col.type
    if pa.types.is_timestamp(typ) or pa.types.is_date(typ):
        return np.asarray(col.to_numpy(zero_copy_only=False)).astype("datetime64[ns]")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        text = col.to_pandas()
        parsed = pd.to_datetime(text, errors="coerce", format="ISO8601")
        bad = np.asarray(parsed.isna())
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise _bad(
                f"unparseable timestamps in column {time_column!r}: {int(bad.sum())} "
                f"rows, e.g. {text.iloc[first]!r} at row {first} of the group. Use "
                "ISO 8601 text (2024-01-01T05:00) or a Parquet timestamp column.",
                time_column,
                bad.sum(),
                {"row": first, time_column: text.iloc[first]},
            )
        if parsed.dt.tz is not None:
            parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
        return parsed.to_numpy().astype("datetime64[ns]")
    raise _bad(
        f"column {time_column!r} has type {typ}, not timestamps; store a Parquet "
        "timestamp column or ISO 8601 text.",
        time_column,
        len(col),
        None,
    )


def validate_group(
    table: pa.Table,
    time_column: str,
    value_column: str,
    min_points: int,
    frequency: str = "1h",
):
    """Check one group's rows; return its series on a regular time grid.

    Missing values (null or NaN) are allowed: they are marginalized. Steps absent
    from the grid (gaps) become explicit missing values. Everything else that is
    wrong is an error, before any compute.

    Args:
        table: the group's rows (any order).
        time_column, value_column: column names.
        min_points: fewest non-missing values accepted.
        frequency: the grid step, a pandas offset alias (``"1h"``).

    Returns:
        ``(timestamps, values, num_filled)``: ``(T,)`` ``datetime64[ns]`` on the
        grid from the first to the last timestamp, ``(T,)`` ``float64`` values (NaN
        where missing), and the number of steps added for gaps.

    Raises:
        DataValidationError: too few rows or points; null, unparseable,
            duplicated or off-grid timestamps; gaps of more missing steps than
            three times the rows; infinite, negative or non-integer counts. The
            message names the column, the count and the first offending row.
    """
    n = table.num_rows
    if n < min_points:
        raise _bad(
            f"too few points: {n} rows, at least min_points={min_points} needed.",
            value_column,
            n,
            None,
        )
    t = _timestamps(table.column(time_column), time_column)
    v = table.column(value_column).cast(pa.float64()).to_numpy(zero_copy_only=False)
    v = np.asarray(v, np.float64)
    inf = np.flatnonzero(np.isinf(v))
    if inf.size:
        i = int(inf[0])
        raise _bad(
            f"infinite counts in column {value_column!r}: {inf.size} rows, first at "
            f"row {i} of the group ({value_column}={v[i]} at {t[i]}). Counts must be "
            "finite; "
            "a missing count is null or NaN.",
            value_column,
            inf.size,
            {"row": i, time_column: str(t[i]), value_column: float(v[i])},
        )
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    dup = np.nonzero(t[1:] == t[:-1])[0]
    if dup.size:
        raise _bad(
            f"duplicated timestamps in column {time_column!r}: {dup.size} duplicates, "
            f"e.g. {t[dup[0]]}. Aggregate or drop duplicate rows.",
            time_column,
            dup.size,
            {time_column: str(t[dup[0]])},
        )
    finite = np.isfinite(v)
    neg = np.nonzero(finite & (v < 0))[0]
    if neg.size:
        raise _bad(
            f"negative counts in column {value_column!r}: {neg.size} rows, e.g. "
            f"{value_column}={v[neg[0]]} at {t[neg[0]]}.",
            value_column,
            neg.size,
            {time_column: str(t[neg[0]]), value_column: float(v[neg[0]])},
        )
    frac = np.nonzero(finite & (v != np.round(v)))[0]
    if frac.size:
        raise _bad(
            f"non-integer counts in column {value_column!r}: {frac.size} rows, e.g. "
            f"{value_column}={v[frac[0]]} at {t[frac[0]]}.",
            value_column,
            frac.size,
            {time_column: str(t[frac[0]]), value_column: float(v[frac[0]])},
        )
    step = np.timedelta64(pd.Timedelta(frequency).value, "ns")
    offset = (t - t[0]) / step
    off = np.flatnonzero(offset != np.round(offset))
    if off.size:
        i = int(off[0])
        raise _bad(
            f"irregular time steps in column {time_column!r}: {off.size} timestamps "
            "are "
            f"off the {frequency} grid that starts at {t[0]}, e.g. {t[i]}. Round the "
            f"times to the grid, or pass the data's step as frequency=.",
            time_column,
            off.size,
            {time_column: str(t[i])},
        )
    idx = np.round(offset).astype(np.int64)
    length = int(idx[-1]) + 1 if len(idx) else 0
    num_filled = length - len(t)
    if num_filled > 3 * len(t):
        gap = int(np.argmax(np.diff(idx))) if len(idx) > 1 else 0
        raise _bad(
            f"gaps in column {time_column!r}: the {frequency} grid from {t[0]} to "
            f"{t[-1]} has {length} steps but only {len(t)} rows (the largest gap "
            f"follows {t[gap]}). Check for stray timestamps.",
            time_column,
            num_filled,
            {time_column: str(t[gap])},
        )
    if num_filled:
        grid_v = np.full(length, np.nan)
        grid_v[idx] = v
        t = t[0] + np.arange(length) * step
        v = grid_v
    if int(np.isfinite(v).sum()) < min_points:
        raise _bad(
            f"too few points: {int(np.isfinite(v).sum())} non-missing values, at least "
            f"min_points={min_points} needed.",
            value_column,
            n,
            None,
        )
    return t, v, num_filled
