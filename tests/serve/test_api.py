"""raybayes serve: every endpoint and bad input, against a live server on 127.0.0.1.

The references are computed with NumPy from the raw draws in the Parquet files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from serve_support import (
    FAILED,
    INVALID,
    KEYS,
    NUM_DRAWS,
    NUM_STEPS,
    group_draws,
    ok_keys,
    running_server,
)

from raybayes.fleet import store

GROUP = {"region": "r0", "demographic": "d1", "network": "n1"}


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def _folder_state(out: Path) -> dict:
    """Every file of the folder with its size and content hash."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _summed(out, keys, start=None, end=None):
    """NumPy reference: times and draw-by-draw sums ``(D, T)`` of the groups' draws."""
    frames = [group_draws(out, k) for k in keys]
    times = frames[0][0]
    for t, _ in frames:
        np.testing.assert_array_equal(t, times)
    total = sum(y for _, y in frames)
    keep = np.ones(len(times), bool)
    if start is not None:
        keep &= times >= np.datetime64(start)
    if end is not None:
        keep &= times < np.datetime64(end)
    return times[keep], total[:, keep]


def _check_band(body, times, draws, interval):
    lo = (1 - interval) / 2
    assert pd.to_datetime(body["timestamp"]).to_numpy().tolist() == times.tolist()
    np.testing.assert_allclose(body["mean"], draws.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        body["lower"], np.quantile(draws, lo, axis=0), rtol=1e-12
    )
    np.testing.assert_allclose(
        body["upper"], np.quantile(draws, 1 - lo, axis=0), rtol=1e-12
    )
    assert set(body["num_draws"]) == {NUM_DRAWS}


# ---------------------------------------------------------------------- endpoints
def test_keys_lists_keys_values_and_statuses(client):
    body = client.get("/api/keys").json()
    assert body["keys"] == KEYS
    assert body["values"] == {
        "region": ["r0", "r1"],
        "demographic": ["d0", "d1"],
        "network": ["n0", "n1", "n2"],
    }
    assert body["num_groups"] == 12
    assert body["statuses"] == {"ok": 10, "failed": 1, "invalid": 1}


def test_groups_filters_and_puts_failures_first(client, fleet_out):
    body = client.get("/api/groups").json()
    assert body["num_groups"] == 12
    statuses = [g["status"] for g in body["groups"]]
    assert statuses[:2] == ["failed", "invalid"] and set(statuses[2:]) == {"ok"}
    manifest = store.read_manifest(fleet_out)
    for g in body["groups"]:
        rec = manifest[g["group_id"]]
        assert g["key"] == rec["key"]
        if g["status"] == "ok":
            assert g["max_r_hat"] == pytest.approx(rec["max_r_hat"], rel=1e-12)
            assert g["min_ess_bulk"] == pytest.approx(rec["min_ess_bulk"], rel=1e-12)
            assert g["num_divergences"] == rec["num_divergences"]
    r_hat = [g["max_r_hat"] for g in body["groups"][2:]]
    assert r_hat == sorted(r_hat, reverse=True)

    body = client.get(
        "/api/groups", params=[("region", "r0"), ("network", "n1"), ("network", "n2")]
    ).json()
    assert sorted(
        (g["key"]["demographic"], g["key"]["network"]) for g in body["groups"]
    ) == [("d0", "n1"), ("d0", "n2"), ("d1", "n1"), ("d1", "n2")]
    body = client.get("/api/groups", params={"status": "failed,invalid"}).json()
    assert [g["key"] for g in body["groups"]] == [FAILED, INVALID]


def test_failures_lists_failed_and_invalid_with_errors(client, fleet_out):
    body = client.get("/api/failures").json()
    assert (body["num_failed"], body["num_invalid"]) == (1, 1)
    manifest = store.read_manifest(fleet_out)
    for g, key in zip(body["groups"], [FAILED, INVALID], strict=True):
        assert g["key"] == key
        assert g["error"] == manifest[store.group_id(key)]["error"]
    assert "too few points" in body["groups"][1]["error"]


def test_group_summary_matches_the_summary_file(client, fleet_out):
    body = client.get("/api/group/summary", params=GROUP).json()
    assert body["key"] == GROUP and body["status"] == "ok"
    ref = pq.read_table(
        fleet_out / "summary" / store.group_path(GROUP) / "part-0.parquet"
    )
    ref = ref.to_pandas()
    got = pd.DataFrame(body["parameters"])
    assert got["parameter"].tolist() == ref["parameter"].tolist()
    for col in ("mean", "sd", "q05", "q95", "ess_bulk", "r_hat"):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-12)
    rec = store.read_manifest(fleet_out)[store.group_id(GROUP)]
    assert body["record"]["max_r_hat"] == pytest.approx(rec["max_r_hat"], rel=1e-12)
    # a failed group has a record and no parameters
    body = client.get("/api/group/summary", params=FAILED).json()
    assert body["status"] == "failed" and body["parameters"] == []
    assert "simulated failure" in body["record"]["error"]


def test_group_predictive_band_equals_numpy_on_the_raw_draws(client, fleet_out):
    start, end = "2024-01-02T05:00", "2024-01-04T00:00"
    body = client.get(
        "/api/group/predictive", params=dict(GROUP, start=start, end=end, interval=0.8)
    ).json()
    times, draws = _summed(fleet_out, [GROUP], start, end)
    assert len(times) == 43
    _check_band(body, times, draws, 0.8)
    states = pq.read_table(
        fleet_out / "states" / store.group_path(GROUP) / "part-0.parquet"
    ).to_pandas()
    states = states.set_index("timestamp").loc[times]
    np.testing.assert_allclose(body["y"], states["y"])
    np.testing.assert_allclose(body["mean_state"], states["p_state_1"], rtol=1e-6)
    np.testing.assert_allclose(body["y_pred_mean"], draws.mean(axis=0), rtol=1e-12)


def test_aggregate_by_key_equals_numpy_sums_of_the_raw_draws(client, fleet_out):
    start, end = "2024-01-03", "2024-01-10"
    body = client.get(
        "/api/aggregate",
        params=[
            ("by", "network"),
            ("region", "r0"),
            ("start", start),
            ("end", end),
            ("interval", "0.9"),
        ],
    ).json()
    assert body["by"] == ["network"] and body["where"] == {"region": ["r0"]}
    assert body["num_groups"] == 5  # r0 has 6 groups, one failed
    assert [s["key"] for s in body["series"]] == [
        {"network": "n0"},
        {"network": "n1"},
        {"network": "n2"},
    ]
    for series in body["series"]:
        keys = ok_keys(fleet_out, region="r0", network=series["key"]["network"])
        assert set(series["num_groups"]) == {len(keys)}
        times, draws = _summed(fleet_out, keys, start, end)
        assert len(times) == 24 * 7
        _check_band(series, times, draws, 0.9)


def test_aggregate_over_every_group_and_value_lists(client, fleet_out):
    body = client.get("/api/aggregate", params={"interval": 0.5}).json()
    assert body["num_groups"] == 10 and len(body["series"]) == 1
    times, draws = _summed(fleet_out, ok_keys(fleet_out))
    assert len(times) == NUM_STEPS
    _check_band(body["series"][0], times, draws, 0.5)
    # several values of one key, two keys kept (repeated and comma forms agree)
    params = [
        ("network", "n1"),
        ("network", "n2"),
        ("by", "region"),
        ("by", "demographic"),
        ("end", "2024-01-02"),
    ]
    body = client.get("/api/aggregate", params=params).json()
    same = client.get(
        "/api/aggregate",
        params=[
            ("network", "n1"),
            ("network", "n2"),
            ("by", "region,demographic"),
            ("end", "2024-01-02"),
        ],
    ).json()
    assert body == same
    assert [s["key"] for s in body["series"]] == [
        {"region": r, "demographic": d} for r in ("r0", "r1") for d in ("d0", "d1")
    ]
    for series in body["series"]:
        keys = ok_keys(fleet_out, network=["n1", "n2"], **series["key"])
        times, draws = _summed(fleet_out, keys, None, "2024-01-02")
        _check_band(series, times, draws, 0.9)


def test_openapi_schema_and_read_only_methods(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/api/keys",
        "/api/groups",
        "/api/failures",
        "/api/group/summary",
        "/api/group/predictive",
        "/api/aggregate",
    }
    assert all(set(ops) == {"get"} for ops in schema["paths"].values())
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert client.request(method, "/api/aggregate").status_code == 405
    assert client.get("/docs").status_code == 404  # its scripts would come from a CDN


def test_page_and_plotly_bundle_are_served_locally(client):
    r = client.get("/", params={"region": "r0"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/static/plotly.min.js">' in r.text
    assert 'id="chart"' in r.text and 'id="diagnostics"' in r.text
    assert "Sum of 5 groups" in r.text
    assert "cdn" not in r.text.lower()
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert b"plotly" in js.content[:2000].lower()
    r = client.get("/", params={"region": "r9"})
    assert r.status_code == 400 and "region=&#39;r9&#39; is not a value" in r.text


# ---------------------------------------------------------------------- bad input
BAD = [
    # (path, params, status, words of the message)
    (
        "/api/aggregate",
        {"by": "channel"},
        400,
        ["'channel' is not a group key", "region"],
    ),
    (
        "/api/aggregate",
        {"channel": "c0"},
        400,
        ["unknown query parameter 'channel'", "region, demographic, network", "by"],
    ),
    ("/api/aggregate", {"region": "r9"}, 400, ["region='r9' is not a value", "r0, r1"]),
    ("/api/aggregate", {"interval": "1.5"}, 400, ["strictly between 0 and 1"]),
    ("/api/aggregate", {"interval": "0"}, 400, ["strictly between 0 and 1"]),
    ("/api/aggregate", {"interval": "nan"}, 400, ["strictly between 0 and 1"]),
    ("/api/aggregate", {"interval": "ninety"}, 400, ["interval", "valid number"]),
    (
        "/api/aggregate",
        {"start": "2024-13-01"},
        400,
        ["start='2024-13-01' is not an ISO 8601"],
    ),
    (
        "/api/aggregate",
        {"end": "next week"},
        400,
        ["end='next week' is not an ISO 8601"],
    ),
    (
        "/api/aggregate",
        {"start": "2024-01-05", "end": "2024-01-02"},
        400,
        ["empty time window", "[start, end)"],
    ),
    (
        "/api/aggregate",
        {"start": "2025-01-01"},
        400,
        [
            "no predictive draws in the window",
            "2024-01-01 00:00:00 to 2024-01-10 23:00:00",
        ],
    ),
    (
        "/api/aggregate",
        FAILED,
        400,
        ["empty selection", "status failed", "/api/failures"],
    ),
    (
        "/api/aggregate",
        {"network": "n2", "demographic": "d1", "region": "r1"},
        400,
        ["empty selection", "status invalid"],
    ),
    ("/api/group/summary", {"region": "r0"}, 400, ["missing: demographic, network"]),
    (
        "/api/group/summary",
        [("region", "r0"), ("region", "r1"), ("demographic", "d0"), ("network", "n1")],
        400,
        ["several values for: region"],
    ),
    (
        "/api/group/summary",
        dict(GROUP, network="n7"),
        400,
        ["network='n7' is not a value"],
    ),
    ("/api/group/predictive", dict(GROUP, start="yesterday"), 400, ["ISO 8601"]),
    ("/api/group/predictive", dict(GROUP, interval="-0.1"), 400, ["between 0 and 1"]),
    (
        "/api/group/predictive",
        FAILED,
        404,
        ["no predictive draws", "simulated failure"],
    ),
    ("/api/group/predictive", INVALID, 404, ["no predictive draws", "too few points"]),
    ("/api/groups", {"by": "region"}, 400, ["unknown query parameter 'by'", "status"]),
]


@pytest.mark.parametrize(
    ("path", "params", "status", "words"),
    BAD,
    ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)],
)
def test_bad_input_gets_a_4xx_that_says_what_is_allowed(
    client, path, params, status, words
):
    r = client.get(path, params=params)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, detail


INJECTIONS = [
    {"by": "region;DROP TABLE predictive"},
    {"by": 'region"; DROP VIEW summary; --'},
    {"by": "region) UNION SELECT 1 --"},
    {"region": "r0' OR '1'='1"},
    {"region": 'r0"; DROP TABLE manifest; --'},
    {"region": "r0'); COPY (SELECT 1) TO 'pwned.csv'; --"},
    {"re'gion": "r0"},
    {'network"': "n1"},
    {"start": "2024-01-01'; DROP TABLE x; --"},
]


@pytest.mark.parametrize("params", INJECTIONS, ids=range(len(INJECTIONS)))
def test_sql_injection_attempts_are_rejected_and_change_nothing(
    client, fleet_out, params
):
    before = _folder_state(fleet_out)
    reference = client.get("/api/aggregate", params={"by": "region"}).json()
    r = client.get("/api/aggregate", params=params)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert (
        "not a group key" in detail or "not a value" in detail or "ISO 8601" in detail
    )
    assert client.get("/api/aggregate", params={"by": "region"}).json() == reference
    assert _folder_state(fleet_out) == before
    assert not list(Path.cwd().glob("pwned*"))


# ------------------------------------------------------------ a job still writing
def _publish(src: Path, dst: Path, keys: list[dict], batch: str, *, manifest=True):
    """Copy groups' outputs from a finished folder, atomically, then their manifest file
    (the order fit_many follows)."""
    records = store.read_manifest(src)
    for key in keys:
        for table in ("summary", "predictive", "states"):
            f = src / table / store.group_path(key) / "part-0.parquet"
            if f.exists():
                target = dst / table / store.group_path(key) / "part-0.parquet"
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.parent / ".tmp-copy.parquet"
                shutil.copyfile(f, tmp)
                os.replace(tmp, target)
    if manifest:
        recs = [records[store.group_id(k)] for k in keys]
        store.write_manifest_records(dst, batch, recs)


def test_serves_consistent_results_while_groups_are_being_written(fleet_out, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r0 = ok_keys(fleet_out, region="r0")
    r1 = ok_keys(fleet_out, region="r1")
    _publish(fleet_out, out, r0[:3], "batch-a")
    with running_server(out) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/api/keys").json()["num_groups"] == 3
        # a group whose files are written but not yet recorded, and a half-written
        # temporary file next to a finished one: neither is read
        _publish(fleet_out, out, r0[3:], "batch-b", manifest=False)
        junk = out / "predictive" / store.group_path(r0[0]) / ".tmp-abc123.parquet"
        junk.write_bytes(b"PAR1 half a file")
        body = c.get("/api/aggregate").json()
        assert body["num_groups"] == 3
        times, draws = _summed(fleet_out, r0[:3])
        _check_band(body["series"][0], times, draws, 0.9)
        r = c.get("/api/aggregate", params={"region": "r1"})
        assert (
            r.status_code == 400 and "region='r1' is not a value" in r.json()["detail"]
        )
        # the batch is recorded: its groups appear, without a restart
        _publish(fleet_out, out, r0[3:], "batch-b")
        _publish(fleet_out, out, r1, "batch-c")
        body = c.get("/api/aggregate", params={"by": "region"}).json()
        assert [s["key"]["region"] for s in body["series"]] == ["r0", "r1"]
        for series, keys in zip(body["series"], [r0, r1], strict=True):
            times, draws = _summed(fleet_out, keys)
            _check_band(series, times, draws, 0.9)
        assert c.get("/api/keys").json()["num_groups"] == len(r0) + len(r1)


def test_starts_on_a_folder_with_no_batch_finished_yet(fleet_out, tmp_path):
    with running_server(tmp_path) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = c.get("/api/keys").json()
        assert body == {"keys": [], "values": {}, "num_groups": 0, "statuses": {}}
        r = c.get("/api/aggregate")
        assert r.status_code == 400 and "empty selection" in r.json()["detail"]
        assert c.get("/").status_code == 400  # the page says no group is recorded yet
        _publish(fleet_out, tmp_path, [GROUP], "batch-0")
        body = c.get("/api/group/predictive", params=GROUP).json()
        times, draws = _summed(fleet_out, [GROUP])
        _check_band(body, times, draws, 0.9)
        assert json.loads(c.get("/api/keys").text)["num_groups"] == 1
