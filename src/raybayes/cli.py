"""The ``raybayes`` command line."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

app = typer.Typer(
    name="raybayes",
    help="Bayesian inference for NumPyro models on one machine or a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help: option names are never cut, and lines wrap at the terminal's
    # width (80 columns at most), whatever the width.
    rich_markup_mode=None,
)


@app.command()
def quickstart(
    output_dir: Path = typer.Option(Path("raybayes-output"), help="Where results go."),
    full: bool = typer.Option(False, "--full", help="Use all 83 stores (the default; overrides --stores)."),
    stores: int = typer.Option(0, help="Use the first N stores (default 0: all 83)."),
    num_chains: int = typer.Option(4, help="Markov chains."),
    num_warmup: int = typer.Option(300, help="Warmup iterations per chain."),
    num_samples: int = typer.Option(300, help="Draws kept per chain."),
    max_tree_depth: int = typer.Option(10, help="NUTS maximum tree depth (at most 2**depth - 1 leapfrog steps per draw)."),
    seed: int = typer.Option(0, help="Root seed."),
    likelihood: str = typer.Option("negbin", help="'negbin' or 'poisson'."),
    low_rank_mass: bool = typer.Option(False, help="Adapt a low-rank plus diagonal mass matrix from the chains' draws and gradients (nutpie's; needs --num-warmup >= 100)."),
    num_workers: int = typer.Option(0, help="Ray workers (0: one per CPU, at most one per chain)."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or an embedded instance)."),
    backend: str = typer.Option("auto", help="'auto' (Ray for several chains on several CPUs, else in-process), 'ray' or 'local'."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Fit brand price elasticities of Dominick's orange juice with chain-parallel NUTS."""
    from raybayes.errors import RaybayesError
    from raybayes.jobs.quickstart import run_quickstart

    try:
        run_quickstart(
            output_dir,
            stores=None if (full or stores <= 0) else stores,
            num_chains=num_chains,
            num_warmup=num_warmup,
            num_samples=num_samples,
            max_tree_depth=max_tree_depth,
            seed=seed,
            likelihood=likelihood,
            low_rank_mass=low_rank_mass,
            backend=backend,
            num_workers=num_workers or None,
            address=address,
            progress_bar=progress,
            echo=typer.echo,
        )
    except RaybayesError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(code=2) from None


class _Method(StrEnum):
    nuts = "nuts"
    laplace = "laplace"
    nested_laplace = "nested-laplace"
    svi = "svi"


@app.command("fit-elasticity")
def fit_elasticity(
    data: Path = typer.Argument(..., help="Sales table: a CSV file or a partitioned Parquet folder."),
    method: _Method = typer.Option(_Method.nuts, help="Inference method."),
    output_dir: Path = typer.Option(Path("raybayes-pricing"), "--output", "-o", help="Folder for the results."),
    product_col: list[str] = typer.Option(["store", "brand"], help="Column(s) that identify a product (repeat the option)."),
    category_col: str = typer.Option("brand", help="Column of the category."),
    time_col: str = typer.Option("week", help="Column of the period (week)."),
    units_col: str = typer.Option("units", help="Column of the units sold (integers >= 0)."),
    price_col: str = typer.Option("price", help="Column of the price (> 0)."),
    likelihood: str = typer.Option("negbin", help="'negbin' or 'poisson'."),
    seed: int = typer.Option(0, help="Root seed."),
    num_chains: int = typer.Option(4, help="NUTS: Markov chains."),
    num_warmup: int = typer.Option(500, help="NUTS: warmup iterations per chain."),
    num_samples: int = typer.Option(500, help="NUTS: draws kept per chain."),
    num_steps: int = typer.Option(10_000, help="SVI: optimizer steps (at most)."),
    num_draws: int = typer.Option(1000, help="Laplace, nested Laplace, SVI: draws from the approximation."),
    num_shards: int = typer.Option(None, help="Laplace, nested Laplace, SVI: shards of the products (one worker each)."),
    num_workers: int = typer.Option(None, help="Ray workers (NUTS: one per chain at most)."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or an embedded instance)."),
    backend: str = typer.Option("auto", help="'auto', 'ray' or 'local'."),
    progress: bool = typer.Option(True, help="Show progress."),
):
    """Fit product and category price elasticities of your own sales table."""
    from raybayes.errors import RaybayesError
    from raybayes.jobs.pricing import run_fit_elasticity

    try:
        run_fit_elasticity(
            data,
            output_dir,
            method=method.value,
            product_cols=product_col,
            category_col=category_col,
            time_col=time_col,
            units_col=units_col,
            price_col=price_col,
            likelihood=likelihood,
            seed=seed,
            num_chains=num_chains,
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_steps=num_steps,
            num_draws=num_draws,
            num_shards=num_shards,
            backend=backend,
            num_workers=num_workers,
            address=address,
            progress_bar=progress,
            echo=typer.echo,
        )
    except RaybayesError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(code=2) from None


def _register_subcommands():
    from raybayes.fleet.cli import register as register_fleet

    register_fleet(app)
    _register_serve(app)


def _register_serve(app: typer.Typer) -> None:
    """Add ``raybayes serve`` (its imports happen when the command runs)."""

    @app.command("serve")
    def serve_cmd(
        output: Path = typer.Argument(  # noqa: B008
            ..., help="fit-many output folder (it may still be being written)."
        ),
        host: str = typer.Option(
            "127.0.0.1",
            help="Interface to bind; any other than loopback exposes every result, "
            "with no authentication.",
        ),
        port: int = typer.Option(8000, help="TCP port."),
        cache_mib: float = typer.Option(
            1024, help="Memory for decoded draws, MiB (0: none)."
        ),
    ):
        """Serve a fit-many output folder: JSON API and results page (loopback)."""
        from raybayes.errors import RaybayesError
        from raybayes.serve import serve

        typer.echo(f"serving {output} on http://{host}:{port}/ (Ctrl-C stops)")
        try:
            serve(output, host=host, port=port, cache_mib=cache_mib)
        except RaybayesError as err:
            typer.secho(f"error: {err}", err=True, fg="red")
            raise typer.Exit(code=2) from None


_register_subcommands()


def main():  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
