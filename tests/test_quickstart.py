"""The main job end to end, on a small slice of the orange-juice data."""

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from raybayes.cli import app


def test_quickstart_cli_writes_all_outputs(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["quickstart", "--output-dir", str(out), "--stores", "2", "--num-chains", "2",
         "--num-warmup", "40", "--num-samples", "40", "--max-tree-depth", "6",
         "--num-workers", "2",
         "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "Brand price elasticities" in result.output
    assert "Divergences after warmup" in result.output
    for name in ("posterior.nc", "product_elasticities.csv", "brand_elasticities.png",
                 "brand_elasticities.csv"):
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
