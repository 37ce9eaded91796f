"""The main job: brand price elasticities of Dominick's orange juice with NUTS on Ray."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raybayes.datasets import load_orange_juice, prepare_elasticity_data
from raybayes.datasets.orange_juice import BRAND_NAMES
from raybayes.io import atomic_path, atomic_write
from raybayes.mcmc import init_near_value, sample
from raybayes.mcmc.sampler import MIN_LOW_RANK_WARMUP
from raybayes.models import elasticity_model
from raybayes.results import summary

__all__ = ["QuickstartResult", "run_quickstart", "HYPERPARAMETERS"]

#: The model's hyperparameters, reported with their R-hat and ESS.
HYPERPARAMETERS = (
    "beta_global",
    "sigma_category",
    "sigma_beta",
    "sigma_delta",
    "sigma_gamma",
    "mu_delta",
    "concentration",
)


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
    centered: bool | str | dict = "auto",
    low_rank_mass: bool = False,
    backend: str = "ray",
    num_workers: int | None = None,
    address: str | None = None,
    progress_bar: bool = True,
    echo=print,
) -> QuickstartResult:
    """Fit the hierarchical elasticity model to the orange-juice data and write results.

    Chains start near the data's moment estimates, jittered
    (:meth:`raybayes.datasets.ElasticityData.initial_values`,
    :func:`raybayes.mcmc.init_near_value`), not at random points of ``(-2, 2)``
    (the intercepts sit near ``log(units)``, about 8); with ``low_rank_mass`` the
    first warmup phase starts from the diagonal of
    :meth:`raybayes.datasets.ElasticityData.initial_inverse_mass`.

    Args:
        output_dir: where ``posterior.nc`` (InferenceData),
            ``product_elasticities.csv``, ``brand_elasticities.csv``,
            ``brand_elasticities.png`` (forest plot) and
            ``product_elasticities.png`` (every product's elasticity against its
            brand's posterior) are written, atomically.
        stores: use only the first ``stores`` stores (``None``: all 83).
        num_chains, num_warmup, num_samples, max_tree_depth, seed: NUTS settings.
        likelihood: ``"negbin"`` or ``"poisson"``.
        centered: the model's parameterization (see
            :func:`raybayes.models.elasticity_model`); ``"auto"`` (default) centres
            each block as far as the data informs it
            (:meth:`raybayes.datasets.ElasticityData.centering`), which keeps NUTS
            trajectories short on data-rich products.
        low_rank_mass: adapt a low-rank plus diagonal mass matrix from the chains'
            draws and gradients (see :func:`raybayes.sample`); off by default
            until it beats the diagonal on this model (BENCHMARKS.md). With fewer
            than 100 warmup iterations the run falls back to the diagonal mass
            matrix and says so.
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
    if low_rank_mass and num_warmup < MIN_LOW_RANK_WARMUP:
        echo(
            f"Note: the low-rank mass matrix needs at least {MIN_LOW_RANK_WARMUP} "
            f"warmup iterations (got {num_warmup}); using the diagonal one for this "
            "run."
        )
        low_rank_mass = False
    start_values = data.initial_values(likelihood=likelihood, centered=centered)
    kernel_kwargs = {"init_strategy": init_near_value(values=start_values)}
    if low_rank_mass:
        # The first warmup phase starts from the information's variances, not
        # from 1 / |gradient| at the start (off by up to 500x on this model).
        kernel_kwargs["inverse_mass_matrix"] = data.initial_inverse_mass(
            likelihood=likelihood, centered=centered
        )
    idata = sample(
        elasticity_model,
        model_kwargs=data.model_kwargs(likelihood=likelihood, centered=centered),
        kernel_kwargs=kernel_kwargs,
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        max_tree_depth=max_tree_depth,
        low_rank_mass=low_rank_mass,
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
    glob = summary(idata, var_names=list(HYPERPARAMETERS))
    num_div = int(idata.sample_stats["diverging"].sum())
    product_summary = summary(idata, var_names=["beta"])
    steps = idata.sample_stats["n_steps"].values

    echo("\nBrand price elasticities (posterior mean, 90% interval):")
    with pd.option_context("display.width", 120, "display.max_rows", 50):
        echo(brand_table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    echo("\nHyperparameters:")
    echo(glob[["mean", "sd", "r_hat", "ess_bulk", "ess_tail"]].to_string())
    echo(f"\nDivergences after warmup: {num_div}")
    echo(
        f"Leapfrog steps per draw: {steps.mean():.1f} (mean), {int(steps.max())} (max)."
    )
    worst = product_summary
    echo(
        f"Product elasticities ({len(worst)}): max R-hat {worst['r_hat'].max():.3f}, "
        f"min bulk ESS {worst['ess_bulk'].min():.0f}, "
        f"min tail ESS {worst['ess_tail'].min():.0f}."
    )

    beta = idata.posterior["beta"]
    bq = beta.quantile([0.05, 0.95], dim=("chain", "draw")).values
    products = data.products.copy()
    products["brand_name"] = [BRAND_NAMES.get(int(b), b) for b in products["brand"]]
    products["elasticity_mean"] = beta.mean(("chain", "draw")).values
    products["elasticity_sd"] = beta.std(("chain", "draw")).values
    products["elasticity_q5"] = bq[0]
    products["elasticity_q95"] = bq[1]
    products["r_hat"] = product_summary["r_hat"].to_numpy()
    products["ess_bulk"] = product_summary["ess_bulk"].to_numpy()
    products["ess_tail"] = product_summary["ess_tail"].to_numpy()

    files = {
        "inference_data": output_dir / "posterior.nc",
        "product_elasticities": output_dir / "product_elasticities.csv",
        "forest_plot": output_dir / "brand_elasticities.png",
        "brand_elasticities": output_dir / "brand_elasticities.csv",
        "product_plot": output_dir / "product_elasticities.png",
    }
    atomic_write(
        files["inference_data"], lambda p: idata.to_netcdf(str(p), engine="h5netcdf")
    )
    atomic_write(
        files["product_elasticities"], lambda p: products.to_csv(p, index=False)
    )
    atomic_write(
        files["brand_elasticities"], lambda p: brand_table.to_csv(p, index=False)
    )
    brand_names = [BRAND_NAMES.get(int(b), str(b)) for b in data.categories]
    _save_figure(_forest_plot(brand_table, brand_names), files["forest_plot"])
    _save_figure(
        _product_plot(brand_table, brand_names, products, data.category_of_product),
        files["product_plot"],
    )
    elapsed = time.perf_counter() - start
    echo("\nWrote:")
    for path in files.values():
        echo(f"  {path}")
    echo(f"Done in {elapsed:.0f} s.")
    return QuickstartResult(idata, brand_table, num_div, elapsed, files)


def _save_figure(fig, path):
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _forest_plot(brand_table, brand_names):
    """Brand elasticities: posterior mean and 90% interval, one row per brand."""
    plt = _pyplot()
    n = len(brand_names)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * n + 1.4), layout="constrained")
    y = np.arange(n)[::-1]
    ax.hlines(y, brand_table["q5"], brand_table["q95"], color="C0", lw=2.5)
    ax.plot(brand_table["mean"], y, "o", color="C0", ms=6)
    ax.set_yticks(y, brand_names)
    ax.axvline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("Price elasticity (% change in units per 1% price change)")
    ax.set_title("Brand price elasticity: posterior mean and 90% interval")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _product_plot(brand_table, brand_names, products, category_of_product):
    """Every product's posterior mean elasticity next to its brand's 90% interval."""
    plt = _pyplot()
    n = len(brand_names)
    fig, ax = plt.subplots(figsize=(8.5, 0.5 * n + 1.6), layout="constrained")
    rng = np.random.default_rng(0)
    y = np.arange(n)[::-1]
    for c in range(n):
        ax.axhspan(y[c] - 0.32, y[c] + 0.32, xmin=0, xmax=1, color="0.96", zorder=0)
        ax.fill_betweenx(
            [y[c] - 0.3, y[c] + 0.3],
            brand_table["q5"][c],
            brand_table["q95"][c],
            color="C1",
            alpha=0.35,
            lw=0,
            zorder=1,
            label="brand, 90% interval" if c == 0 else None,
        )
        ax.vlines(
            brand_table["mean"][c], y[c] - 0.3, y[c] + 0.3, color="C1", lw=2, zorder=2
        )
        mine = np.flatnonzero(np.asarray(category_of_product) == c)
        jitter = rng.uniform(-0.22, 0.22, len(mine))
        ax.plot(
            products["elasticity_mean"].to_numpy()[mine],
            y[c] + jitter,
            ".",
            color="C0",
            ms=3,
            alpha=0.7,
            zorder=3,
            label="product (store), posterior mean" if c == 0 else None,
        )
    ax.set_yticks(y, brand_names)
    ax.axvline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("Price elasticity (% change in units per 1% price change)")
    ax.set_title("Product price elasticities by brand, against the brand posterior")
    fig.legend(loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig
