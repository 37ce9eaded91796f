"""The pricing job: price elasticities of a user's own sales table.

``raybayes fit-elasticity DATA`` reads a sales table (a CSV file or a partitioned
Parquet folder), validates it before any compute, fits
:func:`raybayes.models.elasticity_model` with NUTS, the Laplace approximation or
SVI, and writes the InferenceData, the product and category elasticity tables and a
plot of the category elasticities, each atomically. It then says which method it
used and why its intervals can be trusted: the convergence diagnostics for NUTS,
the calibration measured in BENCHMARKS.md for the approximations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from raybayes.errors import ConfigurationError, DataValidationError

__all__ = [
    "CALIBRATION",
    "METHODS",
    "PricingResult",
    "read_sales_table",
    "run_fit_elasticity",
]

#: Methods the job can fit with.
METHODS = ("nuts", "laplace", "nested-laplace", "svi")

#: Calibration measured in BENCHMARKS.md ("Calibration: which method to trust for
#: uncertainty"): 3 simulated data sets of 5 categories x 100 products x 52 weeks,
#: coverage of the central 90% intervals of the product elasticities by the truth,
#: and their mean width relative to NUTS's (NUTS covered 0.870 on the same data).
CALIBRATION = {
    "laplace": {"coverage": 0.977, "nominal": 0.90, "width_vs_nuts": 2.03},
    "nested-laplace": {"coverage": 0.870, "nominal": 0.90, "width_vs_nuts": 0.99},
    "svi": {"coverage": 0.837, "nominal": 0.90, "width_vs_nuts": 0.95},
    "nuts": {"coverage": 0.870, "nominal": 0.90, "width_vs_nuts": 1.00},
}

_METHOD_NAMES = {
    "nuts": "NUTS (Hoffman & Gelman 2014), chains spread over workers",
    "laplace": "a Gaussian at the MAP (sharded L-BFGS, arrowhead Hessian)",
    "nested-laplace": (
        "integrated nested Laplace (scales integrated over a design, the "
        "elasticities Gaussian given them; arrowhead Hessian)"
    ),
    "svi": "mean-field SVI (sharded, AutoNormal guide)",
}

_LABELS = {
    "nuts": "NUTS",
    "laplace": "Laplace",
    "nested-laplace": "nested Laplace",
    "svi": "SVI",
}


@dataclass
class PricingResult:
    """What :func:`run_fit_elasticity` produced.

    Attributes:
        idata: ``arviz.InferenceData`` of the posterior draws (constrained space).
        method: ``"nuts"``, ``"laplace"``, ``"nested-laplace"`` or ``"svi"``.
        product_table: one row per product: its key columns, ``category``,
            ``elasticity_mean``, ``elasticity_sd``, ``elasticity_q5``,
            ``elasticity_q95``.
        category_table: one row per category: ``category``, ``mean``, ``sd``,
            ``q5``, ``q95``.
        trust: the lines printed about why the intervals can be trusted.
        files: output name -> path.
        wall_time_s: seconds from reading the table to the last file written.
    """

    idata: object
    method: str
    product_table: pd.DataFrame
    category_table: pd.DataFrame
    trust: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    wall_time_s: float = 0.0


def read_sales_table(path: str | Path) -> pd.DataFrame:
    """Read a sales table: a CSV file, a Parquet file or a partitioned Parquet folder.

    A hive-partitioned folder (``sales/category=3/part-0.parquet``) gives its
    partition keys back as ordinary columns, with their inferred types.

    Args:
        path: ``*.csv`` (or ``*.csv.gz``), ``*.parquet``, or a folder of Parquet files.

    Returns:
        ``pandas.DataFrame``, one row per product x period.

    Raises:
        DataValidationError: the path does not exist, is a folder without Parquet
            files, or cannot be parsed.

    Examples:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> path = os.path.join(d, "t.csv")
        >>> pd.DataFrame({"a": [1, 2]}).to_csv(path, index=False)
        >>> read_sales_table(os.path.join(d, "t.csv")).shape
        (2, 1)
    """
    path = Path(path)
    if not path.exists():
        raise DataValidationError(
            f"the sales table {str(path)!r} does not exist; pass a CSV file or a "
            "partitioned Parquet folder."
        )
    try:
        if path.is_dir():
            if not any(path.rglob("*.parquet")):
                raise DataValidationError(
                    f"the folder {str(path)!r} holds no *.parquet file; pass a CSV "
                    "file "
                    "or a (hive-)partitioned Parquet folder."
                )
            df = pd.read_parquet(path)
        elif path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path)
    except DataValidationError:
        raise
    except Exception as err:  # a parser's error: say which file and why
        raise DataValidationError(
            f"could not read the sales table {str(path)!r}: {err}. Pass a CSV "
            "file with "
            "a header row, or a Parquet file or folder."
        ) from None
    # Partition keys come back as pandas categoricals; give them plain values.
    for col in df.columns:
        if isinstance(df[col].dtype, pd.CategoricalDtype):
            df[col] = df[col].astype(df[col].cat.categories.dtype)
    return df


def _check_options(
    method,
    num_chains,
    num_warmup,
    num_samples,
    num_steps,
    num_draws,
    num_shards,
    num_workers,
    likelihood,
):
    if method not in METHODS:
        raise ConfigurationError(
            f"method={method!r} is not known; use one of {', '.join(METHODS)}."
        )
    if likelihood not in ("negbin", "poisson"):
        raise ConfigurationError(
            f"likelihood={likelihood!r} is not known; use 'negbin' or 'poisson'."
        )
    for name, value, low in (
        ("num_chains", num_chains, 1),
        ("num_warmup", num_warmup, 0),
        ("num_samples", num_samples, 1),
        ("num_steps", num_steps, 1),
        ("num_draws", num_draws, 1),
        ("num_shards", num_shards, 1),
    ):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ConfigurationError(
                f"{name}={value!r} is not allowed; pass an integer >= {low}."
            )
    if num_workers is not None and (
        not isinstance(num_workers, int) or num_workers < 1
    ):
        raise ConfigurationError(
            f"num_workers={num_workers!r} is not allowed; pass a positive integer."
        )
    if (
        method != "nuts"
        and num_workers is not None
        and num_shards is not None
        and num_workers != num_shards
    ):
        raise ConfigurationError(
            f"num_workers={num_workers} and num_shards={num_shards} differ; "
            f"{method} runs "
            "one worker per shard, so pass one of them (or the same number)."
        )


def _fit(
    method,
    model_kwargs,
    *,
    seed,
    num_chains,
    num_warmup,
    num_samples,
    num_steps,
    num_draws,
    num_shards,
    backend,
    num_workers,
    coords,
    progress_bar,
):
    """Run the chosen method; every call into the inference API is here.

    Returns ``(idata, extra)``: ``extra`` holds what the report needs.
    """
    import raybayes
    from raybayes.models import elasticity_model

    if method == "nuts":
        idata = raybayes.sample(
            elasticity_model,
            model_kwargs=model_kwargs,
            num_chains=num_chains,
            num_warmup=num_warmup,
            num_samples=num_samples,
            seed=seed,
            backend=backend,
            num_workers=num_workers,
            coords=coords,
            progress_bar=progress_bar,
        )
        return idata, {}
    if method == "laplace":
        result = raybayes.laplace_approximation(
            elasticity_model,
            model_kwargs=model_kwargs,
            num_shards=num_shards,
            backend=backend,
            num_samples=num_draws,
            seed=seed,
            progress_bar=progress_bar,
        )
        return result.idata, {
            "map_status": result.map.status,
            "num_not_positive_definite": result.num_not_positive_definite,
        }
    if method == "nested-laplace":
        result = raybayes.nested_laplace(
            elasticity_model,
            model_kwargs=model_kwargs,
            num_shards=num_shards,
            backend=backend,
            num_samples=num_draws,
            seed=seed,
            progress_bar=progress_bar,
        )
        return result.idata, {
            "hyperparameters": result.hyperparameters,
            "num_design_points": len(result.weights),
        }
    result = raybayes.fit_svi(
        elasticity_model,
        model_kwargs=model_kwargs,
        num_shards=num_shards,
        backend=backend,
        num_steps=num_steps,
        seed=seed,
        num_samples=num_draws,
        progress_bar=progress_bar,
    )
    return result.idata, {
        "num_steps": result.num_steps,
        "stop_reason": result.stop_reason,
    }


def _draws(idata, name):
    """``(num_draws_total, *shape)`` array of a posterior site, chains pooled."""
    values = np.asarray(idata.posterior[name].values)
    return values.reshape(-1, *values.shape[2:])


def _interval_table(draws):
    q = np.quantile(draws, [0.05, 0.95], axis=0)
    return draws.mean(0), draws.std(0), q[0], q[1]


def _trust_lines(method, idata, extra):
    if method == "nuts":
        from raybayes.results import summary

        diag = summary(
            idata,
            var_names=[
                "beta",
                "beta_category",
                "beta_global",
                "sigma_category",
                "sigma_beta",
            ],
        )
        r_hat = float(np.nanmax(diag["r_hat"].to_numpy()))
        ess_bulk = float(np.nanmin(diag["ess_bulk"].to_numpy()))
        ess_tail = float(np.nanmin(diag["ess_tail"].to_numpy()))
        num_div = int(idata.sample_stats["diverging"].sum())
        ok = r_hat <= 1.01 and ess_bulk >= 400 and ess_tail >= 400 and num_div == 0
        lines = [
            f"Why the intervals can be trusted: max R-hat {r_hat:.3f}, min bulk ESS "
            f"{ess_bulk:.0f}, min tail ESS {ess_tail:.0f}, divergences after warmup "
            f"{num_div} (elasticities and their scales).",
        ]
        if ok:
            lines.append(
                "The chains agree (R-hat <= 1.01), every parameter has >= 400 "
                "effective "
                "draws, and no transition diverged: the 90% intervals are Monte Carlo "
                "accurate for this model."
            )
        else:
            lines.append(
                "Warning: the targets R-hat <= 1.01, ESS >= 400 and 0 divergences are "
                "not all met; run longer (--num-warmup, --num-samples) or with more "
                "chains before trusting the intervals."
            )
        return lines
    cal = CALIBRATION.get(method)
    nuts = CALIBRATION["nuts"]
    if cal is None:
        lines = [
            f"{_LABELS[method]} has not been measured on the calibration benchmark "
            "of BENCHMARKS.md; check it against --method nuts on a subset before "
            "trusting its intervals."
        ]
    else:
        lines = [
            f"How far the intervals can be trusted: on the calibration benchmark of "
            f"BENCHMARKS.md (3 simulated data sets of 100 products x 52 weeks), the "
            f"{cal['nominal']:.0%} intervals of {_LABELS[method]}"
            f" covered the true product elasticities {cal['coverage']:.3f} of the "
            f"time (NUTS {nuts['coverage']:.3f}) and were "
            f"{cal['width_vs_nuts']:.2f}x as wide as NUTS's.",
        ]
    if method == "laplace":
        lines.append(
            "Read: conservative (too wide, over-covering) intervals at that size; use "
            "--method nuts for calibrated intervals."
        )
        if extra.get("map_status") not in (None, "converged"):
            lines.append(
                f"Warning: the MAP optimizer stopped with {extra['map_status']!r}."
            )
        if extra.get("num_not_positive_definite"):
            lines.append(
                f"Warning: {extra['num_not_positive_definite']} local Hessian blocks "
                "were "
                "not positive definite (not at a proper mode)."
            )
    elif method == "nested-laplace":
        lines.append(
            "Read: intervals as calibrated as NUTS's on that benchmark (and an "
            "RMSE of the means 1.00x NUTS's)."
        )
        lines.append(
            f"The scales {', '.join(extra.get('hyperparameters', []))} were "
            f"integrated over {extra.get('num_design_points')} design points, the "
            "elasticities are a mixture of Gaussians given them."
        )
    else:
        lines.append(
            "Read: mean-field SVI intervals are slightly too narrow (they cover a few "
            "points less than nominal); use --method nuts for calibrated intervals."
        )
        lines.append(
            f"SVI stopped after {extra.get('num_steps')} steps "
            f"({extra.get('stop_reason')})."
        )
    return lines


def run_fit_elasticity(
    data: str | Path | pd.DataFrame,
    output_dir: str | Path = "raybayes-pricing",
    *,
    method: str = "nuts",
    product_cols=("store", "brand"),
    category_col: str = "brand",
    time_col: str = "week",
    units_col: str = "units",
    price_col: str = "price",
    likelihood: str = "negbin",
    seed: int = 0,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_steps: int = 10_000,
    num_draws: int = 1000,
    num_shards: int | None = None,
    backend: str = "auto",
    num_workers: int | None = None,
    address: str | None = None,
    progress_bar: bool = True,
    echo=print,
) -> PricingResult:
    """Fit product and category price elasticities of a sales table and write them.

    The model is :func:`raybayes.models.elasticity_model`: ``log E[units] = beta_i
    log(price) + gamma_{c,t} + delta_i`` with product elasticities ``beta_i`` pooled
    towards their category's ``beta_c``. The table is validated before any compute
    (the checks of :func:`raybayes.datasets.validate_elasticity_frame`).

    Methods: ``"nuts"`` (Hoffman & Gelman, JMLR 2014; :func:`raybayes.sample`),
    ``"laplace"`` (Gaussian at the MAP; Tierney & Kadane, JASA 1986;
    :func:`raybayes.laplace_approximation`), ``"nested-laplace"`` (INLA; Rue,
    Martino & Chopin, JRSS B 2009; :func:`raybayes.nested_laplace`), ``"svi"``
    (mean-field ADVI, Kucukelbir et al., JMLR 2017; :func:`raybayes.fit_svi`).

    Args:
        data: a CSV file, a Parquet file, a partitioned Parquet folder, or a
            ``DataFrame``; one row per product x period.
        output_dir: where ``posterior.nc`` (InferenceData),
            ``product_elasticities.csv``, ``category_elasticities.csv`` and
            ``category_elasticities.png`` are written, each atomically.
        method: ``"nuts"``, ``"laplace"``, ``"nested-laplace"`` or ``"svi"``.
        product_cols: columns whose combination identifies a product.
        category_col: column of the category (constant within a product).
        time_col: column of the period (week).
        units_col: column of the units sold (integers >= 0).
        price_col: column of the price (> 0).
        likelihood: ``"negbin"`` or ``"poisson"``.
        seed: root seed (same seed, same result, whatever the number of workers).
        num_chains: NUTS: Markov chains.
        num_warmup: NUTS: warmup iterations per chain.
        num_samples: NUTS: draws kept per chain.
        num_steps: SVI optimizer steps (at most; it stops earlier on convergence).
        num_draws: draws from the Laplace or SVI approximation.
        num_shards: shards of the products for Laplace and SVI (one worker each;
            default ``num_workers`` or 1).
        backend: ``"auto"``, ``"local"`` or ``"ray"``.
        num_workers: Ray workers (NUTS: at most one per chain; Laplace/SVI: one per
            shard).
        address: Ray cluster address (default: ``RAY_ADDRESS`` or an embedded
            instance).
        progress_bar: show progress.
        echo: function used to print the report.

    Returns:
        :class:`PricingResult`.

    Raises:
        DataValidationError: an unreadable table, missing columns, NaN, non-positive
            prices, negative or non-integer units (column, count, one example row
            and the fix), before any compute.
        ConfigurationError: a bad option.
        ClusterConnectionError: the Ray address is unreachable.

    Examples:
        >>> from raybayes.datasets import simulate_elasticity
        >>> df, truth = simulate_elasticity(2, 6, 20, seed=0)
        >>> import tempfile
        >>> r = run_fit_elasticity(df, tempfile.mkdtemp(), method="laplace",  # doctest: +SKIP
        ...     product_cols=["product"], category_col="category", backend="local",
        ...     num_draws=200, progress_bar=False, echo=lambda *a: None)
        >>> r.product_table.shape[0], sorted(r.files)[0]  # doctest: +SKIP
        (6, 'category_elasticities')
    """
    from raybayes.config import resolve_scaling
    from raybayes.datasets import prepare_elasticity_data

    start = time.perf_counter()
    product_cols = (
        [product_cols] if isinstance(product_cols, str) else list(product_cols)
    )
    _check_options(
        method,
        num_chains,
        num_warmup,
        num_samples,
        num_steps,
        num_draws,
        num_shards,
        num_workers,
        likelihood,
    )
    if method != "nuts" and num_shards is None:
        num_shards = num_workers or 1
    df = data if isinstance(data, pd.DataFrame) else read_sales_table(data)
    prepared = prepare_elasticity_data(
        df,
        product_cols=product_cols,
        category_col=category_col,
        time_col=time_col,
        price_col=price_col,
        units_col=units_col,
    )
    echo(
        f"Sales table: {prepared.num_obs:,} rows, {prepared.num_products} products, "
        f"{prepared.num_categories} categories, {prepared.num_times} periods."
    )
    parallel = num_chains if method == "nuts" else num_shards
    scaling, backend_name = resolve_scaling(
        backend, num_workers, address=address, parallel_work=parallel
    )
    if backend_name == "local" and address is not None:
        raise ConfigurationError(
            f"address={address!r} is only used by backend='ray'; drop --address or use "
            "--backend ray."
        )
    echo(f"Method: {method} ({_METHOD_NAMES[method]}), backend: {backend_name}.")

    from raybayes.backends import get_backend

    backend_obj = get_backend(backend_name, scaling)
    try:
        if backend_name == "ray":
            backend_obj.start()
        idata, extra = _fit(
            method,
            prepared.model_kwargs(likelihood=likelihood),
            seed=seed,
            num_chains=num_chains,
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_steps=num_steps,
            num_draws=num_draws,
            num_shards=num_shards,
            backend=backend_obj,
            num_workers=num_workers,
            coords=prepared.coords(),
            progress_bar=progress_bar,
        )
    finally:
        if backend_name == "ray":
            backend_obj.shutdown()

    beta = _draws(idata, "beta")
    beta_category = _draws(idata, "beta_category")
    products = prepared.products.copy()
    products["category"] = np.asarray(prepared.categories)[prepared.category_of_product]
    (
        products["elasticity_mean"],
        products["elasticity_sd"],
        products["elasticity_q5"],
        products["elasticity_q95"],
    ) = _interval_table(beta)
    mean, sd, q5, q95 = _interval_table(beta_category)
    categories = pd.DataFrame(
        {
            "category": np.asarray(prepared.categories),
            "mean": mean,
            "sd": sd,
            "q5": q5,
            "q95": q95,
        }
    )
    trust = _trust_lines(method, idata, extra)

    echo("\nCategory price elasticities (posterior mean, 90% interval):")
    with pd.option_context("display.width", 120, "display.max_rows", 60):
        echo(categories.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    echo("")
    for line in trust:
        echo(line)

    from raybayes.io import atomic_write

    output_dir = Path(output_dir)
    files = {
        "inference_data": output_dir / "posterior.nc",
        "product_elasticities": output_dir / "product_elasticities.csv",
        "category_elasticities": output_dir / "category_elasticities.csv",
        "category_plot": output_dir / "category_elasticities.png",
    }
    idata.attrs["method"] = method
    atomic_write(
        files["inference_data"], lambda p: idata.to_netcdf(str(p), engine="h5netcdf")
    )
    atomic_write(
        files["product_elasticities"], lambda p: products.to_csv(p, index=False)
    )
    atomic_write(
        files["category_elasticities"], lambda p: categories.to_csv(p, index=False)
    )
    atomic_write(
        files["category_plot"],
        lambda p: plot_category_elasticities(categories, p, method=method),
    )
    elapsed = time.perf_counter() - start
    echo("\nWrote:")
    for path in files.values():
        echo(f"  {path}")
    echo(f"Done in {elapsed:.0f} s.")
    return PricingResult(idata, method, products, categories, trust, files, elapsed)


def plot_category_elasticities(table: pd.DataFrame, path, *, method: str = ""):
    """Draw each category's elasticity (mean and 90% interval) as a PNG.

    Args:
        table: columns ``category``, ``mean``, ``q5``, ``q95`` (one row per category).
        path: the PNG file to write.
        method: named in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * n + 1.2)))
    y = np.arange(n)[::-1]
    mean = table["mean"].to_numpy()
    ax.errorbar(
        mean,
        y,
        xerr=[mean - table["q5"].to_numpy(), table["q95"].to_numpy() - mean],
        fmt="o",
        color="C0",
        capsize=3,
    )
    ax.set_yticks(y)
    ax.set_yticklabels([str(c) for c in table["category"]])
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("price elasticity")
    title = "Category price elasticity (posterior mean, 90% interval)"
    ax.set_title(f"{title}\nmethod: {method}" if method else title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
