"""A ``fit_many`` output folder for a simulated fleet, written without fitting.

Serving, aggregating and plotting stored draws need a fleet output folder; fitting
thousands of models to get one takes hours. :func:`simulate_fleet_results` writes
the same files (``summary/``, ``predictive/``, ``states/``, ``manifest/``) from the
fleet simulator instead: the parameter draws are scattered around each group's
true parameters, and the predictive draws and state probabilities come from the
same FFBS code that ``fit_many`` uses on real posterior draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from raybayes.datasets.fleet import simulate_fleet

__all__ = ["simulate_fleet_results"]

GROUP_KEYS = ("region", "demographic", "network")


def _parameter_draws(rng, row, num_steps, num_draws):
    """Draws ``rate (S, 2)``, ``transition (S, 2, 2)`` near one group's truth.

    The spread of each log rate is that of a posterior given the expected number of
    hours spent in its state (``1 / sqrt(rate * hours)``); the transition rows are
    Dirichlet with concentration 200 around the true rows. Not a posterior: a stand-in
    with its shapes and rough scale.
    """
    p01, p10 = row["p01"], row["p10"]
    share = np.array([p10, p01]) / (p01 + p10)
    rates = np.array([row["rate_0"], row["rate_1"]])
    sd = 1.0 / np.sqrt(rates * np.maximum(share * num_steps, 1.0))
    rate = rates * np.exp(sd * rng.standard_normal((num_draws, 2)))
    rate = np.sort(rate, axis=1)  # the model's rates are ordered
    trans = np.stack(
        [
            rng.dirichlet(200 * np.array([1 - p01, p01]), num_draws),
            rng.dirichlet(200 * np.array([p10, 1 - p10]), num_draws),
        ],
        axis=1,
    )
    return {"rate": rate.astype(np.float32), "transition": trans.astype(np.float32)}


def simulate_fleet_results(
    output_dir: str | Path,
    num_regions: int = 2,
    num_demographics: int = 2,
    num_networks: int = 3,
    num_steps: int = 24 * 14,
    num_draws: int = 100,
    seed: int = 0,
    start: str = "2024-01-01",
    failed: Sequence[dict] = (),
    invalid: Sequence[dict] = (),
    batch_size: int = 8,
    finalize: bool = True,
):
    """Write a ``fit_many`` output folder for a simulated fleet, without fitting.

    The data come from :func:`raybayes.datasets.simulate_fleet` (2-state Poisson
    HMMs, hourly, groups ``region x demographic x network``), written to
    ``output_dir/simulation/data`` with the truth in
    ``output_dir/simulation/truth.parquet``. For each group, ``num_draws``
    parameter draws are scattered around its true parameters (a stand-in for a
    posterior, not one), and :func:`raybayes.models.hmm.hmm_posterior_predictive`
    turns them into predictive draws and state probabilities, as ``fit_many``
    does with its posterior draws. Files, columns and dtypes are those of
    ``fit_many``: ``summary/``, ``predictive/`` (``timestamp``, ``draw``,
    ``y_pred`` int32), ``states/`` (``timestamp``, ``y``, ``p_state_0``,
    ``p_state_1``, ``y_pred_mean``), one manifest file per batch and, with
    ``finalize``, ``manifest.parquet`` and ``fleet.duckdb``.

    Args:
        output_dir: the output folder to write (created if missing).
        num_regions: regions in the group grid.
        num_demographics: demographics per region.
        num_networks: networks per region and demographic.
        num_steps: hours per group.
        num_draws: predictive draws per group (the summary uses them as 2 chains).
        seed: NumPy seed of the simulation and of the draws.
        start: first timestamp.
        failed: group keys to record as ``failed`` (no files), e.g.
            ``[{"region": "r0", "demographic": "d0", "network": "n0"}]``.
        invalid: group keys to record as ``invalid`` (no files).
        batch_size: groups per manifest file (sorted by group id, as ``fit_many``).
        finalize: also write ``manifest.parquet`` and ``fleet.duckdb``, as
            ``fit_many`` does at the end of a job.

    Returns:
        The truth as a ``pandas.DataFrame``, one row per group (see
        :func:`raybayes.datasets.simulate_fleet`).

    Raises:
        ValueError: ``num_draws < 2``, or a key in ``failed``/``invalid`` that is
            not a group of the grid.

    Examples:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> truth = simulate_fleet_results(out, 1, 1, 2, num_steps=48, num_draws=20)
        >>> sorted(p.name for p in Path(out).iterdir())
        ... # doctest: +NORMALIZE_WHITESPACE
        ['fleet.duckdb', 'manifest', 'manifest.parquet', 'predictive', 'simulation',
         'states', 'summary']
    """
    import jax

    from raybayes.fleet import store
    from raybayes.fleet.sampler import diagnostics
    from raybayes.models.hmm import hmm_posterior_predictive

    if num_draws < 2:
        raise ValueError(
            f"num_draws={num_draws}: at least 2 draws are needed (2 chains)."
        )
    out = Path(output_dir)
    sim = out / "simulation"
    truth = simulate_fleet(
        sim,
        num_regions,
        num_demographics,
        num_networks,
        num_steps=num_steps,
        seed=seed,
        start=start,
    )
    known = {
        store.group_id({k: row[k] for k in GROUP_KEYS}) for _, row in truth.iterrows()
    }
    special = {}
    for status, keys in (("failed", failed), ("invalid", invalid)):
        for key in keys:
            gid = store.group_id({k: key[k] for k in GROUP_KEYS if k in key})
            if gid not in known:
                raise ValueError(f"{status} group {key} is not in the simulated grid.")
            special[gid] = status
    data = ds.dataset(sim / "data", format="parquet", partitioning="hive")
    rows = [({k: row[k] for k in GROUP_KEYS}, row) for _, row in truth.iterrows()]
    rows.sort(key=lambda kr: store.group_id(kr[0]))
    rng = np.random.default_rng([seed, 1])
    root = jax.random.PRNGKey(seed)
    records, batch = [], 0
    for i, (key, row) in enumerate(rows):
        gid = store.group_id(key)
        rec = {"group_id": gid, "key": key, "batch_id": f"batch-{batch:05d}"}
        if special.get(gid) == "failed":
            rec.update(
                status="failed",
                attempts=2,
                error="RuntimeError: simulated failure of the batch and the group",
            )
        elif special.get(gid) == "invalid":
            rec.update(
                status="invalid",
                error=("too few points: 12 rows, at least min_points=48 needed."),
            )
        else:
            _write_group(
                out,
                store,
                diagnostics,
                hmm_posterior_predictive,
                data,
                rng,
                jax.random.fold_in(root, store.group_seed(gid)),
                rec,
                row,
                num_steps,
                num_draws,
            )
        records.append(rec)
        if len(records) == batch_size or i == len(rows) - 1:
            store.write_manifest_records(out, rec["batch_id"], records)
            records, batch = [], batch + 1
    if finalize:
        store.consolidate_manifest(out)
        store.write_duckdb(out)
    return truth


def _write_group(
    out, store, diagnostics, predictive, data, rng, key, rec, row, num_steps, num_draws
):
    import pyarrow.compute as pc

    expr = (
        (pc.field("region") == row["region"])
        & (pc.field("demographic") == row["demographic"])
        & (pc.field("network") == row["network"])
    )
    table = data.to_table(columns=["timestamp", "count"], filter=expr)
    t = table.column("timestamp").to_numpy()
    v = table.column("count").cast(pa.float64()).to_numpy(zero_copy_only=False)
    draws = _parameter_draws(rng, row, num_steps, num_draws)
    half = num_draws // 2
    diag = diagnostics(
        {k: d[: 2 * half].reshape((2, half) + d.shape[1:]) for k, d in draws.items()}
    )
    y_rep, probs, _ = predictive(key, "poisson", draws, v.astype(np.float32))
    y_rep, probs = np.asarray(y_rep), np.asarray(probs)
    rec.update(
        status="ok",
        error=None,
        attempts=1,
        num_draws=int(num_draws),
        num_divergences=0,
        max_r_hat=float(np.nanmax(diag["r_hat"])),
        min_ess_bulk=float(np.nanmin(diag["ess_bulk"])),
        min_ess_tail=float(np.nanmin(diag["ess_tail"])),
        num_gradients=0,
        num_restarts=0,
        elapsed_s=0.0,
    )
    sub = store.group_path(rec["key"])
    summary = pa.table(diag).append_column(
        "num_divergences", pa.array([0] * len(diag["parameter"]), pa.int64())
    )
    store.atomic_write_parquet(out / "summary" / sub / "part-0.parquet", summary)
    n = len(t)
    pred = pa.table(
        {
            "timestamp": pa.array(np.tile(t, num_draws)),
            "draw": pa.array(np.repeat(np.arange(num_draws, dtype=np.int32), n)),
            "y_pred": pa.array(y_rep.reshape(-1)),
        }
    )
    store.atomic_write_parquet(out / "predictive" / sub / "part-0.parquet", pred)
    cols = {"timestamp": pa.array(t), "y": pa.array(v)}
    for k in range(probs.shape[1]):
        cols[f"p_state_{k}"] = pa.array(probs[:, k])
    cols["y_pred_mean"] = pa.array(y_rep.mean(axis=0))
    store.atomic_write_parquet(out / "states" / sub / "part-0.parquet", pa.table(cols))
