"""fit_many: validation, manifest, resume, worker loss, outputs, aggregates."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybayes.datasets.fleet import simulate_fleet
from raybayes.errors import ConfigurationError
from raybayes.fleet import aggregate, connect_results, fit_many
from raybayes.fleet.store import read_manifest

KEYS = ["region", "demographic", "network"]
FAST = dict(backend="local", batch_size=2, num_warmup=100, num_samples=100,
            max_extensions=0, num_predictive_draws=10, progress_bar=False)


def _write(root, key, times, counts):
    folder = Path(root) / "/".join(f"{k}={v}" for k, v in key.items())
    folder.mkdir(parents=True, exist_ok=True)
    counts = pa.array(np.asarray(counts, np.float64))  # one schema for every group
    pq.write_table(pa.table({"timestamp": times, "count": counts}), folder / "part-0.parquet")


def test_missing_group_key_column_stops_before_start(tmp_path):
    simulate_fleet(tmp_path, 1, 1, 2, num_steps=60)
    with pytest.raises(ConfigurationError, match="'channel'.*available columns"):
        fit_many(tmp_path / "data", ["region", "channel"], tmp_path / "out", **FAST)
    assert not (tmp_path / "out" / "manifest").exists()


def test_bad_groups_are_recorded_not_fatal(tmp_path):
    t = pd.date_range("2024-01-01", periods=60, freq="h").to_numpy()
    ok = np.arange(60) % 7
    _write(tmp_path, {"g": "short"}, t[:10], ok[:10])
    _write(tmp_path, {"g": "negative"}, t, np.where(np.arange(60) == 5, -1, ok))
    _write(tmp_path, {"g": "fraction"}, t, ok + np.where(np.arange(60) == 3, 0.5, 0.0))
    _write(tmp_path, {"g": "dup"}, np.concatenate([t[:30], t[:30]]), ok)
    res = fit_many(tmp_path, ["g"], tmp_path / "out", **FAST)
    assert res.num_invalid == 4 and res.num_ok == 0
    errors = {json.loads(r["group_id"])["g"]: r["error"] for r in read_manifest(tmp_path / "out").values()}
    assert "too few points: 10 rows" in errors["short"]
    assert "negative counts" in errors["negative"] and "1 rows" in errors["negative"]
    assert "non-integer counts" in errors["fraction"]
    assert "duplicated timestamps" in errors["dup"] and "30 duplicates" in errors["dup"]
    # A rerun skips them (they are finished, with their errors).
    again = fit_many(tmp_path, ["g"], tmp_path / "out", **FAST)
    assert again.num_skipped == 4


def test_worker_loss_is_retried_and_rerun_skips_finished(tmp_path):
    simulate_fleet(tmp_path, 1, 2, 2, num_steps=120, seed=3)
    killed = []

    def kill_once(pool, submitted):
        if submitted == 1 and not killed:
            pool.kill(0)  # the next batch sent to worker 0 finds it dead
            killed.append(True)

    res = fit_many(tmp_path / "data", KEYS, tmp_path / "out", method="laplace",
                   _after_submit=kill_once, num_workers=1, **FAST)
    assert killed and res.num_ok == 4 and res.num_failed == 0
    man = res.manifest
    assert man["group_id"].is_unique and (man["attempts"] >= 1).all()
    assert (man["attempts"] == 2).sum() == 2  # the batch sent to the dead worker
    con = connect_results(tmp_path / "out")
    n = con.execute("SELECT COUNT(*) FROM predictive").fetchone()[0]
    assert n == 4 * 10 * 120  # groups x draws x T, no duplicates
    again = fit_many(tmp_path / "data", KEYS, tmp_path / "out", method="laplace",
                     num_workers=1, **FAST)
    assert again.num_skipped == 4 and again.num_ok == 4
    agg = aggregate(tmp_path / "out", "network", 0.9)
    assert set(agg["network"]) == {"n0", "n1"} and (agg["num_groups"] == 2).all()
    assert (agg["lower"] <= agg["mean"]).all() and (agg["mean"] <= agg["upper"]).all()


def test_driver_killed_mid_run_then_rerun_completes(tmp_path):
    simulate_fleet(tmp_path, 2, 1, 2, num_steps=120, seed=4)
    # The driver SIGKILLs itself right after the first batch's manifest record is
    # on disk: an abrupt death at a known point, with no timing race.
    code = (
        "import os, signal\n"
        "import raybayes.fleet.store as st\n"
        "real = st.write_manifest_records\n"
        "def write_then_die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "st.write_manifest_records = write_then_die\n"
        "from raybayes.fleet import fit_many\n"
        f"fit_many({str(tmp_path / 'data')!r}, {KEYS!r}, {str(tmp_path / 'out')!r}, "
        "method='laplace', backend='local', batch_size=2, num_predictive_draws=10, "
        "progress_bar=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=600)
    assert proc.returncode == -signal.SIGKILL
    first = len(read_manifest(tmp_path / "out"))
    assert 0 < first < 4
    res = fit_many(tmp_path / "data", KEYS, tmp_path / "out", method="laplace",
                   backend="local", batch_size=2, num_predictive_draws=10, progress_bar=False)
    assert res.num_ok == 4 and res.num_skipped == first
    con = connect_results(tmp_path / "out")
    rows = con.execute(
        "SELECT region, demographic, network, COUNT(*) FROM predictive GROUP BY ALL").fetchall()
    assert len(rows) == 4 and all(r[3] == 10 * 120 for r in rows)


@pytest.mark.slow
def test_nuts_fleet_covers_true_parameters(tmp_path):
    truth = simulate_fleet(tmp_path, 2, 2, 3, num_steps=500, seed=5)
    res = fit_many(tmp_path / "data", KEYS, tmp_path / "out", backend="local", batch_size=4,
                   num_warmup=200, num_samples=200, num_predictive_draws=10, progress_bar=False)
    assert res.num_ok == 12
    con = connect_results(tmp_path / "out")
    s = con.execute("SELECT region, demographic, network, parameter, q05, q95 FROM summary").df()
    t = truth.melt(id_vars=KEYS, value_vars=["rate_0", "rate_1"], var_name="p", value_name="true")
    t["parameter"] = t["p"].map({"rate_0": "rate[0]", "rate_1": "rate[1]"})
    m = s.merge(t, on=KEYS + ["parameter"])
    covered = ((m["q05"] <= m["true"]) & (m["true"] <= m["q95"])).mean()
    # 24 intervals at 90%: fewer than 17 covered has probability < 0.001.
    assert covered >= 17 / 24


USER_MODELS = '''
import numpyro, numpyro.distributions as dist

def iid_poisson(y, mask=None, covariates=None):
    rate = numpyro.sample("rate", dist.Gamma(2.0, 0.1))
    with numpyro.plate("time", mask.shape[0]):
        numpyro.sample("y", dist.Poisson(rate).mask(mask), obs=y)

def factor_only(y, mask=None, covariates=None):
    rate = numpyro.sample("rate", dist.Gamma(2.0, 0.1))
    numpyro.factor("loglik", (dist.Poisson(rate).log_prob(y) * mask).sum())
'''


@pytest.mark.parametrize("name", ["iid_poisson", "factor_only"])
def test_user_model_file_gets_predictive_draws(tmp_path, name):
    """A model from a user's file: predictive draws of its observed site when it
    samples one with y=None; otherwise the fit is kept and the reason recorded."""
    path = tmp_path / "models.py"
    path.write_text(USER_MODELS)
    t = pd.date_range("2024-01-01", periods=50, freq="h").to_numpy()
    counts = np.random.default_rng(0).poisson(7.0, 50)
    _write(tmp_path / "data", {"g": "a"}, t, counts)
    res = fit_many(tmp_path / "data", ["g"], tmp_path / "out", model=f"{path}:{name}",
                   method="laplace", backend="local", num_predictive_draws=10,
                   progress_bar=False)
    assert res.num_ok == 1
    (rec,) = read_manifest(tmp_path / "out").values()
    con = connect_results(tmp_path / "out")
    if name == "iid_poisson":
        assert rec.get("predictive_error") is None
        pred = con.execute("SELECT y_pred FROM predictive").df()["y_pred"].to_numpy()
        assert len(pred) == 10 * 50
        # Poisson(rate ~ 7) draws: mean near the data mean, integers >= 0.
        assert abs(pred.mean() - counts.mean()) < 1.0 and (pred >= 0).all()
    else:
        assert "no observed sample site" in rec["predictive_error"]
