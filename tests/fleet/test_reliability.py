"""fit_many and the fleet commands: reruns, strict data checks, exit codes, file modes,
inspection commands and interrupted runs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from plot_checks import assert_texts_inside
from raybayes.cli import app
from raybayes.errors import ConfigurationError, DataValidationError
from raybayes.fleet import fit_many, plot_group, store
from raybayes.fleet.data import validate_group
from raybayes.fleet.store import read_manifest

QUICK = dict(backend="local", method="map", num_predictive_draws=10, progress_bar=False)
T = pd.date_range("2024-01-01", periods=60, freq="h").to_numpy()


def _write(root, key, times, counts, dtype=pa.float64(), time_type=None):
    folder = Path(root) / "/".join(f"{k}={v}" for k, v in key.items())
    folder.mkdir(parents=True, exist_ok=True)
    times = pa.array(times) if time_type is None else pa.array(times, time_type)
    table = pa.table({"timestamp": times, "count": pa.array(counts, dtype)})
    pq.write_table(table, folder / "part-0.parquet")
    return folder / "part-0.parquet"


def _counts(seed, n=60):
    return np.random.default_rng(seed).poisson(6.0, n)


def _modes(folder):
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in Path(folder).rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One ``fit-many`` run through the command line over a data set whose first
    file is empty, with an int64 group, a float group with NaN and a gap, and
    groups with +inf counts and null timestamps. Run with umask 022."""
    root = tmp_path_factory.mktemp("fleet")
    data = root / "data"
    folder = data / "r=x" / "g=a_empty"
    folder.mkdir(parents=True)
    (folder / "part-0.parquet").write_bytes(b"")  # the first file of the data set
    _write(data, {"r": "x", "g": "b_int"}, T, _counts(1), pa.int64())
    nan = _counts(2).astype(float)
    nan[[5, 9]] = np.nan
    keep = np.ones(60, bool)
    keep[20:22] = False  # a gap of two hours
    _write(data, {"r": "x", "g": "c_nan"}, T[keep], nan[keep])
    inf = _counts(3).astype(float)
    inf[7] = np.inf
    _write(data, {"r": "x", "g": "d_inf"}, T, inf)
    null_time = pa.array(T).to_pylist()
    null_time[0] = None
    _write(
        data,
        {"r": "x", "g": "e_null_time"},
        null_time,
        _counts(4),
        time_type=pa.timestamp("ns"),
    )
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(
            app,
            [
                "fit-many",
                str(data),
                "-o",
                str(root / "out"),
                "--group-keys",
                "r,g",
                "--method",
                "map",
                "--backend",
                "local",
                "--num-predictive-draws",
                "10",
                "--no-progress",
            ],
        )
    finally:
        os.umask(old)
    return root, result


def test_fixture_run_records_each_group(fitted):
    """Probes 3 and 12: +inf is an error, NaN is missing whatever the file's dtype,
    null timestamps are errors, an empty first file is one group's error."""
    root, result = fitted
    assert result.exit_code == 3, result.output  # some invalid data, none failed
    assert "ok 2, invalid 3, failed 0" in result.output
    recs = {r["key"]["g"]: r for r in read_manifest(root / "out").values()}
    assert recs["b_int"]["status"] == "ok" and recs["c_nan"]["status"] == "ok"
    assert recs["c_nan"]["num_filled_steps"] == 2
    assert "could not read" in recs["a_empty"]["error"]
    err = recs["d_inf"]["error"]
    assert "infinite counts in column 'count'" in err and "1 rows" in err
    assert "row 7" in err
    assert "null timestamps in column 'timestamp'" in recs["e_null_time"]["error"]
    states = pd.read_parquet(root / "out" / "states" / "r=x" / "g=c_nan")
    assert len(states) == 60 and states["y"].isna().sum() == 4  # 2 NaN + 2 filled


def test_outputs_respect_the_umask(fitted):
    """Probe 8: every output file has mode 0644 under umask 022, none 0600."""
    root, _ = fitted
    modes = _modes(root / "out")
    assert any(p.startswith("summary/") for p in modes)
    assert {m for m in modes.values()} == {0o644}, modes


def test_atomic_path_follows_the_umask(tmp_path):
    from raybayes.io import atomic_path

    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_plot_group_takes_keys_in_any_order(fitted, tmp_path):
    """Probe 9: keys in another order than the folders', unknown groups, --hours 0."""
    root, _ = fitted
    out, png = str(root / "out"), tmp_path / "g.png"
    ok = CliRunner().invoke(
        app, ["plot-group", out, "--key", '{"g": "b_int", "r": "x"}', "--to", str(png)]
    )
    assert ok.exit_code == 0, ok.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary left
    fig = plot_group(out, {"g": "b_int", "r": "x"}, tmp_path / "h.png")
    assert "posterior predictive" in fig.axes[0].get_title()
    assert fig.axes[-1].get_xlabel() == "time"
    assert_texts_inside(fig)  # titles and labels inside the image
    (tmp_path / "h.png").unlink()
    unknown = CliRunner().invoke(
        app, ["plot-group", out, "--key", '{"g": "zzz", "r": "x"}', "--to", str(png)]
    )
    assert unknown.exit_code == 2 and "error: no group" in unknown.output
    assert "Traceback" not in unknown.output
    names = CliRunner().invoke(app, ["plot-group", out, "--key", '{"g": "b_int"}'])
    assert names.exit_code == 2 and "group keys" in names.output
    bad = CliRunner().invoke(
        app, ["plot-group", out, "--key", '{"g": "d_inf", "r": "x"}']
    )
    assert bad.exit_code == 2 and "invalid" in bad.output and "infinite" in bad.output
    zero = CliRunner().invoke(
        app,
        [
            "plot-group",
            out,
            "--key",
            '{"g": "b_int", "r": "x"}',
            "--hours",
            "0",
            "--to",
            str(png),
        ],
    )
    assert zero.exit_code == 2 and "hours=0" in zero.output


def test_aggregate_checks_its_keys(fitted, tmp_path):
    """Probe 9: --by "", --by draw, a missing folder; --to written atomically."""
    root, _ = fitted
    out = str(root / "out")
    run = CliRunner().invoke
    for by, words in (
        ("", "--by is empty"),
        ("draw", "'draw' is not a group key"),
        ("g; DROP TABLE x", "is not a group key"),
    ):
        res = run(app, ["aggregate", out, "--by", by])
        assert res.exit_code == 2 and words in res.output, res.output
    res = run(app, ["aggregate", str(tmp_path / "nothing"), "--by", "g"])
    assert res.exit_code == 2 and "holds no fit-many output" in res.output
    csv = tmp_path / "agg.csv"
    res = run(app, ["aggregate", out, "--by", "g,r", "--to", str(csv)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(csv)
    assert set(df["g"]) == {"b_int", "c_nan"} and (df["num_groups"] == 1).all()
    assert (df["lower"] <= df["mean"]).all() and (df["mean"] <= df["upper"]).all()
    assert [p.name for p in tmp_path.iterdir()] == ["agg.csv"]


def test_interrupted_run_leaves_no_orphan_outputs(fitted, monkeypatch):
    """Probe 12: the driver is interrupted after a batch's outputs are written but
    before its manifest record: no summary/ of an unrecorded group remains."""
    root, _ = fitted

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "write_manifest_records", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit_many(root / "data", ["r", "g"], root / "out2", **QUICK)
    assert not list((root / "out2").glob("summary/**/*.parquet"))
    assert not list((root / "out2").glob("predictive/**/*.parquet"))


def _short_data(root):
    for i, g in enumerate(("a", "b")):
        _write(root / "data", {"g": g}, T[:10], _counts(i, 10))
    return root / "data"


def test_rerun_with_other_settings_is_refused(tmp_path):
    """Probe 1: a rerun with another model/method is refused, naming what changed;
    the same settings resume; overwrite=True starts again."""
    data = _short_data(tmp_path)  # every group invalid: nothing is compiled
    first = fit_many(data, ["g"], tmp_path / "out", **QUICK)
    assert first.num_invalid == 2
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["settings"]["method"] == "map" and len(run["input"]["files"]) == 2
    with pytest.raises(ConfigurationError) as err:
        fit_many(
            data,
            ["g"],
            tmp_path / "out",
            **dict(QUICK, method="laplace"),
            model="negbin_hmm",
            num_states=3,
        )
    msg = str(err.value)
    assert "method: 'map' -> 'laplace'" in msg
    assert "model: 'poisson_hmm' -> 'negbin_hmm'" in msg
    assert "num_states: 2 -> 3" in msg and "--overwrite" in msg
    assert fit_many(data, ["g"], tmp_path / "out", **QUICK).num_skipped == 2
    # Scheduling settings may change.
    assert (
        fit_many(data, ["g"], tmp_path / "out", **QUICK, batch_size=1).num_skipped == 2
    )
    again = fit_many(
        data, ["g"], tmp_path / "out", **dict(QUICK, method="laplace"), overwrite=True
    )
    assert again.num_skipped == 0 and again.num_invalid == 2
    res = CliRunner().invoke(
        app,
        [
            "fit-many",
            str(data),
            "-o",
            str(tmp_path / "out"),
            "--group-keys",
            "g",
            "--method",
            "map",
            "--backend",
            "local",
            "--no-progress",
        ],
    )
    assert (
        res.exit_code == 2 and "error: " in res.output and "--overwrite" in res.output
    )


def test_fixed_file_is_retried(tmp_path):
    """Probe 4: a group recorded invalid for a read error is read again once its
    file changed; unchanged groups are skipped."""
    data = _short_data(tmp_path)
    broken = data / "g=b" / "part-0.parquet"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    fit_many(data, ["g"], tmp_path / "out", **QUICK)
    recs = {r["key"]["g"]: r for r in read_manifest(tmp_path / "out").values()}
    assert "could not read" in recs["b"]["error"]
    _write(data, {"g": "b"}, T[:12], _counts(5, 12))  # restored (still short)
    res = fit_many(data, ["g"], tmp_path / "out", **QUICK)
    assert res.num_skipped == 1 and res.num_changed == 1
    recs = {r["key"]["g"]: r for r in read_manifest(tmp_path / "out").values()}
    assert "too few points: 12 rows" in recs["b"]["error"]
    assert "too few points: 10 rows" in recs["a"]["error"]


def test_bad_settings_are_refused_up_front(tmp_path):
    """Probe 5: --num-chains 0 is refused with its own message, exit status 2, no
    traceback; --debug shows the exception."""
    data = _short_data(tmp_path)
    args = [
        "fit-many",
        str(data),
        "-o",
        str(tmp_path / "out"),
        "--group-keys",
        "g",
        "--num-chains",
        "0",
        "--backend",
        "local",
        "--no-progress",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert "error: num_chains=0 is not allowed; pass at least 1 chain" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    debug = CliRunner().invoke(app, args + ["--debug"])
    assert isinstance(debug.exception, ConfigurationError)
    with pytest.raises(ConfigurationError, match="target_rhat=0.5"):
        fit_many(data, ["g"], tmp_path / "out", target_rhat=0.5, **QUICK)
    with pytest.warns(FutureWarning, match="target_r_hat"):
        fit_many(data, ["g"], tmp_path / "out", target_r_hat=1.01, **QUICK)


FAILING_MODEL = """
def broken(y, mask=None, covariates=None):
    raise RuntimeError("this model cannot be fitted")
"""


def test_failed_groups_give_a_nonzero_exit_status(tmp_path):
    """Probe 5: every group failed -> exit status 1 (0 on main)."""
    (tmp_path / "m.py").write_text(FAILING_MODEL)
    for g in ("a", "b"):
        _write(tmp_path / "data", {"g": g}, T, _counts(0))
    res = CliRunner().invoke(
        app,
        [
            "fit-many",
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "out"),
            "--group-keys",
            "g",
            "--model",
            f"{tmp_path / 'm.py'}:broken",
            "--method",
            "map",
            "--backend",
            "local",
            "--no-progress",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "failed 2" in res.output
    # An all-failed folder: aggregate says so.
    agg = CliRunner().invoke(app, ["aggregate", str(tmp_path / "out"), "--by", "g"])
    assert agg.exit_code == 2 and "no posterior predictive draws" in agg.output
    assert "2 failed" in agg.output


def _table(times, counts, time_type=None):
    t = pa.array(times) if time_type is None else pa.array(times, time_type)
    return pa.table({"timestamp": t, "count": pa.array(counts, pa.float64())})


def test_time_grid_checks():
    """Probe 3: gaps become explicit missing values; off-grid steps, unparseable
    text and +inf are errors naming the column, the count and the first row."""
    y = np.arange(60.0) % 5
    keep = np.r_[0:30, 33:60]
    t, v, filled = validate_group(
        _table(T[keep][::-1], y[keep][::-1]), "timestamp", "count", 10
    )
    assert filled == 3 and len(t) == 60 and (t == T).all()
    assert np.isnan(v[30:33]).all() and np.array_equal(v[keep], y[keep])
    off = T.copy()
    off[40] = off[40] + np.timedelta64(30, "m")
    with pytest.raises(DataValidationError, match="irregular time steps.*1 timestamps"):
        validate_group(_table(off, y), "timestamp", "count", 10)
    t2, *_ = validate_group(
        _table(T[::2], y[::2]), "timestamp", "count", 10, frequency="2h"
    )
    assert len(t2) == 30
    text = [str(x) for x in pd.DatetimeIndex(T)]
    text[3] = "not a time"
    with pytest.raises(DataValidationError, match="unparseable.*1 rows.*row 3") as err:
        validate_group(_table(text, y), "timestamp", "count", 10)
    assert err.value.column == "timestamp" and err.value.num_bad_rows == 1
    parsed, *_ = validate_group(
        _table([str(x) for x in pd.DatetimeIndex(T)], y), "timestamp", "count", 10
    )
    assert (parsed == T).all()
    inf = y.copy()
    inf[[4, 8]] = [np.inf, -np.inf]
    with pytest.raises(DataValidationError, match="infinite counts.*2 rows.*row 4"):
        validate_group(_table(T, inf), "timestamp", "count", 10)
    stray = T.copy()
    stray[-1] = T[0] + np.timedelta64(5000, "h")
    with pytest.raises(DataValidationError, match="gaps in column 'timestamp'"):
        validate_group(_table(stray, y), "timestamp", "count", 10)


USER_MODEL = """
import numpyro, numpyro.distributions as dist

def iid_poisson(y, mask=None, covariates=None):
    rate = numpyro.sample("rate", dist.Gamma(2.0, 0.1))
    with numpyro.plate("time", mask.shape[0]):
        numpyro.sample("y", dist.Poisson(rate).mask(mask), obs=y)
"""


def test_missed_target_is_flagged_and_user_groups_plot(tmp_path):
    """Probe 12: a group whose draws miss the ESS target is ok with
    met_target=False, counted in the summary line; probe 9: plot-group draws a
    user-model group (no state panel) instead of an IndexError."""
    (tmp_path / "m.py").write_text(USER_MODEL)
    _write(tmp_path / "data", {"g": "a"}, T, _counts(0))
    res = CliRunner().invoke(
        app,
        [
            "fit-many",
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "out"),
            "--group-keys",
            "g",
            "--model",
            f"{tmp_path / 'm.py'}:iid_poisson",
            "--backend",
            "local",
            "--num-chains",
            "2",
            "--num-warmup",
            "30",
            "--num-samples",
            "30",
            "--target-ess",
            "100000",
            "--max-extensions",
            "0",
            "--num-predictive-draws",
            "10",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "ok 1 (1 missed the ESS/R-hat target)" in res.output
    (rec,) = read_manifest(tmp_path / "out").values()
    assert rec["status"] == "ok" and rec["met_target"] is False
    man = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert man["met_target"].tolist() == [False]
    png = tmp_path / "g.png"
    plot = CliRunner().invoke(
        app,
        ["plot-group", str(tmp_path / "out"), "--key", '{"g": "a"}', "--to", str(png)],
    )
    assert plot.exit_code == 0, plot.output
    assert png.read_bytes()[:4] == b"\x89PNG"
