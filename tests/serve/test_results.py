"""FleetResults in process: the draws cache against DuckDB, files that change, and
manifests with fields or statuses it does not know."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serve_support import group_draws, ok_keys

from raybayes.errors import ConfigurationError
from raybayes.fleet import store
from raybayes.serve import FleetResults
from raybayes.serve.results import DrawCache

GROUP = {"region": "r1", "demographic": "d0", "network": "n2"}


def _copy(src, dst, keys, extra=None):
    """Copy groups' outputs and write their records (with ``extra`` fields)."""
    records = store.read_manifest(src)
    recs = []
    for key in keys:
        for table in ("summary", "predictive", "states"):
            f = src / table / store.group_path(key) / "part-0.parquet"
            target = dst / table / store.group_path(key) / "part-0.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        recs.append(
            dict(
                records[store.group_id(key)],
                **(extra or {}).get(store.group_id(key), {}),
            )
        )
    store.write_manifest_records(dst, "batch-0", recs)


def test_cache_and_duckdb_paths_agree_and_equal_numpy(fleet_out):
    cached, direct = FleetResults(fleet_out), FleetResults(fleet_out, cache_mib=0)
    for kw in (
        dict(
            by="demographic",
            where={"network": ["n0", "n2"]},
            start="2024-01-04T07:00",
            end="2024-01-06",
            interval=0.8,
        ),
        dict(by=["region", "network"]),
        dict(where={"region": "r1"}, interval=0.99),
    ):
        a, b = cached.aggregate(**kw), direct.aggregate(**kw)
        pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-12)
    assert cached._cache.num_bytes > 0 and direct._cache.num_bytes == 0
    # the one-region total against NumPy
    lo = 0.005
    got = cached.aggregate(where={"region": "r1"}, interval=0.99)
    total = sum(group_draws(fleet_out, k)[1] for k in ok_keys(fleet_out, region="r1"))
    np.testing.assert_allclose(got["lower"], np.quantile(total, lo, axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        got["upper"], np.quantile(total, 1 - lo, axis=0), rtol=1e-12
    )
    band_a = cached.predictive_band(GROUP, "2024-01-03", "2024-01-04")
    band_b = direct.predictive_band(GROUP, "2024-01-03", "2024-01-04")
    pd.testing.assert_frame_equal(band_a, band_b, check_dtype=False, rtol=1e-12)


def test_groups_with_other_draws_or_times_are_summed_where_they_overlap(
    fleet_out, tmp_path
):
    keys = ok_keys(fleet_out, region="r1")[:3]
    _copy(fleet_out, tmp_path, keys)
    # group 0 loses its last 10 hours (a shorter series), group 1 loses draw 5 at one
    # time (not a full grid: the cache declines it and DuckDB sums what is there)
    for i, drop in (
        (
            0,
            lambda df: df[
                df["timestamp"] < df["timestamp"].max() - pd.Timedelta(hours=9)
            ],
        ),
        (
            1,
            lambda df: df[
                ~((df["draw"] == 5) & (df["timestamp"] == df["timestamp"].min()))
            ],
        ),
    ):
        path = tmp_path / "predictive" / store.group_path(keys[i]) / "part-0.parquet"
        df = drop(pq.read_table(path).to_pandas())
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    frames = [
        pq.read_table(
            tmp_path / "predictive" / store.group_path(k) / "part-0.parquet"
        ).to_pandas()
        for k in keys
    ]
    sums = (
        pd.concat(frames).groupby(["timestamp", "draw"])["y_pred"].agg(["sum", "count"])
    )
    ref = sums.groupby("timestamp").agg(
        mean=("sum", "mean"),
        num_groups=("count", "max"),
        lower=("sum", lambda x: np.quantile(x, 0.05)),
        upper=("sum", lambda x: np.quantile(x, 0.95)),
    )
    for results in (FleetResults(tmp_path), FleetResults(tmp_path, cache_mib=0)):
        got = results.aggregate().set_index("timestamp")
        np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-12)
        np.testing.assert_allclose(got["lower"], ref["lower"], rtol=1e-12)
        np.testing.assert_allclose(got["upper"], ref["upper"], rtol=1e-12)
        assert got["num_groups"].tolist() == ref["num_groups"].tolist()
        assert got["num_groups"].iloc[-1] == 2 and got["num_groups"].iloc[0] == 3
    # without the incomplete group, the cache covers the other two: times that
    # only one of them has count one group
    results = FleetResults(tmp_path)
    got = results.aggregate(
        where={
            "network": [keys[0]["network"], keys[2]["network"]],
            "demographic": [keys[0]["demographic"], keys[2]["demographic"]],
        }
    )
    assert results._cache.num_bytes > 0
    assert got["num_groups"].iloc[-1] == 1 and got["num_groups"].iloc[0] == 2


def test_a_replaced_file_is_read_again(fleet_out, tmp_path):
    _copy(fleet_out, tmp_path, [GROUP])
    results = FleetResults(tmp_path)
    before = results.aggregate()["mean"].to_numpy()
    path = tmp_path / "predictive" / store.group_path(GROUP) / "part-0.parquet"
    table = pq.read_table(path)
    doubled = table.set_column(2, "y_pred", pa.array(table["y_pred"].to_numpy() * 2))
    tmp = path.with_name(".tmp-x.parquet")
    pq.write_table(doubled, tmp)
    os.replace(tmp, path)
    np.testing.assert_allclose(results.aggregate()["mean"].to_numpy(), 2 * before)


def test_draw_cache_evicts_the_least_recently_used(tmp_path):
    value = (np.zeros(10, "datetime64[ns]"), np.zeros((4, 10)))
    size = sum(a.nbytes for a in value)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"f{i}"))
        (tmp_path / f"f{i}").write_bytes(b"x")
    reads = []

    def read(path):
        reads.append(path)
        return value

    cache = DrawCache(2 * size)
    for p in (paths[0], paths[1], paths[0], paths[2], paths[0], paths[1]):
        assert cache.get(p, read) is value
        assert cache.num_bytes <= 2 * size
    # f0, f1 read; f0 hit; f2 read (f1 out); f0 hit; f1 read again (f2 out)
    assert reads == [paths[0], paths[1], paths[2], paths[1]]
    assert cache.get(str(tmp_path / "missing"), read) is None
    assert DrawCache(size - 1).get(paths[0], read) is None  # too big: not kept


def test_manifest_fields_and_statuses_it_does_not_know(fleet_out, tmp_path):
    keys = ok_keys(fleet_out, region="r0")[:2]
    extra = {
        store.group_id(keys[0]): {"missed_target": True, "config_hash": "abc"},
        store.group_id(keys[1]): {"status": "missed_target"},
    }
    _copy(fleet_out, tmp_path, keys, extra)
    results = FleetResults(tmp_path)
    rows = results.group_records()
    assert [r["status"] for r in rows] == ["missed_target", "ok"]
    assert rows[1]["missed_target"] is True and rows[1]["config_hash"] == "abc"
    assert results.aggregate().attrs["num_groups"] == 2  # both have draws


def test_bad_construction():
    with pytest.raises(ConfigurationError, match="is not a folder"):
        FleetResults("/nonexistent/fleet-output")
    with pytest.raises(ConfigurationError, match="cache_mib"):
        FleetResults(".", cache_mib=-1)
