"""The main job: brand price elasticities of Dominick's orange juice with NUTS on Ray."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raybayes.datasets import load_orange_juice, prepare_elasticity_data
from raybayes.datasets.orange_juice import BRAND_NAMES
from raybayes.io import atomic_write
from raybayes.mcmc import sample
from raybayes.models import elasticity_model
from raybayes.results import summary

__all__ = ["QuickstartResult", "run_quickstart"]


@dataclass
class QuickstartResult:
    """What the quickstart produced."""

    idata: object
    brand_table: pd.DataFrame
    num_divergences: int
    wall_time_s: float
    files: dict[str, Path]


def run_quickstart(
    output_dir: str | Path = "raybayes-output",
    *,
    stores: int | None = None,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    max_tree_depth: int = 10,
    seed: int = 0,
    likelihood: str = "negbin",
    backend: str = "ray",
    num_workers: int | None = None,
    address: str | None = None,
    progress_bar: bool = True,
    echo=print,
) -> QuickstartResult:
    """Fit the hierarchical elasticity model to the orange-juice data and write results.

    Args:
        output_dir: where ``posterior.nc`` (InferenceData), ``product_elasticities.csv``
            and ``brand_elasticities.png`` (forest plot) are written, atomically.
        stores: use only the first ``stores`` stores (``None``: all 83).
        num_chains, num_warmup, num_samples, max_tree_depth, seed: NUTS settings.
        likelihood: ``"negbin"`` or ``"poisson"``.
        backend, num_workers, address: where to run (see :func:`raybayes.sample`).
        progress_bar: show per-chain progress.
        echo: function used to print the report.

    Returns:
        :class:`QuickstartResult`.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    df = load_orange_juice(stores=stores)
    data = prepare_elasticity_data(df)
    echo(
        f"Orange juice: {data.num_obs:,} store-brand-weeks, {data.num_products} products "
        f"(store x brand), {data.num_categories} brands, {data.num_times} weeks."
    )
    brand_labels = [f"{int(b)}: {BRAND_NAMES.get(int(b), b)}" for b in data.categories]
    coords = data.coords()
    coords["categories"] = np.asarray(brand_labels)
    idata = sample(
        elasticity_model,
        model_kwargs=data.model_kwargs(likelihood=likelihood),
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        max_tree_depth=max_tree_depth,
        seed=seed,
        backend=backend,
        num_workers=num_workers,
        address=address,
        coords=coords,
        progress_bar=progress_bar,
    )
    brand = summary(idata, var_names=["beta_category"], hdi_prob=0.9, round_to=4)
    post = idata.posterior["beta_category"]
    q = post.quantile([0.05, 0.95], dim=("chain", "draw")).values
    brand_table = pd.DataFrame(
        {
            "brand": brand_labels,
            "mean": post.mean(("chain", "draw")).values,
            "q5": q[0],
            "q95": q[1],
            "r_hat": brand["r_hat"].to_numpy(),
            "ess_bulk": brand["ess_bulk"].to_numpy(),
            "ess_tail": brand["ess_tail"].to_numpy(),
        }
    )
    glob = summary(idata, var_names=["beta_global", "sigma_category", "sigma_beta"])
    num_div = int(idata.sample_stats["diverging"].sum())

    echo("\nBrand price elasticities (posterior mean, 90% interval):")
    with pd.option_context("display.width", 120, "display.max_rows", 50):
        echo(brand_table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    echo("\nHyperparameters:")
    echo(glob[["mean", "sd", "r_hat", "ess_bulk", "ess_tail"]].to_string())
    echo(f"\nDivergences after warmup: {num_div}")

    beta = idata.posterior["beta"]
    bq = beta.quantile([0.05, 0.95], dim=("chain", "draw")).values
    products = data.products.copy()
    products["brand_name"] = [BRAND_NAMES.get(int(b), b) for b in products["brand"]]
    products["elasticity_mean"] = beta.mean(("chain", "draw")).values
    products["elasticity_sd"] = beta.std(("chain", "draw")).values
    products["elasticity_q5"] = bq[0]
    products["elasticity_q95"] = bq[1]

    files = {
        "inference_data": output_dir / "posterior.nc",
        "product_elasticities": output_dir / "product_elasticities.csv",
        "forest_plot": output_dir / "brand_elasticities.png",
        "brand_elasticities": output_dir / "brand_elasticities.csv",
    }
    atomic_write(files["inference_data"], lambda p: idata.to_netcdf(str(p), engine="h5netcdf"))
    atomic_write(files["product_elasticities"], lambda p: products.to_csv(p, index=False))
    atomic_write(files["brand_elasticities"], lambda p: brand_table.to_csv(p, index=False))
    atomic_write(files["forest_plot"], lambda p: _forest_plot(idata, p))
    elapsed = time.perf_counter() - start
    echo("\nWrote:")
    for path in files.values():
        echo(f"  {path}")
    echo(f"Done in {elapsed:.0f} s.")
    return QuickstartResult(idata, brand_table, num_div, elapsed, files)


def _forest_plot(idata, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        axes = az.plot_forest(
            idata,
            var_names=["beta_category"],
            combined=True,
            hdi_prob=0.9,
            figsize=(7, 5),
        )
    ax = np.ravel(axes)[0]
    ax.set_title("Brand price elasticity (posterior mean, 90% HDI)")
    ax.axvline(0.0, color="grey", lw=0.5)
    fig = ax.get_figure()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
