"""``raybayes fit-elasticity``: a user's sales table, end to end through the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raybayes.cli import app
from raybayes.datasets import simulate_elasticity

# 12 products in 3 categories x 52 weeks, Poisson sales of about exp(3) = 20 units a
# week. With the simulator's price moves (sd of log price about 0.13 within a
# product) each product's own data give its elasticity to a standard error of about
# 0.22 / (0.13 * sqrt(52)) = 0.23; pooling over the category only narrows that.
NUM_CATEGORIES, NUM_PRODUCTS, NUM_WEEKS = 3, 12, 52
NUM_ROWS = NUM_PRODUCTS * NUM_WEEKS
OPTIONS = [
    "--product-col",
    "product",
    "--category-col",
    "category",
    "--likelihood",
    "poisson",
    "--backend",
    "local",
    "--no-progress",
]


def _simulate():
    return simulate_elasticity(
        NUM_CATEGORIES,
        NUM_PRODUCTS,
        NUM_WEEKS,
        seed=3,
        mean_log_units=3.0,
        likelihood="poisson",
    )


def _invoke(*args):
    return CliRunner().invoke(app, ["fit-elasticity", *map(str, args)])


@pytest.fixture(scope="module")
def sales():
    return _simulate()


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory, sales):
    path = tmp_path_factory.mktemp("data") / "sales.csv"
    sales[0].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def laplace_run(tmp_path_factory, csv_path):
    out = tmp_path_factory.mktemp("laplace")
    result = _invoke(
        csv_path, "--method", "laplace", "-o", out, "--num-draws", 400, *OPTIONS
    )
    return result, out


def test_laplace_writes_readable_outputs_near_the_truth(laplace_run, sales):
    result, out = laplace_run
    assert result.exit_code == 0, result.output
    # It says which method it used and quotes the measured calibration.
    assert "Method: laplace" in result.output
    assert "0.977" in result.output and "2.03x" in result.output
    names = {
        "posterior.nc",
        "product_elasticities.csv",
        "category_elasticities.csv",
        "category_elasticities.png",
    }
    assert {p.name for p in out.iterdir()} == names  # no temporary file left behind
    assert (out / "category_elasticities.png").read_bytes()[:4] == b"\x89PNG"
    import arviz as az

    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["beta"].shape == (1, 400, NUM_PRODUCTS)
    products = pd.read_csv(out / "product_elasticities.csv")
    categories = pd.read_csv(out / "category_elasticities.csv")
    assert list(products["product"]) == list(range(NUM_PRODUCTS))
    assert list(categories["category"]) == list(range(NUM_CATEGORIES))
    truth = sales[1]["beta"]
    mean, sd = (
        products["elasticity_mean"].to_numpy(),
        products["elasticity_sd"].to_numpy(),
    )
    # Tolerances from the standard error of 0.23 above: RMSE within 1.5 of them,
    # every product within 3 (0.7), and the means follow the truth's spread (sd 0.6).
    err = mean - truth
    assert np.sqrt(np.mean(err**2)) < 0.35, (mean, truth)
    assert np.abs(err).max() < 0.7, (mean, truth)
    assert np.corrcoef(mean, truth)[0, 1] > 0.8
    assert np.all(sd > 0)
    # Laplace intervals are wide (BENCHMARKS.md): all 90% intervals hold the truth.
    assert np.all(
        (products["elasticity_q5"] < truth) & (truth < products["elasticity_q95"])
    )


def test_partitioned_parquet_gives_the_csv_result(tmp_path, sales, laplace_run):
    folder = tmp_path / "sales"
    sales[0].to_parquet(folder, partition_cols=["category"])
    out = tmp_path / "out"
    result = _invoke(
        folder, "--method", "laplace", "-o", out, "--num-draws", 400, *OPTIONS
    )
    assert result.exit_code == 0, result.output
    got = pd.read_csv(out / "product_elasticities.csv")
    want = pd.read_csv(laplace_run[1] / "product_elasticities.csv")
    assert list(got["category"]) == list(want["category"])
    np.testing.assert_allclose(
        got["elasticity_mean"], want["elasticity_mean"], atol=2e-3
    )
    np.testing.assert_allclose(got["elasticity_sd"], want["elasticity_sd"], rtol=2e-2)


def _bad(tmp_path, df):
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    out = tmp_path / "out"
    result = _invoke(path, "--method", "laplace", "-o", out, *OPTIONS)
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and "Traceback" not in result.output
    assert not out.exists()  # nothing written, nothing computed
    return result.output


def test_missing_column_is_named(tmp_path, sales):
    msg = _bad(tmp_path, sales[0].drop(columns=["price"]))
    assert "missing column(s) ['price']" in msg and "price_col" in msg


def test_nan_units_are_counted_with_an_example(tmp_path, sales):
    df = sales[0].copy()
    df.loc[[5, 9], "units"] = np.nan
    msg = _bad(tmp_path, df)
    assert (
        f"column 'units': 2 of {NUM_ROWS} rows are NaN" in msg
        and "first at row 5" in msg
    )


def test_non_positive_price_is_refused(tmp_path, sales):
    df = sales[0].copy()
    df.loc[7, "price"] = 0.0
    df.loc[8, "price"] = -1.5
    msg = _bad(tmp_path, df)
    assert f"column 'price': 2 of {NUM_ROWS} rows are zero or negative" in msg
    assert "Prices must be > 0" in msg


def test_negative_units_are_refused(tmp_path, sales):
    df = sales[0].copy()
    df.loc[11, "units"] = -3
    msg = _bad(tmp_path, df)
    assert (
        f"column 'units': 1 of {NUM_ROWS} rows are negative" in msg and "row 11" in msg
    )


def test_missing_product_id_is_refused(tmp_path, sales):
    df = sales[0].astype({"product": float})
    df.loc[4, "product"] = np.nan
    msg = _bad(tmp_path, df)
    assert f"column 'product': 1 of {NUM_ROWS} rows are missing" in msg


def test_unreadable_or_absent_table_is_a_clear_error(tmp_path):
    result = _invoke(tmp_path / "nope.csv", *OPTIONS)
    assert result.exit_code == 2 and "does not exist" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _invoke(empty, *OPTIONS)
    assert result.exit_code == 2 and "no *.parquet file" in result.output


def test_bad_options_fail_before_reading(tmp_path, csv_path):
    result = _invoke(csv_path, "--method", "laplace", "--num-shards", 0, *OPTIONS)
    assert result.exit_code == 2 and "num_shards=0" in result.output
    result = _invoke(csv_path, "--method", "gibbs", *OPTIONS)
    assert result.exit_code == 2 and "gibbs" in result.output


@pytest.mark.slow
def test_nested_laplace_from_the_command_line(tmp_path, csv_path, sales):
    out = tmp_path / "out"
    result = _invoke(
        csv_path, "--method", "nested-laplace", "-o", out, "--num-draws", 400, *OPTIONS
    )
    assert result.exit_code == 0, result.output
    assert "Method: nested-laplace" in result.output
    assert "design points" in result.output
    products = pd.read_csv(out / "product_elasticities.csv")
    err = products["elasticity_mean"].to_numpy() - sales[1]["beta"]
    # the standard error of 0.23 above: RMSE within 1.5 of them
    assert np.sqrt(np.mean(err**2)) < 0.35


@pytest.mark.slow
def test_nuts_reports_its_diagnostics(tmp_path, csv_path, sales):
    out = tmp_path / "out"
    result = _invoke(
        csv_path,
        "--method",
        "nuts",
        "-o",
        out,
        "--num-chains",
        2,
        "--num-warmup",
        200,
        "--num-samples",
        200,
        *OPTIONS,
    )
    assert result.exit_code == 0, result.output
    assert "max R-hat" in result.output and "divergences after warmup" in result.output
    products = pd.read_csv(out / "product_elasticities.csv")
    err = products["elasticity_mean"].to_numpy() - sales[1]["beta"]
    assert np.sqrt(np.mean(err**2)) < 0.35 and np.abs(err).max() < 0.7


def test_unreachable_ray_address_is_a_clear_error(tmp_path, csv_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "fit-elasticity",
            str(csv_path),
            "--method",
            "laplace",
            "-o",
            str(out),
            "--product-col",
            "product",
            "--category-col",
            "category",
            "--no-progress",
            "--address",
            "127.0.0.1:1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "127.0.0.1:1" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_svi_quotes_its_calibration_and_fits_near_the_truth(tmp_path, csv_path, sales):
    out = tmp_path / "out"
    result = _invoke(
        csv_path,
        "--method",
        "svi",
        "-o",
        out,
        "--num-steps",
        1500,
        "--num-draws",
        400,
        *OPTIONS,
    )
    assert result.exit_code == 0, result.output
    assert "0.837" in result.output and "0.95x" in result.output
    products = pd.read_csv(out / "product_elasticities.csv")
    err = products["elasticity_mean"].to_numpy() - sales[1]["beta"]
    assert np.sqrt(np.mean(err**2)) < 0.35 and np.abs(err).max() < 0.7


def test_category_plot_keeps_its_title_and_labels_inside(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plot_checks import assert_texts_inside
    from raybayes.jobs.pricing import plot_category_elasticities

    mean = np.linspace(-3.0, -0.5, 12)
    table = pd.DataFrame({
        "category": [f"refrigerated juices, brand group {i}" for i in range(12)],
        "mean": mean, "q5": mean - 0.4, "q95": mean + 0.4,
    })
    seen = {}
    real_close = plt.close
    plt.close = lambda fig=None: seen.setdefault("fig", fig)  # keep the figure
    try:
        plot_category_elasticities(table, tmp_path / "c.png", method="laplace")
    finally:
        plt.close = real_close
    fig = seen["fig"]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == list(table["category"])[::-1] or sorted(labels) == sorted(
        table["category"]
    )
    assert "laplace" in fig.axes[0].get_title()
    assert_texts_inside(fig)
    real_close(fig)
