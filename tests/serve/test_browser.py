"""The results page in a real browser (headless Chromium driven by Selenium).

Skipped where Chromium or its driver is missing; on Debian/Ubuntu install them with
``apt-get install -y chromium chromium-driver``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from serve_support import group_draws, ok_keys

from raybayes.fleet import store

INSTALL_HINT = (
    "the browser test needs headless Chromium and its driver: on Debian/Ubuntu run "
    "`apt-get install -y chromium chromium-driver` (and `pip install selenium`)"
)
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
GROUP = {"region": "r0", "demographic": "d1", "network": "n1"}
START, END = "2024-01-02T00:00", "2024-01-05T00:00"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason=INSTALL_HINT)
    if not (BROWSER and DRIVER):
        pytest.skip(INSTALL_HINT)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1300,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _show(driver, selection: dict, interval: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    for key in ("region", "demographic", "network"):
        Select(driver.find_element(By.ID, f"key-{key}")).select_by_visible_text(
            selection.get(key, "(all)")
        )
    for name, value in (("start", START), ("end", END)):
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    Select(driver.find_element(By.ID, "interval")).select_by_visible_text(interval)
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, "show").click()
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: old.id != d.find_element(By.TAG_NAME, "html").id)
    wait.until(
        lambda d: d.execute_script(
            "const g = document.getElementById('chart');"
            "return g !== null && g.data !== undefined && "
            "g.querySelectorAll('.scatterlayer .trace').length === 5;"
        )
    )


def _traces(driver) -> dict:
    data = driver.execute_script(
        "return document.getElementById('chart').data.map("
        "t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}));"
    )
    return {t["name"]: t for t in data}


def _table(driver) -> list[dict]:
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.ID, "diagnostics")
    head = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    return [
        dict(
            zip(
                head,
                [td.text for td in tr.find_elements(By.TAG_NAME, "td")],
                strict=True,
            )
        )
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]


def _reference(out, keys):
    frames = [group_draws(out, k) for k in keys]
    times = frames[0][0]
    draws = sum(y for _, y in frames)
    keep = (times >= np.datetime64(START)) & (times < np.datetime64(END))
    return times[keep], draws[:, keep]


def _check_chart(traces, times, draws, interval):
    lo = (1 - interval) / 2
    band = next(name for name in traces if "posterior predictive interval" in name)
    assert band.startswith(f"{interval:.0%}")
    assert (
        pd.to_datetime(traces["predictive mean"]["x"]).to_numpy().tolist()
        == times.tolist()
    )
    np.testing.assert_allclose(traces["predictive mean"]["y"], draws.mean(0), rtol=1e-9)
    np.testing.assert_allclose(
        traces["lower"]["y"], np.quantile(draws, lo, 0), rtol=1e-9
    )
    np.testing.assert_allclose(
        traces[band]["y"], np.quantile(draws, 1 - lo, 0), rtol=1e-9
    )


def test_page_shows_a_group_then_an_aggregate(browser, base_url, fleet_out):
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/")
    assert browser.find_element(By.ID, "title").text.startswith("Sum of 10 groups")

    # one group: observations, band, mean state; its diagnostics row
    _show(browser, GROUP, "0.8")
    assert browser.find_element(By.ID, "title").text == (
        "Group region=r0, demographic=d1, network=n1"
    )
    traces = _traces(browser)
    times, draws = _reference(fleet_out, [GROUP])
    assert len(times) == 72
    _check_chart(traces, times, draws, 0.8)
    states = pq.read_table(
        fleet_out / "states" / store.group_path(GROUP) / "part-0.parquet"
    ).to_pandas()
    states = states.set_index("timestamp").loc[times]
    np.testing.assert_allclose(traces["observed"]["y"], states["y"])
    np.testing.assert_allclose(
        traces["posterior mean state"]["y"], states["p_state_1"], rtol=1e-6
    )
    rows = _table(browser)
    rec = store.read_manifest(fleet_out)[store.group_id(GROUP)]
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert rows[0]["max_r_hat"] == f"{rec['max_r_hat']:.3f}"
    assert rows[0]["min_ess_bulk"] == f"{rec['min_ess_bulk']:.0f}"
    assert rows[0]["num_divergences"] == "0"

    # an aggregate over a key: the region's groups summed draw by draw; failures first
    _show(browser, {"region": "r0"}, "0.9")
    assert browser.find_element(By.ID, "title").text.startswith("Sum of 5 groups")
    times, draws = _reference(fleet_out, ok_keys(fleet_out, region="r0"))
    _check_chart(_traces(browser), times, draws, 0.9)
    rows = _table(browser)
    assert len(rows) == 6
    assert rows[0]["status"] == "failed" and "simulated failure" in rows[0]["error"]
    assert [r["status"] for r in rows[1:]] == ["ok"] * 5
    r_hat = [float(r["max_r_hat"]) for r in rows[1:]]
    assert r_hat == sorted(r_hat, reverse=True)
