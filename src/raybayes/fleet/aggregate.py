"""Aggregates over groups from stored posterior predictive draws, and group plots.

Aggregates sum the predictive draws across groups draw by draw (draw ``i`` of a
sum is the sum of draw ``i`` of each group; the groups' posteriors are
independent), so the interval of an aggregate carries the groups' uncertainty
rather than adding up their intervals.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from raybayes.errors import ConfigurationError
from raybayes.fleet import store

__all__ = ["aggregate", "plot_group"]


def aggregate(output_dir: str | Path, by: list[str] | str, interval: float = 0.9) -> pd.DataFrame:
    """Sum posterior predictive draws over groups, by the given keys, draw by draw.

    Args:
        output_dir: a ``fit_many`` output folder.
        by: group key columns to keep (e.g. ``["network"]``); the others are summed.
        interval: central interval mass, in (0, 1).

    Returns:
        ``pandas.DataFrame`` with the ``by`` columns, ``timestamp``, ``mean``,
        ``lower``, ``upper`` and ``num_groups``.

    Raises:
        ConfigurationError: bad ``interval`` or an unknown key.
    """
    if isinstance(by, str):
        by = [b.strip() for b in by.split(",") if b.strip()]
    if not 0 < interval < 1:
        raise ConfigurationError(f"interval={interval} must lie in (0, 1), e.g. 0.9.")
    con = store.connect(output_dir)
    cols = [r[0] for r in con.execute("DESCRIBE predictive").fetchall()]
    for b in by:
        if b not in cols:
            raise ConfigurationError(f"--by {b!r} is not a group key; available: {cols}.")
    keys = ", ".join(f'"{b}"' for b in by)
    lo, hi = (1 - interval) / 2, 1 - (1 - interval) / 2
    sql = f"""
        WITH sums AS (
            SELECT {keys}, timestamp, draw, SUM(y_pred) AS total,
                   COUNT(*) AS num_groups
            FROM predictive GROUP BY {keys}, timestamp, draw)
        SELECT {keys}, timestamp, AVG(total) AS mean,
               QUANTILE_CONT(total, {lo}) AS lower, QUANTILE_CONT(total, {hi}) AS upper,
               MAX(num_groups) AS num_groups
        FROM sums GROUP BY {keys}, timestamp ORDER BY {keys}, timestamp"""
    return con.execute(sql).df()


def plot_group(output_dir: str | Path, key: dict, path: str | Path, hours: int = 24 * 14,
               interval: float = 0.9, state: int = -1):
    """Plot one group: observations, posterior predictive band, state probability.

    Args:
        output_dir: a ``fit_many`` output folder.
        key: the group key, e.g. ``{"region": "r0", "demographic": "d0",
            "network": "n1"}``.
        path: PNG file to write.
        hours: length of the window (the first ``hours`` points; two weeks).
        interval: mass of the predictive band.
        state: which state's posterior probability to plot (default the highest).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    sub = store.group_path(key)
    states = pd.read_parquet(out / "states" / sub / "part-0.parquet").iloc[:hours]
    pred = pd.read_parquet(out / "predictive" / sub / "part-0.parquet")
    pred = pred[pred["timestamp"].isin(states["timestamp"])]
    lo, hi = (1 - interval) / 2, 1 - (1 - interval) / 2
    band = pred.groupby("timestamp")["y_pred"].quantile([lo, hi]).unstack()
    pcols = [c for c in states.columns if c.startswith("p_state_")]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.fill_between(band.index, band[lo], band[hi], color="C0", alpha=0.3,
                    step="mid", label=f"{interval:.0%} posterior predictive")
    ax.plot(states["timestamp"], states["y_pred_mean"], color="C0", lw=1, label="predictive mean")
    ax.plot(states["timestamp"], states["y"], "k.", ms=3, label="observed")
    ax.set_ylabel("count")
    ax.set_title(", ".join(f"{k}={v}" for k, v in key.items()))
    ax.legend(loc="upper right", fontsize=8)
    ax2.plot(states["timestamp"], states[pcols[state]], color="C3")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel(f"P(state {pcols[state][-1]})")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
