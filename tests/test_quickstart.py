"""The main job end to end, on a small slice of the orange-juice data."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raybayes.cli import app


def test_quickstart_cli_writes_all_outputs(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["quickstart", "--output-dir", str(out), "--stores", "2", "--num-chains", "2",
         "--num-warmup", "40", "--num-samples", "40", "--max-tree-depth", "6",
         "--num-workers", "2", "--low-rank-mass",
         "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    # 40 warmup iterations are too few for the low-rank mass matrix: the run falls
    # back to the diagonal one and says so.
    assert "using the diagonal one" in result.output
    assert "Brand price elasticities" in result.output
    assert "Divergences after warmup" in result.output
    for name in ("posterior.nc", "product_elasticities.csv", "brand_elasticities.png",
                 "brand_elasticities.csv", "product_elasticities.png"):
        assert (out / name).stat().st_size > 0
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    products = pd.read_csv(out / "product_elasticities.csv")
    assert len(products) == 2 * 11
    assert np.isfinite(products["elasticity_mean"]).all()
    assert (products["elasticity_q5"] < products["elasticity_q95"]).all()
    import arviz as az

    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["beta_category"].shape == (2, 40, 11)
    assert {"posterior", "sample_stats", "observed_data"} <= set(idata.groups())
    brands = pd.read_csv(out / "brand_elasticities.csv")
    # Orange juice demand falls with price: most brand elasticities are negative.
    assert (brands["mean"] < 0).mean() >= 0.8


def test_quickstart_bad_address_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app,
        ["quickstart", "--output-dir", str(tmp_path / "o"), "--stores", "1",
         "--address", "127.0.0.1:1", "--no-progress"],
    )
    assert result.exit_code == 2
    assert "127.0.0.1:1" in result.output
    assert not (tmp_path / "o" / "posterior.nc").exists()


def test_plots_keep_titles_and_labels_inside_and_name_brands():
    import matplotlib

    matplotlib.use("Agg")
    from raybayes.datasets.orange_juice import BRAND_NAMES
    from raybayes.jobs.quickstart import _forest_plot, _product_plot

    names = [BRAND_NAMES[b] for b in range(1, 12)]
    rng = np.random.default_rng(0)
    mean = -2.5 + 0.5 * rng.standard_normal(11)
    table = pd.DataFrame({"mean": mean, "q5": mean - 0.3, "q95": mean + 0.3})
    category = np.repeat(np.arange(11), 5)
    product_means = mean[category] + 0.4 * rng.standard_normal(55)
    products = pd.DataFrame({"elasticity_mean": product_means})
    figures = (
        _forest_plot(table, names),
        _product_plot(table, names, products, category),
    )
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        ax = fig.axes[0]
        texts = [ax.title, ax.xaxis.label, *ax.get_yticklabels()]
        for text in texts:
            ext = text.get_window_extent(renderer)
            assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, text.get_text()
            assert box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, text.get_text()
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert sorted(labels) == sorted(names)
        assert not any("beta_category" in t for t in labels)
        matplotlib.pyplot.close(fig)


@pytest.mark.slow
def test_quickstart_low_rank_starts_from_the_information_diagonal(tmp_path):
    # --low-rank-mass passes ElasticityData.initial_inverse_mass as the first
    # phase's diagonal (and the moment start) through to the low-rank kernel.
    from raybayes.jobs.quickstart import run_quickstart

    result = run_quickstart(tmp_path / "o", stores=1, num_chains=2, num_warmup=100,
                            num_samples=20, low_rank_mass=True, backend="local",
                            progress_bar=False, echo=lambda *a: None)
    assert result.idata.attrs["low_rank_mass"] == 16
    beta = result.idata.posterior["beta"].values
    assert np.all(np.isfinite(beta)) and beta.std() > 0
