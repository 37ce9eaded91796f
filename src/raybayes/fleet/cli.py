"""``raybayes fit-many``, ``raybayes aggregate`` and ``raybayes plot-group``.

Exit status of every fleet command: ``0`` success; ``2`` a user error (bad
settings, a missing folder or group), printed as ``error: ...`` without a
traceback (``--debug`` shows it); ``fit-many`` also exits ``1`` when some group
``failed`` and ``3`` when none failed but some are ``invalid`` (bad data).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["register"]

EXIT_USAGE = 2

_DEBUG = typer.Option(False, "--debug", help="Show the traceback of an error.")


def _guard(debug: bool, fn):
    """Run ``fn``; a raybayes error becomes ``error: ...`` and exit status 2."""
    from raybayes.errors import RaybayesError

    try:
        return fn()
    except RaybayesError as err:
        if debug:
            raise
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(code=EXIT_USAGE) from None


def register(app: typer.Typer) -> None:
    """Add the fleet commands to a typer app."""

    @app.command("fit-many")
    def fit_many_cmd(
        data: Path = typer.Argument(..., help="Hive-partitioned Parquet data set."),
        output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
        group_keys: str = typer.Option(
            ..., "--group-keys", help="e.g. region,demographic,network"
        ),
        model: str = typer.Option(
            "poisson_hmm", help="poisson_hmm, negbin_hmm or file.py:function"
        ),
        num_states: int = typer.Option(2, "--num-states", "-K"),
        method: str = typer.Option("nuts", help="nuts, laplace or map"),
        time_column: str = typer.Option("timestamp"),
        value_column: str = typer.Option("count"),
        frequency: str = typer.Option(
            "1h", help="time step; missing steps are missing values"
        ),
        seasonality: int = typer.Option(0, help="hour-of-day/week harmonics (0: none)"),
        batch_size: int = typer.Option(8),
        num_chains: int = typer.Option(4),
        num_warmup: int = typer.Option(
            None, help="default 60 with --mass-matrix laplace, 300 with adapt"
        ),
        num_samples: int = typer.Option(250),
        mass_matrix: str = typer.Option(
            "laplace", help="laplace (inverse Hessian at the MAP, fixed) or adapt"
        ),
        target_ess: float = typer.Option(400.0),
        target_rhat: float = typer.Option(1.01),
        max_extensions: int = typer.Option(3),
        num_predictive_draws: int = typer.Option(100),
        min_points: int = typer.Option(48),
        seed: int = typer.Option(0),
        backend: str = typer.Option("auto", help="auto, ray or local"),
        num_workers: int = typer.Option(None),
        use_gpu: bool = typer.Option(False, "--use-gpu", help="one GPU per worker"),
        address: str = typer.Option(None, help="Ray cluster address"),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="discard an earlier job's outputs in --output"
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        debug: bool = _DEBUG,
    ):
        """Fit one model per group; a rerun resumes (see docs/fleet.md)."""

        def run():
            from raybayes.fleet import fit_many

            return fit_many(
                data,
                group_keys,
                output,
                model=model,
                num_states=num_states,
                method=method,
                time_column=time_column,
                value_column=value_column,
                frequency=frequency,
                seasonality=seasonality,
                batch_size=batch_size,
                num_chains=num_chains,
                num_warmup=num_warmup,
                num_samples=num_samples,
                mass_matrix=mass_matrix,
                target_ess=target_ess,
                target_rhat=target_rhat,
                max_extensions=max_extensions,
                num_predictive_draws=num_predictive_draws,
                min_points=min_points,
                seed=seed,
                backend=backend,
                num_workers=num_workers,
                use_gpu=use_gpu,
                address=address,
                overwrite=overwrite,
                progress_bar=progress,
            )

        res = _guard(debug, run)
        typer.echo(res.summary_line())
        if res.exit_code:
            raise typer.Exit(code=res.exit_code)

    @app.command("aggregate")
    def aggregate_cmd(
        output: Path = typer.Argument(..., help="fit-many output folder."),
        by: str = typer.Option(..., "--by", help="group keys to keep, e.g. network"),
        interval: float = typer.Option(0.9, "--interval"),
        to: Path = typer.Option(
            None, "--to", help="write .parquet or .csv instead of printing"
        ),
        debug: bool = _DEBUG,
    ):
        """Sum predictive draws across groups, draw by draw; print mean and interval."""

        def run():
            from raybayes.errors import ConfigurationError
            from raybayes.fleet import aggregate
            from raybayes.io import atomic_path

            if to is not None and to.suffix not in (".csv", ".parquet"):
                raise ConfigurationError(
                    f"--to {str(to)!r}: name a .csv or .parquet file."
                )
            df = aggregate(output, by, interval)
            if to is None:
                typer.echo(df.to_string(index=False))
                return
            with atomic_path(to) as tmp:
                if to.suffix == ".csv":
                    df.to_csv(tmp, index=False)
                else:
                    df.to_parquet(tmp)
            typer.echo(f"wrote {to}")

        _guard(debug, run)

    @app.command("plot-group")
    def plot_group_cmd(
        output: Path = typer.Argument(..., help="fit-many output folder."),
        key: str = typer.Option(
            ..., "--key", help='JSON, e.g. {"region": "r0", "network": "n1"}'
        ),
        to: Path = typer.Option(Path("group.png"), "--to"),
        hours: int = typer.Option(24 * 14, help="points shown (from the first)"),
        debug: bool = _DEBUG,
    ):
        """Plot one group: observations, predictive band and state probability (PNG)."""

        def run():
            from raybayes.errors import ConfigurationError
            from raybayes.fleet import plot_group

            try:
                parsed = json.loads(key)
            except json.JSONDecodeError as err:
                raise ConfigurationError(
                    f"--key {key!r} is not JSON ({err.msg}); pass e.g. "
                    '\'{"region": "r0", "network": "n1"}\'.'
                ) from None
            if not isinstance(parsed, dict):
                raise ConfigurationError(
                    f"--key {key!r} is not a JSON object; pass e.g. "
                    '\'{"region": "r0", "network": "n1"}\'.'
                )
            plot_group(output, parsed, to, hours=hours)
            typer.echo(f"wrote {to}")

        _guard(debug, run)
