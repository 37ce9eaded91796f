"""``raybayes fit-many``, ``raybayes aggregate`` and ``raybayes plot-group``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the fleet commands to a typer app."""

    @app.command("fit-many")
    def fit_many_cmd(
        data: Path = typer.Argument(..., help="Hive-partitioned Parquet data set."),
        output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
        group_keys: str = typer.Option(..., "--group-keys", help="e.g. region,demographic,network"),
        model: str = typer.Option("poisson_hmm", help="poisson_hmm, negbin_hmm or file.py:function"),
        num_states: int = typer.Option(2, "--num-states", "-K"),
        method: str = typer.Option("nuts", help="nuts, laplace or map"),
        time_column: str = typer.Option("timestamp"),
        value_column: str = typer.Option("count"),
        seasonality: int = typer.Option(0, help="hour-of-day/week harmonics (0: none)"),
        batch_size: int = typer.Option(8),
        num_chains: int = typer.Option(4),
        num_warmup: int = typer.Option(
            None, help="default 60 with --mass-matrix laplace, 300 with adapt"),
        num_samples: int = typer.Option(250),
        mass_matrix: str = typer.Option(
            "laplace", help="laplace (inverse Hessian at the MAP, fixed) or adapt"),
        target_ess: float = typer.Option(400.0),
        num_predictive_draws: int = typer.Option(100),
        min_points: int = typer.Option(48),
        seed: int = typer.Option(0),
        backend: str = typer.Option("ray", help="ray or local"),
        num_workers: int = typer.Option(None),
        address: str = typer.Option(None, help="Ray cluster address"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ):
        """Fit one model per group; resumable (rerun skips finished groups)."""
        from raybayes.fleet import fit_many

        res = fit_many(
            data, group_keys, output, model=model, num_states=num_states, method=method,
            time_column=time_column, value_column=value_column, seasonality=seasonality,
            batch_size=batch_size, num_chains=num_chains, num_warmup=num_warmup,
            num_samples=num_samples, mass_matrix=mass_matrix, target_ess=target_ess,
            num_predictive_draws=num_predictive_draws, min_points=min_points, seed=seed,
            backend=backend, num_workers=num_workers, address=address, progress_bar=progress,
        )
        typer.echo(
            f"groups {res.num_groups}: ok {res.num_ok}, invalid {res.num_invalid}, "
            f"failed {res.num_failed}, skipped (done before) {res.num_skipped}; "
            f"{res.elapsed_s:.1f} s. Outputs in {res.output_dir}"
        )

    @app.command("aggregate")
    def aggregate_cmd(
        output: Path = typer.Argument(..., help="fit-many output folder."),
        by: str = typer.Option(..., "--by", help="keys to keep, e.g. network"),
        interval: float = typer.Option(0.9, "--interval"),
        to: Path = typer.Option(None, "--to", help="write .parquet or .csv instead of printing"),
    ):
        """Sum predictive draws across groups, draw by draw; print mean and interval."""
        from raybayes.fleet import aggregate

        df = aggregate(output, by, interval)
        if to is None:
            typer.echo(df.to_string(index=False))
        elif to.suffix == ".csv":
            df.to_csv(to, index=False)
        else:
            df.to_parquet(to)

    @app.command("plot-group")
    def plot_group_cmd(
        output: Path = typer.Argument(..., help="fit-many output folder."),
        key: str = typer.Option(..., "--key", help='JSON, e.g. {"region": "r0", "network": "n1"}'),
        to: Path = typer.Option(Path("group.png"), "--to"),
        hours: int = typer.Option(24 * 14),
    ):
        """Plot one group: observations, predictive band and state probability (PNG)."""
        from raybayes.fleet import plot_group

        plot_group(output, json.loads(key), to, hours=hours)
        typer.echo(f"wrote {to}")
