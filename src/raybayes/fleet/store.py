"""On-disk layout of a fleet job: atomic Parquet outputs, the manifest, DuckDB views.

Layout under ``output_dir``::

    summary/<k1>=<v1>/.../part-0.parquet     one row per parameter (mean, sd, ...)
    predictive/<k1>=<v1>/.../part-0.parquet  timestamp, draw, y_pred (long format)
    states/<k1>=<v1>/.../part-0.parquet      timestamp, y, p_state_0..K-1
    manifest/<batch id>.json                 one record per group of a finished batch
    manifest.parquet                         all records (rewritten at the end)
    fleet.duckdb                             views over the above
    run.json                                 the job's settings and input files

Every file is written through :func:`raybayes.io.atomic_path` (a temporary name in
the same folder, then ``os.replace``, atomic on POSIX; the mode follows the umask),
so a reader never sees half a file and a rerun overwrites rather than duplicates.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from raybayes import io

__all__ = [
    "group_id",
    "group_seed",
    "group_path",
    "atomic_write_bytes",
    "atomic_write_parquet",
    "read_manifest",
    "write_manifest_records",
    "consolidate_manifest",
    "connect",
    "remove_group_outputs",
    "write_run_config",
    "read_run_config",
]

TABLES = ("summary", "predictive", "states")
RUN_FILE = "run.json"
#: Every name ``fit_many`` writes in an output folder (``--overwrite`` removes these).
OUTPUT_NAMES = TABLES + ("manifest", "manifest.parquet", "fleet.duckdb", RUN_FILE)


def group_id(key: dict) -> str:
    """Canonical text id of a group key (stable across runs and machines)."""
    return json.dumps({k: str(v) for k, v in key.items()}, sort_keys=False)


def group_seed(gid: str) -> int:
    """A stable 31-bit integer from a group id (first bytes of its SHA-256)."""
    return (
        int.from_bytes(hashlib.sha256(gid.encode()).digest()[:4], "little") & 0x7FFFFFFF
    )


def group_path(key: dict) -> str:
    """Hive-style relative folder of a group: ``k1=v1/k2=v2``."""
    return "/".join(f"{k}={quote(str(v), safe='')}" for k, v in key.items())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`raybayes.io.atomic_path`)."""
    io.atomic_write_bytes(path, data)


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (see :func:`raybayes.io.atomic_path`)."""
    with io.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def remove_group_outputs(output_dir: Path, key: dict) -> None:
    """Remove a group's ``summary``/``predictive``/``states`` files (if any).

    Called before a group is fitted again and for groups that have no ``ok``
    record, so that no output outlives the record that vouches for it.
    """
    sub = group_path(key)
    for table in TABLES:
        folder = Path(output_dir) / table / sub
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def write_run_config(output_dir: Path, run: dict) -> None:
    """Store the job's settings and input fingerprint as ``run.json`` (atomically)."""
    atomic_write_bytes(
        Path(output_dir) / RUN_FILE,
        json.dumps(run, indent=1, sort_keys=True, default=str).encode(),
    )


def read_run_config(output_dir: Path) -> dict | None:
    """The stored ``run.json`` of an output folder, or ``None``."""
    path = Path(output_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest_records(output_dir: Path, name: str, records: list[dict]) -> None:
    """Record finished groups (one JSON file per batch, written atomically).

    Each record gets ``recorded_ns`` (wall clock), so that the latest record of a
    group wins when it has several (a retried or refitted group).
    """
    now = time.time_ns()
    for rec in records:
        rec.setdefault("recorded_ns", now)
    data = json.dumps(records, default=str).encode()
    atomic_write_bytes(Path(output_dir) / "manifest" / f"{name}.json", data)


def read_manifest(output_dir: Path) -> dict[str, dict]:
    """The latest record of every group in the manifest: group id -> record.

    Records are ordered by ``recorded_ns``; of records without it (older folders)
    an ``ok`` record wins.
    """
    out: dict[str, dict] = {}
    folder = Path(output_dir) / "manifest"
    if not folder.exists():
        return out
    for path in sorted(folder.glob("*.json")):
        for rec in json.loads(path.read_text()):
            prev = out.get(rec["group_id"])
            if prev is None:
                out[rec["group_id"]] = rec
            elif "recorded_ns" in rec and "recorded_ns" in prev:
                if rec["recorded_ns"] >= prev["recorded_ns"]:
                    out[rec["group_id"]] = rec
            elif prev["status"] != "ok":
                out[rec["group_id"]] = rec
    return out


def consolidate_manifest(output_dir: Path) -> pa.Table:
    """Write ``manifest.parquet`` (all groups, one row each) atomically."""
    recs = list(read_manifest(output_dir).values())
    cols = [
        "group_id",
        "status",
        "error",
        "batch_id",
        "attempts",
        "num_draws",
        "num_divergences",
        "max_r_hat",
        "min_ess_bulk",
        "min_ess_tail",
        "num_gradients",
        "num_restarts",
        "elapsed_s",
        "predictive_error",
        "met_target",
        "num_filled_steps",
        "input_fingerprint",
    ]
    table = (
        pa.table({c: [r.get(c) for r in recs] for c in cols})
        if recs
        else pa.table({c: pa.array([], pa.string()) for c in cols})
    )
    keys = sorted({k for r in recs for k in r.get("key", {})}, key=lambda k: k)
    for k in keys:
        table = table.append_column(k, pa.array([str(r["key"].get(k)) for r in recs]))
    atomic_write_parquet(Path(output_dir) / "manifest.parquet", table)
    return table


def _glob(output_dir: Path, table: str) -> str:
    return str(Path(output_dir) / table / "**" / "*.parquet")


def connect(output_dir: Path, database: str | None = ":memory:"):
    """A DuckDB connection with views ``summary``, ``predictive``, ``states``,
    ``manifest`` over a fleet job's Parquet outputs.

    Args:
        output_dir: the job's output folder.
        database: DuckDB database file (``":memory:"`` by default).

    Returns:
        ``duckdb.DuckDBPyConnection``.
    """
    import duckdb

    con = duckdb.connect(database)
    _create_views(con, Path(output_dir))
    return con


def _create_views(con, output_dir: Path) -> None:
    for table in TABLES:
        if any((output_dir / table).glob("**/*.parquet")):
            path = _glob(output_dir, table).replace("'", "''")
            con.execute(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM "
                f"read_parquet('{path}', hive_partitioning = true, union_by_name = true)"
            )
    manifest = output_dir / "manifest.parquet"
    if manifest.exists():
        path = str(manifest).replace("'", "''")
        con.execute(
            f"CREATE OR REPLACE VIEW manifest AS SELECT * FROM read_parquet('{path}')"
        )


def write_duckdb(output_dir: Path) -> Path:
    """Write ``fleet.duckdb`` with the views of :func:`connect` (atomically)."""
    import duckdb

    output_dir = Path(output_dir)
    final = output_dir / "fleet.duckdb"
    with io.atomic_path(final) as tmp:
        tmp.unlink()  # DuckDB creates its own file
        con = duckdb.connect(str(tmp))
        try:
            _create_views(con, output_dir.resolve())
        finally:
            con.close()
    return final
