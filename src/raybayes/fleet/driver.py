"""``fit_many``: one Bayesian model per group of a partitioned data set (the driver).

The driver lists the groups (from the partition folders, reading no data), forms
batches deterministically (groups sorted by id, ``batch_size`` per batch), skips
batches whose groups the manifest already records, and hands batches to whichever
worker is free. Workers read their own groups' files and write their outputs; the
driver only writes the manifest, one atomic file per finished batch. A failed batch
is retried once, then its groups are fitted one by one; a group that still fails
is recorded with its error and the job goes on.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from raybayes.backends import Backend, get_backend
from raybayes.errors import ConfigurationError, RaybayesError, WorkerLostError
from raybayes.fleet import store
from raybayes.fleet.worker import FleetBatchWorker, format_error, resolve_model

__all__ = ["fit_many", "FleetResult", "list_groups"]


@dataclass
class FleetResult:
    """What ``fit_many`` returns.

    Attributes:
        output_dir: where the outputs are.
        num_groups: groups in the data set.
        num_ok: groups fitted (now or in an earlier run).
        num_invalid: groups rejected by validation (errors in the manifest).
        num_failed: groups whose fit failed after retries.
        num_skipped: groups already done before this run.
        elapsed_s: wall time of this run.
        manifest: ``pandas.DataFrame``, one row per group.
    """

    output_dir: Path
    num_groups: int
    num_ok: int
    num_invalid: int
    num_failed: int
    num_skipped: int
    elapsed_s: float
    manifest: object


def list_groups(
    data: str | Path, group_keys: list[str], time_column: str, value_column: str
):
    """The distinct group keys of a hive-partitioned Parquet data set.

    Partition folders are listed without reading any data; key columns that are not
    partition fields are read alone (projection), never the values.

    Raises:
        ConfigurationError: a key, time or value column is missing (names it and
            the available columns).
    """
    path = Path(data)
    if not path.exists():
        raise ConfigurationError(f"data={str(data)!r} does not exist.")
    dataset = ds.dataset(str(path), format="parquet", partitioning="hive")
    names = dataset.schema.names
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
    part_fields = set()
    seen, groups = set(), []
    for frag in dataset.get_fragments():
        part = ds.get_partition_keys(frag.partition_expression)
        part_fields |= set(part)
        if all(k in part for k in group_keys):
            key = {k: part[k] for k in group_keys}
            gid = store.group_id(key)
            if gid not in seen:
                seen.add(gid)
                groups.append(key)
    if not all(k in part_fields for k in group_keys):
        table = dataset.to_table(columns=group_keys).group_by(group_keys).aggregate([])
        groups = [
            dict(zip(group_keys, row, strict=True))
            for row in zip(
                *[table.column(k).to_pylist() for k in group_keys], strict=True
            )
        ]
    groups.sort(key=store.group_id)
    return groups


def _batch_id(keys):
    text = "\n".join(store.group_id(k) for k in keys)
    return "batch-" + hashlib.sha256(text.encode()).hexdigest()[:16]


class _FleetProgress:
    def __init__(self, total, done, enabled):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.done0 = done
        if enabled:
            self.p = Progress(
                TextColumn("[bold]models"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ok {task.fields[ok]} failed {task.fields[failed]}"),
                TextColumn("{task.fields[rate]:.2f} models/s"),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
            )
            self.task = self.p.add_task(
                "", total=total, completed=done, ok=done, failed=0, rate=0.0
            )
            self.p.start()

    def update(self, done, ok, failed):
        if self.enabled:
            rate = (done - self.done0) / max(time.perf_counter() - self.start, 1e-9)
            self.p.update(self.task, completed=done, ok=ok, failed=failed, rate=rate)

    def close(self):
        if self.enabled:
            self.p.stop()


def fit_many(
    data: str | Path,
    group_keys: list[str] | str,
    output_dir: str | Path,
    *,
    model: str = "poisson_hmm",
    num_states: int = 2,
    method: str = "nuts",
    time_column: str = "timestamp",
    value_column: str = "count",
    seasonality: int = 0,
    batch_size: int = 8,
    num_chains: int = 4,
    num_warmup: int | None = None,
    num_samples: int = 250,
    mass_matrix: str = "laplace",
    target_ess: float = 400.0,
    target_r_hat: float = 1.01,
    max_extensions: int = 3,
    num_predictive_draws: int = 100,
    min_points: int = 48,
    seed: int = 0,
    backend: str | Backend = "ray",
    num_workers: int | None = None,
    address: str | None = None,
    progress_bar: bool = True,
    model_kwargs: dict | None = None,
    _after_submit=None,
) -> FleetResult:
    """Fit one Bayesian model per group of a hive-partitioned Parquet data set.

    Each Ray task fits a batch of ``batch_size`` groups. Each model's key is
    ``fold_in(PRNGKey(seed), hash(group key))``; each chain has its own step size
    and mass matrix. A rerun with the same ``output_dir`` skips groups the manifest
    records as done (``ok`` or ``invalid``) and retries failed ones.

    Args:
        data: folder of the data set (``k1=v1/k2=v2/*.parquet``).
        group_keys: key columns, e.g. ``["region", "demographic", "network"]``.
        output_dir: where outputs, manifest and ``fleet.duckdb`` go.
        model: ``"poisson_hmm"``, ``"negbin_hmm"`` or ``"file.py:function"`` (called
            as ``f(y, mask=..., covariates=...)``).
        num_states: K of the registry HMMs.
        method: ``"nuts"`` (default), ``"laplace"`` or ``"map"`` (Laplace draws,
            plus the MAP in the summary).
        time_column, value_column: column names of the timestamps and counts.
        seasonality: harmonics of hour-of-day / hour-of-week covariates (0: none).
        batch_size: groups per unit of remote work.
        num_chains, num_warmup, num_samples: NUTS settings (``num_samples`` in
            the first round; a model that misses bulk ESS >= ``target_ess`` or
            R-hat <= ``target_r_hat`` gets ``num_samples // 2`` more, at most
            ``max_extensions`` times). ``num_warmup`` defaults to 60 with
            ``mass_matrix="laplace"`` (only the step size is adapted) and 300
            with ``"adapt"``.
        mass_matrix: ``"laplace"`` (default): every chain of a model uses the
            dense inverse Hessian of the model's log posterior at its MAP as its
            inverse mass matrix, fixed, and starts from a draw of that Laplace
            approximation; ``"adapt"``: NumPyro's windowed adaptation of a
            diagonal mass matrix. See :class:`raybayes.fleet.sampler.BatchSampler`.
        num_predictive_draws: posterior predictive draws stored per group.
        min_points: fewer non-missing points make a group ``invalid``.
        seed: root seed.
        backend, num_workers, address: where to run (see ``raybayes.sample``).
        progress_bar: show models done/failed, models per second and time left.
        model_kwargs: extra keyword arguments of the model.

    Returns:
        :class:`FleetResult`.

    Raises:
        ConfigurationError: a missing key/time/value column, an unknown model or
            method (before anything runs).

    Examples:
        >>> # doctest: +SKIP
        >>> fit_many("data/", ["region", "network"], "out/", backend="local")
    """
    start = time.perf_counter()
    if isinstance(group_keys, str):
        group_keys = [k.strip() for k in group_keys.split(",") if k.strip()]
    if not group_keys:
        raise ConfigurationError(
            "group_keys is empty; pass e.g. ['region', 'network']."
        )
    if method not in ("nuts", "laplace", "map"):
        raise ConfigurationError(f"method={method!r}; use 'nuts', 'laplace' or 'map'.")
    if batch_size < 1:
        raise ConfigurationError(f"batch_size={batch_size} must be >= 1.")
    if mass_matrix not in ("laplace", "adapt"):
        raise ConfigurationError(
            f"mass_matrix={mass_matrix!r}; use 'laplace' or 'adapt'."
        )
    if num_warmup is None:
        num_warmup = 60 if mass_matrix == "laplace" else 300
    resolve_model(model)  # fail early on a bad model spec
    output_dir = Path(output_dir)
    groups = list_groups(data, group_keys, time_column, value_column)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = dict(
        data=str(Path(data).resolve()),
        output_dir=str(output_dir.resolve()),
        model=model,
        num_states=num_states,
        method=method,
        time_column=time_column,
        value_column=value_column,
        seasonality=seasonality,
        batch_size=batch_size,
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        mass_matrix=mass_matrix,
        target_ess=target_ess,
        target_r_hat=target_r_hat,
        max_extensions=max_extensions,
        num_predictive_draws=num_predictive_draws,
        min_points=min_points,
        seed=seed,
        model_kwargs=model_kwargs or {},
    )
    done = store.read_manifest(output_dir)
    finished = {g for g, r in done.items() if r["status"] in ("ok", "invalid")}
    batches = [groups[i : i + batch_size] for i in range(0, len(groups), batch_size)]
    todo = []
    for b in batches:
        rest = [k for k in b if store.group_id(k) not in finished]
        if rest:
            todo.append(
                (_batch_id(b) if len(rest) == len(b) else _batch_id(rest), rest, 1)
            )
    num_skipped = len(groups) - sum(len(r) for _, r, _ in todo)

    engine = get_backend(backend, address=address)
    owns = not isinstance(backend, Backend)
    engine.start()
    try:
        if num_workers is None:
            num_workers = max(1, min(len(todo), engine.default_num_workers()))
        if todo:
            pool = engine.create_pool(
                FleetBatchWorker, (config,), num_workers=num_workers, name="fleet"
            )
            try:
                _drive(
                    pool,
                    todo,
                    output_dir,
                    len(groups),
                    num_skipped,
                    progress_bar,
                    _after_submit,
                )
            finally:
                pool.shutdown()
    finally:
        if owns:
            engine.shutdown()
    table = store.consolidate_manifest(output_dir)
    store.write_duckdb(output_dir)
    manifest = table.to_pandas()
    status = manifest["status"] if len(manifest) else manifest.get("status", [])
    return FleetResult(
        output_dir=output_dir,
        num_groups=len(groups),
        num_ok=int((status == "ok").sum()),
        num_invalid=int((status == "invalid").sum()),
        num_failed=int((status == "failed").sum()),
        num_skipped=num_skipped,
        elapsed_s=time.perf_counter() - start,
        manifest=manifest,
    )


def _drive(pool, todo, output_dir, total, num_skipped, progress_bar, after_submit=None):
    queue = list(todo)  # (batch_id, keys, attempt)
    idle = list(range(pool.size))
    pending = []
    counts = {"done": num_skipped, "ok": num_skipped, "failed": 0}
    bar = _FleetProgress(total, num_skipped, progress_bar)
    submitted = 0
    try:
        while queue or pending:
            while idle and queue:
                batch_id, keys, attempt = queue.pop(0)
                worker = idle.pop(0)
                fut = pool.submit(
                    worker, "fit_batch", batch_id, keys, tag=(batch_id, keys, attempt)
                )
                pending.append(fut)
                submitted += 1
                if after_submit is not None:
                    after_submit(pool, submitted)
            for fut in pool.wait(pending):
                pending.remove(fut)
                batch_id, keys, attempt = fut.tag
                try:
                    records = pool.result(fut)
                except (RaybayesError, Exception) as err:  # noqa: BLE001
                    if isinstance(err, WorkerLostError):
                        pool.restart(fut.worker_index)
                    idle.append(fut.worker_index)
                    if attempt < 2:
                        queue.append((batch_id, keys, attempt + 1))
                    elif len(keys) > 1:
                        for k in keys:
                            queue.append((_batch_id([k]), [k], 1))
                    else:
                        gid = store.group_id(keys[0])
                        rec = {
                            "group_id": gid,
                            "key": keys[0],
                            "batch_id": batch_id,
                            "status": "failed",
                            "error": format_error(err)[:4000],
                            "attempts": attempt,
                        }
                        store.write_manifest_records(output_dir, batch_id, [rec])
                        counts["done"] += 1
                        counts["failed"] += 1
                    bar.update(counts["done"], counts["ok"], counts["failed"])
                    continue
                idle.append(fut.worker_index)
                for rec in records:
                    rec["attempts"] = attempt
                store.write_manifest_records(output_dir, batch_id, records)
                counts["done"] += len(records)
                counts["ok"] += sum(r["status"] == "ok" for r in records)
                counts["failed"] += sum(r["status"] != "ok" for r in records)
                bar.update(counts["done"], counts["ok"], counts["failed"])
    finally:
        bar.close()
