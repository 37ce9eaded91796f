"""Read-only queries over a ``fit_many`` output folder, safe while the job still runs.

:class:`FleetResults` answers the questions of the HTTP service (which groups,
which keys, one group's summary and predictive band, draw-wise aggregates over
groups, failures) through DuckDB, straight from the Parquet files.

Consistency while ``fit_many`` writes: a group becomes visible when its record is
in a manifest file (``manifest/*.json``, written atomically after the group's
outputs). The queries read only the files of recorded groups, named one by one,
never a glob, so half-written temporary files and groups still being written are
never read. The manifest folder is checked at every query (a directory listing)
and re-read when it changed: new groups appear without a restart.

User input never becomes SQL text: key names are checked against the manifest's
keys and values against its values (a selection is turned into a list of files in
Python), and times, files and quantile levels are bound parameters.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from raybayes.errors import ConfigurationError
from raybayes.fleet import store

__all__ = [
    "FleetResults",
    "UnknownGroupError",
    "DrawCache",
    "parse_time",
    "parse_interval",
]

log = logging.getLogger(__name__)

#: Manifest statuses of groups without results (no output files).
NO_RESULTS = ("failed", "invalid")
_TABLES = ("summary", "predictive", "states")
_STATE_COLUMN = re.compile(r"^p_state_(\d+)$")


class UnknownGroupError(ConfigurationError):
    """A named group is not in the manifest, or has no stored results."""


def parse_time(value, name: str = "start") -> datetime | None:
    """An ISO 8601 time (``2024-01-01``, ``2024-01-01T06:00``), or ``None``.

    Times with a time zone are converted to UTC and compared with the stored
    (naive) timestamps as UTC.

    Raises:
        ConfigurationError: ``value`` is not an ISO 8601 time.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, datetime):
        t = value
    else:
        try:
            t = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ConfigurationError(
                f"{name}={value!r} is not an ISO 8601 time; write e.g. 2024-01-01 or "
                "2024-01-01T06:00."
            ) from None
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    return t


def parse_interval(value) -> float:
    """The mass of a central interval, strictly between 0 and 1.

    Raises:
        ConfigurationError: not a number, or not in (0, 1).
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"interval={value!r} is not a number; give the central interval's mass "
            "in (0, 1), e.g. 0.9 for the 5%-95% interval."
        ) from None
    if not 0 < x < 1 or math.isnan(x):
        raise ConfigurationError(
            f"interval={value!r} must lie strictly between 0 and 1, e.g. 0.9 for the "
            "5%-95% interval."
        )
    return x


def _preview(values: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _plain(value):
    """A JSON-safe scalar (NaN and inf become ``None``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


@dataclass(frozen=True)
class _Snapshot:
    version: tuple = ()
    keys: tuple[str, ...] = ()
    records: dict = field(default_factory=dict)  # group id -> manifest record
    group_keys: dict = field(default_factory=dict)  # group id -> {key: value}
    files: dict = field(default_factory=dict)  # group id -> {table: [paths]}

    def values(self, key: str) -> list[str]:
        return sorted({k[key] for k in self.group_keys.values() if key in k})


class FleetResults:
    """Read-only view of a ``fit_many`` output folder, queried through DuckDB.

    Every query first checks the manifest folder and re-reads it when it changed,
    so groups written by a running ``fit_many`` appear without a restart; only
    groups with a manifest record are read (their files are complete). Safe to
    share between threads: each query takes a DuckDB cursor of its own.

    Args:
        output_dir: the ``fit_many`` output folder (``manifest/``, ``summary/``,
            ``predictive/``, ``states/``).
        threads: DuckDB threads per query (default: DuckDB's, one per core).
        memory_limit: DuckDB memory limit, e.g. ``"2GB"`` (default: DuckDB's).
        cache_mib: memory for the draws cache, MiB (0: no cache). Each group's
            predictive file is read through DuckDB once into a ``(draws, times)``
            array, kept (least recently used first out) while it fits, and keyed by
            the file's path, size and modification time; sums over cached groups
            are then NumPy additions. Files that are not a full draws x times grid,
            or do not fit, are aggregated by DuckDB from the files at each query.
            Both paths give the same numbers.

    Raises:
        ConfigurationError: ``output_dir`` is not a folder or ``cache_mib < 0``.

    Examples:
        >>> import tempfile
        >>> from raybayes.datasets.fleet_results import simulate_fleet_results
        >>> out = tempfile.mkdtemp()
        >>> _ = simulate_fleet_results(out, 1, 1, 2, num_steps=48, num_draws=20)
        >>> results = FleetResults(out)
        >>> results.keys
        ['region', 'demographic', 'network']
        >>> agg = results.aggregate(where={"region": "r0"}, interval=0.9)
        >>> list(agg.columns)
        ['timestamp', 'mean', 'lower', 'upper', 'num_groups', 'num_draws']
        >>> int(agg["num_groups"].iloc[0]), len(agg)
        (2, 48)
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        threads: int | None = None,
        memory_limit: str | None = None,
        cache_mib: float = 1024,
    ):
        import duckdb

        self.output_dir = Path(output_dir).resolve()
        if not self.output_dir.is_dir():
            raise ConfigurationError(
                f"output_dir={str(output_dir)!r} is not a folder; pass the folder "
                "that `raybayes fit-many ... -o OUT` writes."
            )
        if not cache_mib >= 0:
            raise ConfigurationError(
                f"cache_mib={cache_mib} must be >= 0 (0: no cache)."
            )
        self._cache = DrawCache(int(cache_mib * 2**20))
        config = {
            "autoinstall_known_extensions": "false",
            "autoload_known_extensions": "false",
            "allow_community_extensions": "false",
        }
        if threads:
            config["threads"] = str(int(threads))
        if memory_limit:
            config["memory_limit"] = str(memory_limit)
        self._con = duckdb.connect(":memory:", config=config)
        self._con.execute("SET parquet_metadata_cache = true")
        self._con.execute("SET enable_progress_bar = false")
        self._con.execute("SET lock_configuration = true")
        self._lock = threading.Lock()
        self._time_axes: dict = {}
        self._snapshot = _Snapshot()
        self.refresh()

    # ------------------------------------------------------------------ manifest
    def _manifest_version(self) -> tuple:
        folder = self.output_dir / "manifest"
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return ()
        version = []
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # replaced between listing and stat
                    continue
                version.append((entry.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(version))

    def refresh(self) -> bool:
        """Re-read the manifest if its folder changed; return whether it did."""
        version = self._manifest_version()
        if version == self._snapshot.version:
            return False
        with self._lock:
            old = self._snapshot
            if version == old.version:
                return False
            try:
                records = store.read_manifest(self.output_dir) if version else {}
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning(
                    "could not read the manifest of %s (%s); keeping the "
                    "groups read before",
                    self.output_dir,
                    err,
                )
                return False
            self._snapshot = self._build(version, records, old)
        return True

    def _build(self, version, records, old: _Snapshot) -> _Snapshot:
        keys: list[str] = []
        group_keys, kept, files = {}, {}, {}
        for gid, rec in records.items():
            key = rec.get("key")
            if not isinstance(key, dict):
                try:
                    key = json.loads(gid)
                except (TypeError, ValueError):
                    continue
                if not isinstance(key, dict):
                    continue
            key = {str(k): str(v) for k, v in key.items()}
            for k in key:
                if k not in keys:
                    keys.append(k)
            group_keys[gid] = key
            kept[gid] = rec
            if str(rec.get("status")) in NO_RESULTS:
                continue
            prev = old.records.get(gid)
            if prev is not None and prev == rec and gid in old.files:
                files[gid] = old.files[gid]
                continue
            found = {}
            for table in _TABLES:
                folder = self.output_dir / table / store.group_path(key)
                try:
                    names = sorted(
                        e.name
                        for e in os.scandir(folder)
                        if e.name.endswith(".parquet") and not e.name.startswith(".")
                    )
                except (FileNotFoundError, NotADirectoryError):
                    names = []
                if names:
                    found[table] = [str(folder / n) for n in names]
            files[gid] = found
        return _Snapshot(version, tuple(keys), kept, group_keys, files)

    def _current(self) -> _Snapshot:
        self.refresh()
        return self._snapshot

    # ------------------------------------------------------------------ listing
    @property
    def keys(self) -> list[str]:
        """The group key names, in the order of the groups' keys."""
        return list(self._current().keys)

    def key_values(self) -> dict[str, list[str]]:
        """Each group key's values (sorted text) over all recorded groups."""
        snap = self._current()
        return {k: snap.values(k) for k in snap.keys}

    def group_records(self, where: Mapping | None = None) -> list[dict]:
        """The manifest records of the groups matching ``where``, failures first.

        Args:
            where: ``{key: value or [values]}``; groups must match every key.

        Returns:
            One dict per group: the key values, ``group_id``, ``status``,
            ``error`` and every other scalar field of its manifest record
            (``num_draws``, ``num_divergences``, ``max_r_hat``, ``min_ess_bulk``,
            ``min_ess_tail``, ...; NaN as ``None``), sorted ``failed``,
            ``invalid``, other statuses, then ``ok``, highest R-hat first.

        Raises:
            ConfigurationError: an unknown key or value.
        """
        snap = self._current()
        rows = [
            self._record_row(snap, gid)
            for gid in self._match(snap, self._check_where(snap, where))
        ]
        rank = {"failed": 0, "invalid": 1, "ok": 3}

        def order(row):
            r_hat = row.get("max_r_hat")
            r_hat = r_hat if isinstance(r_hat, int | float) else math.inf
            return rank.get(row["status"], 2), -r_hat, row["group_id"]

        return sorted(rows, key=order)

    def groups(self, where: Mapping | None = None) -> pd.DataFrame:
        """:meth:`group_records` as a ``pandas.DataFrame`` (key columns first).

        Raises:
            ConfigurationError: an unknown key or value.
        """
        keys = list(self._current().keys)
        cols = keys + ["group_id", "status", "error"]
        df = pd.DataFrame(self.group_records(where))
        if df.empty:
            return pd.DataFrame(columns=cols)
        return df[cols + [c for c in df.columns if c not in cols]]

    def failures(self) -> list[dict]:
        """The records of the groups recorded ``failed`` or ``invalid``."""
        return [r for r in self.group_records() if r["status"] in NO_RESULTS]

    @staticmethod
    def _record_row(snap: _Snapshot, gid: str) -> dict:
        rec = snap.records[gid]
        row = dict(snap.group_keys[gid])
        row.update(group_id=gid, status=str(rec.get("status")), error=rec.get("error"))
        for name, value in rec.items():
            if name in row or name == "key":
                continue
            if value is None or isinstance(value, str | int | float | bool):
                row[name] = _plain(value)
        return row

    # ------------------------------------------------------------------ selection
    def _check_where(
        self, snap: _Snapshot, where: Mapping | None
    ) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, values in (where or {}).items():
            if name not in snap.keys:
                raise ConfigurationError(
                    f"{name!r} is not a group key; the group keys are: "
                    f"{_preview(list(snap.keys)) or '(none recorded yet)'}."
                )
            if isinstance(values, str) or not isinstance(values, Iterable):
                values = [values]
            values = [str(v) for v in values]
            if not values:
                raise ConfigurationError(f"{name}: give at least one value.")
            allowed = snap.values(name)
            for v in values:
                if v not in allowed:
                    raise ConfigurationError(
                        f"{name}={v!r} is not a value of the group key {name!r}; its "
                        f"values are: {_preview(allowed)}."
                    )
            out[name] = sorted(set(values))
        return out

    @staticmethod
    def _match(snap: _Snapshot, where: dict[str, list[str]]) -> list[str]:
        return sorted(
            gid
            for gid, key in snap.group_keys.items()
            if all(key.get(k) in vals for k, vals in where.items())
        )

    def _with_results(self, snap, gids, table, where) -> list[str]:
        done = [g for g in gids if table in snap.files.get(g, {})]
        if not done:
            text = ", ".join(f"{k}={'|'.join(v)}" for k, v in where.items()) or "(all)"
            statuses = sorted({str(snap.records[g].get("status")) for g in gids})
            raise ConfigurationError(
                f"empty selection: no group with stored {table} draws matches {text}"
                + (
                    f" ({len(gids)} recorded group(s) match, with status "
                    f"{', '.join(statuses)}; "
                    "see /api/failures)"
                    if gids
                    else ""
                )
                + ". Choose other key values (see /api/keys)."
            )
        return done

    def _group(self, snap: _Snapshot, key: Mapping) -> str:
        where = self._check_where(snap, key)
        missing = [k for k in snap.keys if k not in where]
        several = [k for k, v in where.items() if len(v) != 1]
        if missing or several:
            raise ConfigurationError(
                "a group is named by one value of each group key ("
                + ", ".join(snap.keys)
                + "); "
                + (
                    f"missing: {', '.join(missing)}"
                    if missing
                    else f"several values for: {', '.join(several)}"
                )
                + ". For several groups use the aggregate."
            )
        gids = self._match(snap, where)
        if not gids:
            raise UnknownGroupError(
                "no recorded group has the key "
                f"{dict((k, v[0]) for k, v in where.items())}."
            )
        return gids[0]

    @staticmethod
    def _window(start, end) -> tuple[datetime | None, datetime | None]:
        t0, t1 = parse_time(start, "start"), parse_time(end, "end")
        if t0 is not None and t1 is not None and t0 >= t1:
            raise ConfigurationError(
                f"empty time window: start={t0.isoformat()} is not before "
                f"end={t1.isoformat()} (the window is [start, end))."
            )
        return t0, t1

    @staticmethod
    def _time_filter(t0, t1, params: dict) -> str:
        # Fixed SQL fragments; the times themselves are bound parameters.
        parts = []
        if t0 is not None:
            parts.append("timestamp >= $start")
            params["start"] = t0
        if t1 is not None:
            parts.append("timestamp < $end")
            params["end"] = t1
        return ("WHERE " + " AND ".join(parts)) if parts else ""

    def _query(self, sql: str, params: dict) -> pd.DataFrame:
        cur = self._con.cursor()
        try:
            return cur.execute(sql, params).df()
        finally:
            cur.close()

    # ------------------------------------------------------------------ queries
    def summary(self, key: Mapping) -> dict:
        """One group's posterior summary and diagnostics.

        Args:
            key: one value per group key, e.g. ``{"region": "r0",
                "demographic": "d0", "network": "n1"}``.

        Returns:
            ``{"key", "group_id", "status", "record", "parameters"}``: ``record``
            is the group's manifest record (R-hat, ESS, divergences, ...);
            ``parameters`` one dict per scalar parameter (``parameter``, ``mean``,
            ``sd``, ``q05``, ``q95``, ``mcse_mean``, ``ess_bulk``, ``ess_tail``,
            ``r_hat``, ...), empty for a group without results.

        Raises:
            ConfigurationError: a missing or unknown key or value.
            UnknownGroupError: no such group.
        """
        snap = self._current()
        gid = self._group(snap, key)
        row = self._record_row(snap, gid)
        params: list[dict] = []
        files = snap.files.get(gid, {}).get("summary")
        if files:
            df = self._query(
                "SELECT * FROM read_parquet($files, hive_partitioning = false, "
                "union_by_name = true)",
                {"files": files},
            )
            params = [
                {k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")
            ]
        record = {k: v for k, v in row.items() if k not in snap.keys}
        return {
            "key": snap.group_keys[gid],
            "group_id": gid,
            "status": row["status"],
            "record": record,
            "parameters": params,
        }

    def predictive_band(
        self, key: Mapping, start=None, end=None, interval: float = 0.9
    ) -> pd.DataFrame:
        """One group's posterior predictive band, observations and mean state.

        Args:
            key: one value per group key.
            start: first time of the window ``[start, end)``, ISO 8601 text or
                ``datetime`` (``None``: unbounded).
            end: end of the window (excluded).
            interval: central interval mass in (0, 1).

        Returns:
            ``pandas.DataFrame``, one row per timestamp: ``timestamp``, ``mean``,
            ``lower``, ``upper`` (exact quantiles of the draws), ``num_draws``,
            ``y`` (observed, NaN where missing), ``y_pred_mean`` and
            ``mean_state`` (posterior mean of the state index, ``sum_k k
            P(z_t = k | y)``; NaN when no state probabilities were stored).

        Raises:
            ConfigurationError: bad key, window or interval; no draws in the window.
            UnknownGroupError: no such group, or it has no predictive draws.
        """
        snap = self._current()
        gid = self._group(snap, key)
        if "predictive" not in snap.files.get(gid, {}):
            rec = snap.records[gid]
            raise UnknownGroupError(
                f"group {snap.group_keys[gid]} has no predictive draws (status "
                f"{rec.get('status')}: "
                f"{rec.get('error') or rec.get('predictive_error')})."
            )
        band = self._band(snap.files[gid]["predictive"], start, end, interval)
        states = self._states(snap.files[gid].get("states", []), start, end)
        return self._join(band, states)

    def aggregate(
        self,
        by: Sequence[str] | str = (),
        where: Mapping | None = None,
        start=None,
        end=None,
        interval: float = 0.9,
    ) -> pd.DataFrame:
        """Sum the groups' predictive draws draw by draw; mean and central interval.

        Draw ``i`` of the sum at time ``t`` is the sum over the selected groups of
        their draw ``i`` at ``t`` (the groups' posteriors are independent), so the
        interval is that of the total, not a sum of intervals. The interval's ends
        are exact quantiles of the summed draws (linear interpolation between
        order statistics, NumPy's default and DuckDB's ``quantile_cont``).

        Args:
            by: group keys to keep (one sum per combination of their values);
                the others are summed over. Text is split at commas.
            where: ``{key: value or [values]}``: the groups to include.
            start: first time of the window ``[start, end)`` (ISO 8601 or
                ``datetime``; ``None``: unbounded).
            end: end of the window (excluded).
            interval: central interval mass in (0, 1).

        Returns:
            ``pandas.DataFrame``: the ``by`` columns, ``timestamp``, ``mean``,
            ``lower``, ``upper``, ``num_groups`` (groups summed at that time) and
            ``num_draws``, sorted by the ``by`` columns and time; ``attrs
            ["num_groups"]`` is the number of groups with draws in the selection.

        Raises:
            ConfigurationError: an unknown key or value, a bad interval or window,
                an empty selection, or no draws in the window.
        """
        snap = self._current()
        if isinstance(by, str):
            by = [b for b in (p.strip() for p in by.split(",")) if b]
        by = list(dict.fromkeys(by))
        for b in by:
            if b not in snap.keys:
                raise ConfigurationError(
                    f"by={b!r} is not a group key; the group keys are: "
                    f"{_preview(list(snap.keys)) or '(none recorded yet)'}."
                )
        interval = parse_interval(interval)
        self._window(start, end)
        where = self._check_where(snap, where)
        gids = self._with_results(snap, self._match(snap, where), "predictive", where)
        combos: dict[tuple, list[str]] = {}
        for gid in gids:
            combo = tuple(snap.group_keys[gid].get(b, "") for b in by)
            combos.setdefault(combo, []).extend(snap.files[gid]["predictive"])
        frames = []
        for combo in sorted(combos):
            band = self._band(combos[combo], start, end, interval, check_empty=False)
            for i, (b, v) in enumerate(zip(by, combo, strict=True)):
                band.insert(i, b, v)
            frames.append(band)
        out = pd.concat(frames, ignore_index=True)
        if out.empty:
            raise self._empty_window(combos, start, end)
        out.attrs["num_groups"] = len(gids)
        return out

    def observed(
        self, where: Mapping | None = None, start=None, end=None
    ) -> pd.DataFrame:
        """Observations, predictive means and mean state of the selected groups.

        Args:
            where: ``{key: value or [values]}``.
            start: first time of the window ``[start, end)``.
            end: end of the window (excluded).

        Returns:
            ``pandas.DataFrame`` by timestamp: ``y`` (sum over the groups, NaN
            where any group's observation is missing), ``y_pred_mean`` (sum),
            ``mean_state`` (average over the groups of the posterior mean state
            index) and ``num_groups``.

        Raises:
            ConfigurationError: an unknown key or value, an empty selection or a
                bad window.
        """
        snap = self._current()
        where = self._check_where(snap, where)
        gids = self._with_results(snap, self._match(snap, where), "states", where)
        files = [f for g in gids for f in snap.files[g]["states"]]
        return self._states(files, start, end)

    def time_range(self, where: Mapping | None = None) -> tuple[datetime, datetime]:
        """First and last stored timestamp of the selected groups' states."""
        snap = self._current()
        where = self._check_where(snap, where)
        gids = self._with_results(snap, self._match(snap, where), "states", where)
        files = [f for g in gids for f in snap.files[g]["states"]]
        df = self._query(
            "SELECT MIN(timestamp) AS t0, MAX(timestamp) AS t1 FROM "
            "read_parquet($files, hive_partitioning = false)",
            {"files": files},
        )
        return pd.Timestamp(df["t0"][0]).to_pydatetime(), pd.Timestamp(
            df["t1"][0]
        ).to_pydatetime()

    # ------------------------------------------------------------------ SQL
    def _band(self, files, start, end, interval, check_empty=True) -> pd.DataFrame:
        interval = parse_interval(interval)
        t0, t1 = self._window(start, end)
        lo = (1 - interval) / 2
        grids = self._grids(files)
        if grids is not None:
            df = _sum_grids(grids, t0, t1, lo)
            if check_empty and df.empty:
                raise self._empty_window({(): files}, start, end)
            return df
        params = {"files": list(files), "q": [lo, 1 - lo]}
        where = self._time_filter(t0, t1, params)
        df = self._query(
            f"""
            WITH sums AS (
                SELECT timestamp, draw, SUM(y_pred) AS total, COUNT(*) AS num_groups
                FROM read_parquet($files, hive_partitioning = false)
                {where}
                GROUP BY timestamp, draw)
            SELECT timestamp, AVG(total) AS mean, QUANTILE_CONT(total, $q) AS q,
                   MAX(num_groups) AS num_groups, COUNT(*) AS num_draws
            FROM sums GROUP BY timestamp ORDER BY timestamp""",
            params,
        )
        q = np.array(df.pop("q").tolist(), dtype=float).reshape(-1, 2)
        df.insert(2, "lower", q[:, 0])
        df.insert(3, "upper", q[:, 1])
        if check_empty and df.empty:
            raise self._empty_window({(): files}, start, end)
        return df

    def _grids(self, files) -> list | None:
        """Cached ``(times, draws, bound)`` grids of the files, or ``None`` (use
        DuckDB)."""
        if not self._cache.max_bytes:
            return None
        grids = []
        for f in files:
            grid = self._cache.get(f, self._read_grid)
            if grid is None:
                return None
            grids.append(grid)
        if len({g[1].shape[0] for g in grids}) != 1:
            return None  # different numbers of draws: DuckDB's semantics apply
        return grids

    def _read_grid(self, path: str):
        """One predictive file as ``(times (T,), draws (D, T), bound)``, or ``None``
        when its rows are not a full draws x times grid."""
        cur = self._con.cursor()
        try:
            cols = cur.execute(
                "SELECT timestamp, draw, y_pred FROM read_parquet($files, "
                "hive_partitioning = false) ORDER BY draw, timestamp",
                {"files": [path]},
            ).fetchnumpy()
        finally:
            cur.close()
        draw = np.asarray(cols["draw"])
        n = len(draw)
        ids = np.unique(draw)
        if n == 0 or n % len(ids):
            return None
        num_draws = len(ids)
        times = (
            np.asarray(cols["timestamp"])
            .astype("datetime64[ns]")
            .reshape(num_draws, -1)
        )
        draw = draw.reshape(num_draws, -1)
        if not (
            (draw == ids[:, None]).all()
            and (times == times[:1]).all()
            and (np.diff(times[0]) > np.timedelta64(0, "ns")).all()
        ):
            return None
        if np.ma.is_masked(cols["y_pred"]):
            return None
        values = np.asarray(np.ma.getdata(cols["y_pred"])).reshape(num_draws, -1)
        bound = None  # largest |value| of small-integer draws: int32 sums are safe
        if values.dtype.kind in "iu" and values.dtype.itemsize <= 4 and values.size:
            bound = max(int(values.max()), -int(values.min()))
        return self._intern(times[0]), values, bound

    def _intern(self, times: np.ndarray) -> np.ndarray:
        """One shared array per distinct time axis (groups mostly share theirs)."""
        key = (len(times), hash(times.tobytes()))
        with self._lock:
            known = self._time_axes.get(key)
            if known is not None and np.array_equal(known, times):
                return known
            times = times.copy()
            self._time_axes[key] = times
            return times

    def _states(self, files, start, end) -> pd.DataFrame:
        t0, t1 = self._window(start, end)
        cols = ["timestamp", "y", "y_pred_mean", "mean_state", "num_groups"]
        if not files:
            return pd.DataFrame(columns=cols)
        cur = self._con.cursor()
        try:
            names = [
                r[0]
                for r in cur.execute(
                    "DESCRIBE SELECT * FROM read_parquet($files, "
                    "hive_partitioning = false, union_by_name = true)",
                    {"files": files},
                ).fetchall()
            ]
        finally:
            cur.close()
        states = sorted(
            (int(m.group(1)), n) for n in names if (m := _STATE_COLUMN.match(n))
        )
        # Column names come from the files' schema and match p_state_<digits>.
        state_sql = " + ".join(f'{k} * COALESCE("{n}", 0)' for k, n in states) or "NULL"
        params = {"files": list(files)}
        where = self._time_filter(t0, t1, params)
        y = "y" if "y" in names else "NULL"
        ypm = "y_pred_mean" if "y_pred_mean" in names else "NULL"
        df = self._query(
            f"""
            SELECT timestamp,
                   CASE WHEN COUNT({y}) = COUNT(*) THEN SUM({y}) END AS y,
                   SUM({ypm}) AS y_pred_mean,
                   AVG({state_sql}) AS mean_state,
                   COUNT(*) AS num_groups
            FROM read_parquet($files, hive_partitioning = false, union_by_name = true)
            {where}
            GROUP BY timestamp ORDER BY timestamp""",
            params,
        )
        return df[cols]

    @staticmethod
    def _join(band: pd.DataFrame, states: pd.DataFrame) -> pd.DataFrame:
        states = states.drop(columns=["num_groups"])
        out = band.drop(columns=["num_groups"]).merge(
            states, on="timestamp", how="left"
        )
        return out

    def _empty_window(self, combos, start, end) -> ConfigurationError:
        files = [f for fs in combos.values() for f in fs]
        df = self._query(
            "SELECT MIN(timestamp) AS t0, MAX(timestamp) AS t1 FROM "
            "read_parquet($files, hive_partitioning = false)",
            {"files": files},
        )
        return ConfigurationError(
            f"no predictive draws in the window [{start or '...'}, {end or '...'}); "
            f"the selected groups' draws cover {df['t0'][0]} to {df['t1'][0]}: choose "
            "start and end inside that range."
        )

    def close(self) -> None:
        """Close the DuckDB connection."""
        self._con.close()


class DrawCache:
    """Least-recently-used cache of decoded predictive files, bounded in bytes.

    Keys are ``(path, size, modification time)``, so a file replaced on disk is
    read again. Thread-safe; a file is read outside the lock (two threads may
    read the same file once each; the second copy is dropped).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.num_bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, read):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (path, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = read(path)
        if value is None:
            return None
        size = _nbytes(value)
        if size > self.max_bytes:
            return None
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self.num_bytes += size
                while self.num_bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.num_bytes -= _nbytes(old)
        return value


def _nbytes(value) -> int:
    return sum(getattr(a, "nbytes", 0) for a in value)


def _sum_grids(grids, t0, t1, lo) -> pd.DataFrame:
    """Draw-by-draw sums of ``(times, draws, bound)`` grids over ``[t0, t1)``: mean,
    central interval (NumPy's linear quantiles, as DuckDB's ``quantile_cont``),
    groups per time. Small-integer draws are summed in int32 when their bounds
    rule out an overflow (exact, and faster), else in float64."""

    def window(times):
        i0 = 0 if t0 is None else int(np.searchsorted(times, np.datetime64(t0, "ns")))
        i1 = len(times)
        if t1 is not None:
            i1 = int(np.searchsorted(times, np.datetime64(t1, "ns")))
        return i0, i1

    num_draws = grids[0][1].shape[0]
    axes = {id(g[0]): g[0] for g in grids}
    if len(axes) == 1:  # one shared time axis: add the windows' slices
        i0, i1 = window(grids[0][0])
        times = grids[0][0][i0:i1]
        small = all(g[2] is not None for g in grids)
        small = small and sum(g[2] for g in grids) < 2**31 - 1
        acc = np.zeros((num_draws, len(times)), np.int32 if small else np.float64)
        for _, draws, _ in grids:
            np.add(acc, draws[:, i0:i1], out=acc)
        total = acc.astype(np.float64)
        count = np.full(len(times), len(grids))
    else:
        parts = []
        for t, draws, _ in grids:
            i0, i1 = window(t)
            parts.append((t[i0:i1], draws[:, i0:i1]))
        times = np.unique(np.concatenate([t for t, _ in parts]))
        total = np.zeros((num_draws, len(times)))
        count = np.zeros(len(times), np.int64)
        for t, d in parts:
            pos = np.searchsorted(times, t)
            total[:, pos] += d
            count[pos] += 1
    if len(times):
        q = np.quantile(total, [lo, 1 - lo], axis=0)
        mean = total.mean(axis=0)
    else:
        q, mean = np.zeros((2, 0)), np.zeros(0)
    return pd.DataFrame(
        {
            "timestamp": times,
            "mean": mean,
            "lower": q[0],
            "upper": q[1],
            "num_groups": count,
            "num_draws": np.full(len(times), num_draws),
        }
    )
