"""``fit_many``: one Bayesian model per group of a partitioned data set (the driver).

The driver lists the groups (from the partition folders, reading no data), checks
the stored run configuration of the output folder, forms batches deterministically
(groups sorted by id, ``batch_size`` per batch), skips groups the manifest already
records with unchanged input, and hands batches to whichever worker is free. Workers
read their own groups' files and write their outputs; the driver only writes the
manifest, one atomic file per finished batch. A failed batch is retried once, then
its groups are fitted one by one; a group that still fails is recorded with its
error and the job goes on.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raybayes.backends import Backend, get_backend
from raybayes.checkpoint import describe_changes
from raybayes.checkpoint import plain as _plain
from raybayes.config import renamed_argument, resolve_scaling
from raybayes.errors import ConfigurationError, RaybayesError, WorkerLostError
from raybayes.fleet import store
from raybayes.fleet.data import open_input, schema_bytes
from raybayes.fleet.worker import FleetBatchWorker, format_error, resolve_model
from raybayes.progress import ModelProgress

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
        num_missed_target: ``ok`` groups whose draws missed the ESS/R-hat target
            (``met_target`` is ``False`` in the manifest; NUTS only).
        num_changed: groups fitted again because their input files changed since
            their ``ok`` or ``invalid`` record.
    """

    output_dir: Path
    num_groups: int
    num_ok: int
    num_invalid: int
    num_failed: int
    num_skipped: int
    elapsed_s: float
    manifest: object
    num_missed_target: int = 0
    num_changed: int = 0

    @property
    def exit_code(self) -> int:
        """The command line's exit status for this result.

        ``0``: every group is ``ok``; ``1``: some group ``failed`` (its fit raised
        after retries); ``3``: no group failed but some are ``invalid`` (bad data).
        Configuration errors exit with ``2`` before anything runs.
        """
        if self.num_failed:
            return 1
        if self.num_invalid:
            return 3
        return 0

    def summary_line(self) -> str:
        """One line of counts, as the command line prints it."""
        missed = (
            f" ({self.num_missed_target} missed the ESS/R-hat target)"
            if self.num_missed_target
            else ""
        )
        changed = (
            f", refitted (input changed) {self.num_changed}" if self.num_changed else ""
        )
        return (
            f"groups {self.num_groups}: ok {self.num_ok}{missed}, invalid "
            f"{self.num_invalid}, failed {self.num_failed}, skipped (done before) "
            f"{self.num_skipped}{changed}; {self.elapsed_s:.1f} s. Outputs in "
            f"{self.output_dir}"
        )


def list_groups(
    data: str | Path, group_keys: list[str], time_column: str, value_column: str
):
    """The distinct group keys of a hive-partitioned Parquet data set, sorted by id.

    Partition folders are listed without reading any data; key columns that are not
    partition fields are read alone (projection), never the values. Partition
    values are strings.

    Raises:
        ConfigurationError: the folder is missing or holds no readable Parquet
            file, or a key, time or value column is missing (names it and the
            available columns).
    """
    return open_input(data, group_keys, time_column, value_column).groups


def _batch_id(keys):
    text = "\n".join(store.group_id(k) for k in keys)
    return "batch-" + hashlib.sha256(text.encode()).hexdigest()[:16]


# Settings that change what a group's fit is: a rerun with other values is refused.
# The scheduling settings (batch_size, backend, num_workers, use_gpu,
# resources_per_worker, address, progress_bar) do not change the draws and may differ.
_SETTINGS = (
    "data",
    "group_keys",
    "model",
    "model_source_sha256",
    "num_states",
    "method",
    "time_column",
    "value_column",
    "frequency",
    "seasonality",
    "num_chains",
    "num_warmup",
    "num_samples",
    "mass_matrix",
    "target_ess",
    "target_rhat",
    "max_extensions",
    "num_predictive_draws",
    "min_points",
    "seed",
    "model_kwargs",
)


def _check_settings(s: dict) -> None:
    """Refuse settings no group could be fitted with, before anything runs."""

    def need(cond, name, fix):
        if not cond:
            raise ConfigurationError(f"{name}={s[name]!r} is not allowed; {fix}.")

    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def is_num(x):
        return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)

    need(
        s["method"] in ("nuts", "laplace", "map"),
        "method",
        "use 'nuts', 'laplace' or 'map'",
    )
    need(
        s["mass_matrix"] in ("laplace", "adapt"),
        "mass_matrix",
        "use 'laplace' or 'adapt'",
    )
    need(
        is_int(s["num_chains"]) and s["num_chains"] >= 1,
        "num_chains",
        "pass at least 1 chain per model (4 is the usual choice)",
    )
    need(
        is_int(s["num_samples"]) and s["num_samples"] >= 1,
        "num_samples",
        "pass at least 1 draw per chain (e.g. 250)",
    )
    need(
        is_int(s["num_warmup"]) and s["num_warmup"] >= 0,
        "num_warmup",
        "pass 0 or more warmup iterations (e.g. 60 with mass_matrix='laplace')",
    )
    need(
        is_int(s["num_states"]) and s["num_states"] >= 1,
        "num_states",
        "pass the number of hidden states, at least 1 (e.g. 2)",
    )
    need(
        is_int(s["seasonality"]) and s["seasonality"] >= 0,
        "seasonality",
        "pass 0 (none) or a number of harmonics",
    )
    need(
        is_int(s["max_extensions"]) and s["max_extensions"] >= 0,
        "max_extensions",
        "pass 0 or more",
    )
    need(
        is_int(s["num_predictive_draws"]) and s["num_predictive_draws"] >= 0,
        "num_predictive_draws",
        "pass 0 (none) or more (e.g. 100)",
    )
    need(
        is_int(s["min_points"]) and s["min_points"] >= 1,
        "min_points",
        "pass at least 1 (e.g. 48)",
    )
    need(
        is_num(s["target_ess"]) and s["target_ess"] > 0,
        "target_ess",
        "pass a positive bulk ESS (e.g. 400)",
    )
    need(
        is_num(s["target_rhat"]) and s["target_rhat"] >= 1,
        "target_rhat",
        "pass an R-hat bound of at least 1 (e.g. 1.01)",
    )
    need(is_int(s["seed"]), "seed", "pass an integer such as 0")
    try:
        ok = pd.Timedelta(s["frequency"]) > pd.Timedelta(0)
    except (ValueError, TypeError):
        ok = False
    need(ok, "frequency", "pass the series' time step as a pandas offset, e.g. '1h'")


def _model_source(model) -> str | None:
    """SHA-256 of a user model's file (a changed file is a changed setting)."""
    if isinstance(model, str) and ":" in model:
        path = Path(model.rpartition(":")[0])
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def _prepare_output(output_dir: Path, settings: dict, overwrite: bool) -> None:
    """Compare the settings with the folder's stored ones; clear it on ``overwrite``.

    Raises:
        ConfigurationError: the folder holds a job with other settings, or outputs
            without stored settings (and ``overwrite`` is off).
    """
    if overwrite:
        for name in store.OUTPUT_NAMES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    prev = store.read_run_config(output_dir)
    if prev is None:
        if (output_dir / "manifest").exists():
            raise ConfigurationError(
                f"{str(output_dir)!r} holds fit-many outputs without a stored run "
                "configuration (run.json), so a rerun cannot tell whether its settings "
                "changed. Pass --overwrite (overwrite=True) to fit again there, or "
                "choose a new output folder."
            )
        return
    old = prev.get("settings", {})
    changed = describe_changes(old, settings, _SETTINGS)
    if changed:
        diff = "; ".join(changed)
        raise ConfigurationError(
            f"{str(output_dir)!r} holds a fit-many run with other settings ({diff}). "
            "A rerun resumes only the same job. Pass --overwrite (overwrite=True) to "
            "discard its outputs and fit again, or choose a new output folder."
        )


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
    frequency: str = "1h",
    seasonality: int = 0,
    batch_size: int = 8,
    num_chains: int = 4,
    num_warmup: int | None = None,
    num_samples: int = 250,
    mass_matrix: str = "laplace",
    target_ess: float = 400.0,
    target_rhat: float = 1.01,
    max_extensions: int = 3,
    num_predictive_draws: int = 100,
    min_points: int = 48,
    seed: int = 0,
    backend: str | Backend = "auto",
    num_workers: int | None = None,
    use_gpu: bool = False,
    resources_per_worker: dict | None = None,
    address: str | None = None,
    progress_bar: bool = True,
    overwrite: bool = False,
    model_kwargs: dict | None = None,
    _after_submit=None,
    **deprecated,
) -> FleetResult:
    """Fit one Bayesian model per group of a hive-partitioned Parquet data set.

    Each unit of remote work fits a batch of ``batch_size`` groups. Each model's key
    is ``derive_key(seed, hash(group id))``; each chain has its own step size and
    mass matrix. The results do not depend on the number of workers.

    Reruns: the settings and the input files (paths, sizes, modification times)
    are stored in ``output_dir/run.json`` and in each group's manifest record. A
    rerun with the same settings resumes: it skips groups recorded ``ok`` or
    ``invalid`` whose files did not change, fits again the groups whose files
    changed since (a fixed file is retried), and retries ``failed`` groups. A rerun
    with other settings is refused (pass ``overwrite=True`` or use another folder).

    Args:
        data: folder of the data set (``k1=v1/k2=v2/*.parquet``).
        group_keys: key columns, e.g. ``["region", "demographic", "network"]``.
        output_dir: where outputs, manifest and ``fleet.duckdb`` go.
        model: ``"poisson_hmm"``, ``"negbin_hmm"`` or ``"file.py:function"`` (called
            as ``f(y, mask=..., covariates=...)``).
        num_states: K of the registry HMMs.
        method: ``"nuts"`` (default), ``"laplace"`` or ``"map"`` (Laplace draws,
            plus the MAP in the summary).
        time_column: column of the timestamps.
        value_column: column of the counts.
        frequency: the series' time step (pandas offset alias, default ``"1h"``).
            Steps missing from the grid become missing values; timestamps off the
            grid make the group ``invalid``.
        seasonality: harmonics of hour-of-day / hour-of-week covariates (0: none).
        batch_size: groups per unit of remote work.
        num_chains: NUTS chains per model.
        num_warmup: warmup iterations per chain; default 60 with
            ``mass_matrix="laplace"`` (only the step size is adapted) and 300
            with ``"adapt"``.
        num_samples: draws per chain in the first round; a model that misses bulk
            ESS >= ``target_ess`` or R-hat <= ``target_rhat`` gets
            ``num_samples // 2`` more, at most ``max_extensions`` times, and is
            flagged ``met_target=False`` in the manifest if it still misses.
        mass_matrix: ``"laplace"`` (default): every chain of a model uses the
            dense inverse Hessian of the model's log posterior at its MAP as its
            inverse mass matrix, fixed, and starts from a draw of that Laplace
            approximation; ``"adapt"``: NumPyro's windowed adaptation of a
            diagonal mass matrix. See :class:`raybayes.fleet.sampler.BatchSampler`.
        target_ess: the bulk ESS every parameter should reach.
        target_rhat: the R-hat every parameter should stay below.
        max_extensions: extra rounds of draws for models that miss the target.
        num_predictive_draws: posterior predictive draws stored per group.
        min_points: fewer non-missing points make a group ``invalid``.
        seed: root seed (an integer).
        backend: ``"auto"`` (default; see :func:`raybayes.config.resolve_backend_name`),
            ``"local"``, ``"ray"`` or a backend instance.
        num_workers: worker processes (default: one per CPU, at most one per
            batch); the scaling settings are those of
            :class:`raybayes.config.ScalingConfig`.
        use_gpu: one GPU per worker (Ray only).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        address: a Ray cluster address (default: ``RAY_ADDRESS`` or an embedded
            instance).
        progress_bar: show models done/failed, models per second and time left.
        overwrite: discard the outputs of an earlier job in ``output_dir`` first.
        model_kwargs: extra keyword arguments of the model.
        **deprecated: ``target_r_hat`` (use ``target_rhat``).

    Returns:
        :class:`FleetResult`.

    Raises:
        ConfigurationError: a missing folder or key/time/value column, an unknown
            model or method, a setting no model can run with (``num_chains=0``),
            or an output folder that holds a job with other settings (before
            anything runs).

    Examples:
        >>> import tempfile, pathlib
        >>> from raybayes.datasets.fleet import simulate_fleet
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = simulate_fleet(root, 1, 1, 2, num_steps=24)  # 24 < min_points rows
        >>> res = fit_many(root / "data", ["region", "network"], root / "out",
        ...                backend="local", progress_bar=False)
        >>> (res.num_groups, res.num_invalid, res.exit_code)
        (2, 2, 3)
    """
    start = time.perf_counter()
    target_rhat = renamed_argument(
        deprecated, "target_r_hat", "target_rhat", target_rhat, default=1.01
    )
    if deprecated:
        raise TypeError(
            f"fit_many() got unexpected keyword arguments {sorted(deprecated)}"
        )
    if isinstance(group_keys, str):
        group_keys = [k.strip() for k in group_keys.split(",") if k.strip()]
    if not group_keys:
        raise ConfigurationError(
            "group_keys is empty; pass e.g. ['region', 'network']."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size={batch_size!r} must be an integer >= 1.")
    scaling, _ = resolve_scaling(
        backend, num_workers, use_gpu, resources_per_worker, address
    )
    if num_warmup is None:
        num_warmup = 60 if mass_matrix == "laplace" else 300
    settings = dict(
        data=str(Path(data).resolve()),
        group_keys=list(group_keys),
        model=model,
        model_source_sha256=_model_source(model),
        num_states=num_states,
        method=method,
        time_column=time_column,
        value_column=value_column,
        frequency=frequency,
        seasonality=seasonality,
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        mass_matrix=mass_matrix,
        target_ess=target_ess,
        target_rhat=target_rhat,
        max_extensions=max_extensions,
        num_predictive_draws=num_predictive_draws,
        min_points=min_points,
        seed=seed,
        model_kwargs=model_kwargs or {},
    )
    _check_settings(settings)
    resolve_model(model)  # fail early on a bad model spec
    output_dir = Path(output_dir)
    inp = open_input(data, group_keys, time_column, value_column, exclude=output_dir)
    groups = inp.groups
    stored = _plain(settings)
    _prepare_output(output_dir, stored, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    store.write_run_config(
        output_dir,
        {
            "format": 1,
            "settings": stored,
            "scheduling": _plain(
                dict(
                    batch_size=batch_size,
                    num_workers=num_workers,
                    use_gpu=use_gpu,
                    address=address,
                    resources_per_worker=resources_per_worker,
                )
            ),
            "input": {"files": [list(f) for f in inp.files]},
        },
    )
    config = dict(
        settings,
        output_dir=str(output_dir.resolve()),
        batch_size=batch_size,
        schema=schema_bytes(inp.schema),
        model_kwargs=model_kwargs or {},
    )
    files = {store.group_id(k): inp.group_files(store.group_id(k)) for k in groups}
    fingerprints = {
        store.group_id(k): inp.fingerprint(store.group_id(k)) for k in groups
    }
    done = store.read_manifest(output_dir)
    finished, num_changed = set(), 0
    for gid, fp in fingerprints.items():
        rec = done.get(gid)
        if rec is None or rec["status"] not in ("ok", "invalid"):
            continue
        if rec.get("input_fingerprint", fp) == fp:
            finished.add(gid)
        else:
            num_changed += 1
    batches = [groups[i : i + batch_size] for i in range(0, len(groups), batch_size)]
    todo = []
    for b in batches:
        rest = [k for k in b if store.group_id(k) not in finished]
        if rest:
            todo.append(
                (_batch_id(b) if len(rest) == len(b) else _batch_id(rest), rest, 1)
            )
    num_skipped = len(groups) - sum(len(r) for _, r, _ in todo)
    todo_keys = [k for _, r, _ in todo for k in r]
    # Outputs of a group without an ok record are orphans (an interrupted run).
    _remove_unvouched(output_dir, todo_keys, done)

    try:
        engine = get_backend(backend, scaling, parallel_work=len(todo))
        owns = not isinstance(backend, Backend)
        engine.start()
        try:
            if todo:
                n = num_workers or max(1, min(len(todo), engine.default_num_workers()))
                pool = engine.create_pool(
                    FleetBatchWorker, (config,), num_workers=n, name="fleet"
                )
                try:
                    _drive(
                        pool,
                        todo,
                        output_dir,
                        len(groups),
                        num_skipped,
                        progress_bar,
                        fingerprints,
                        files,
                        _after_submit,
                    )
                finally:
                    pool.shutdown()
        finally:
            if owns:
                engine.shutdown()
    finally:
        _remove_unvouched(output_dir, todo_keys, store.read_manifest(output_dir))
    table = store.consolidate_manifest(output_dir)
    store.write_duckdb(output_dir)
    manifest = table.to_pandas()
    status = manifest["status"] if len(manifest) else manifest.get("status", [])
    ok = status == "ok"
    missed = int((ok & (manifest["met_target"] == False)).sum()) if len(manifest) else 0  # noqa: E712
    return FleetResult(
        output_dir=output_dir,
        num_groups=len(groups),
        num_ok=int(ok.sum()),
        num_invalid=int((status == "invalid").sum()),
        num_failed=int((status == "failed").sum()),
        num_skipped=num_skipped,
        elapsed_s=time.perf_counter() - start,
        manifest=manifest,
        num_missed_target=missed,
        num_changed=num_changed,
    )


def _remove_unvouched(output_dir: Path, keys: list[dict], records: dict) -> None:
    """Remove the outputs of the groups ``keys`` that have no ``ok`` record."""
    for key in keys:
        rec = records.get(store.group_id(key))
        if rec is None or rec["status"] != "ok":
            store.remove_group_outputs(output_dir, key)


def _drive(
    pool,
    todo,
    output_dir,
    total,
    num_skipped,
    progress_bar,
    fingerprints,
    files,
    after_submit=None,
):
    queue = list(todo)  # (batch_id, keys, attempt)
    idle = list(range(pool.size))
    pending = []
    counts = {"done": num_skipped, "ok": num_skipped, "failed": 0}
    bar = ModelProgress(total, num_skipped, enabled=progress_bar)
    submitted = 0

    def record(batch_id, records):
        for rec in records:
            rec["input_fingerprint"] = fingerprints.get(rec["group_id"])
        store.write_manifest_records(output_dir, batch_id, records)
        for rec in records:
            if rec["status"] != "ok":
                store.remove_group_outputs(output_dir, rec["key"])

    try:
        while queue or pending:
            while idle and queue:
                batch_id, keys, attempt = queue.pop(0)
                worker = idle.pop(0)
                group_files = [files.get(store.group_id(k)) for k in keys]
                fut = pool.submit(
                    worker,
                    "fit_batch",
                    batch_id,
                    keys,
                    group_files,
                    tag=(batch_id, keys, attempt),
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
                        record(batch_id, [rec])
                        counts["done"] += 1
                        counts["failed"] += 1
                    bar.update(counts["done"], counts["ok"], counts["failed"])
                    continue
                idle.append(fut.worker_index)
                for rec in records:
                    rec["attempts"] = attempt
                record(batch_id, records)
                counts["done"] += len(records)
                counts["ok"] += sum(r["status"] == "ok" for r in records)
                counts["failed"] += sum(r["status"] != "ok" for r in records)
                bar.update(counts["done"], counts["ok"], counts["failed"])
    finally:
        bar.close()
