"""Aggregates over groups from stored posterior predictive draws, and group plots.

Aggregates sum the predictive draws across groups draw by draw (draw ``i`` of a
sum is the sum of draw ``i`` of each group; the groups' posteriors are
independent), so the interval of an aggregate carries the groups' uncertainty
rather than adding up their intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from raybayes import io
from raybayes.errors import ConfigurationError
from raybayes.fleet import store

__all__ = ["aggregate", "plot_group", "find_group"]


def _open_output(output_dir: str | Path) -> tuple[Path, list[str], dict]:
    """The folder, its group key names and its manifest records.

    Raises:
        ConfigurationError: the folder does not exist or holds no fit-many run.
    """
    out = Path(output_dir)
    run = store.read_run_config(out) if out.is_dir() else None
    records = store.read_manifest(out) if out.is_dir() else {}
    if run is None and not records:
        raise ConfigurationError(
            f"{str(output_dir)!r} holds no fit-many output (no run.json or manifest/); "
            "pass the --output folder of a fit-many run."
        )
    if run is not None:
        keys = list(run["settings"]["group_keys"])
    else:
        keys = list(
            dict.fromkeys(k for r in records.values() for k in r.get("key", {}))
        )
    return out, keys, records


def _status_counts(records: dict) -> str:
    counts = {}
    for r in records.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none recorded"


def aggregate(
    output_dir: str | Path, by: list[str] | str, interval: float = 0.9
) -> pd.DataFrame:
    """Sum posterior predictive draws over groups, by the given keys, draw by draw.

    Args:
        output_dir: a ``fit_many`` output folder.
        by: group key columns to keep, in any order (e.g. ``["network"]`` or
            ``"network,region"``); the other keys are summed over.
        interval: central interval mass, in (0, 1).

    Returns:
        ``pandas.DataFrame`` with the ``by`` columns, ``timestamp``, ``mean``,
        ``lower``, ``upper`` and ``num_groups``.

    Raises:
        ConfigurationError: a bad ``interval``; an empty ``by`` or a name that is
            not a group key (e.g. ``"draw"``); a folder that is missing, holds no
            fit-many run, or has no predictive draws (all groups failed).

    Examples:
        >>> aggregate("out/", "network")  # doctest: +SKIP
    """
    if isinstance(by, str):
        by = [b.strip() for b in by.split(",") if b.strip()]
    by = list(by)
    if not isinstance(interval, (int, float)) or not 0 < interval < 1:
        raise ConfigurationError(f"interval={interval} must lie in (0, 1), e.g. 0.9.")
    out, keys, records = _open_output(output_dir)
    if not by:
        raise ConfigurationError(
            f"--by is empty; name one or more group keys, e.g. {keys[0]!r} "
            f"(group keys: {keys})."
        )
    for b in by:
        if b not in keys:
            raise ConfigurationError(
                f"--by {b!r} is not a group key; group keys: {keys}."
            )
    if len(set(by)) != len(by):
        raise ConfigurationError(f"--by {by} names a key twice.")
    if not any((out / "predictive").glob("**/*.parquet")):
        raise ConfigurationError(
            f"{str(output_dir)!r} has no posterior predictive draws to aggregate "
            f"(groups: {_status_counts(records)}); see manifest.parquet for the errors."
        )
    con = store.connect(out)
    # Names are checked against the group keys above; values are bound parameters.
    cols = ", ".join('"' + b.replace('"', '""') + '"' for b in by)
    lo, hi = (1 - interval) / 2, 1 - (1 - interval) / 2
    sql = f"""
        WITH sums AS (
            SELECT {cols}, timestamp, draw, SUM(y_pred) AS total,
                   COUNT(*) AS num_groups
            FROM predictive GROUP BY {cols}, timestamp, draw)
        SELECT {cols}, timestamp, AVG(total) AS mean,
               QUANTILE_CONT(total, $lo) AS lower, QUANTILE_CONT(total, $hi) AS upper,
               MAX(num_groups) AS num_groups
        FROM sums GROUP BY {cols}, timestamp ORDER BY {cols}, timestamp"""
    return con.execute(sql, {"lo": lo, "hi": hi}).df()


def find_group(output_dir: str | Path, key: dict) -> dict:
    """The manifest record of the group ``key`` (its keys in any order).

    Raises:
        ConfigurationError: the folder holds no fit-many run, the key names are not
            the group keys, or no group has these values.
    """
    out, keys, records = _open_output(output_dir)
    if sorted(key) != sorted(keys):
        raise ConfigurationError(
            f"key {json.dumps(key)} names {sorted(key)}; the group keys of "
            f"{str(output_dir)!r} are {keys} (give a value for each, in any order)."
        )
    want = {k: str(v) for k, v in key.items()}
    for rec in records.values():
        if {k: str(v) for k, v in rec["key"].items()} == want:
            return rec
    example = next(iter(records.values()))["key"] if records else None
    raise ConfigurationError(
        f"no group {json.dumps(want)} in {str(output_dir)!r} ({len(records)} groups "
        f"recorded{', e.g. ' + json.dumps(example) if example else ''})."
    )


def plot_group(
    output_dir: str | Path,
    key: dict,
    path: str | Path,
    hours: int = 24 * 14,
    interval: float = 0.9,
    state: int = -1,
):
    """Plot one group: observations, posterior predictive band, state probability.

    The PNG is written atomically. User models (no hidden states known to
    raybayes) get the first panel only.

    Args:
        output_dir: a ``fit_many`` output folder.
        key: the group key, its entries in any order, e.g. ``{"region": "r0",
            "demographic": "d0", "network": "n1"}``.
        path: PNG file to write.
        hours: length of the window (the first ``hours`` points; two weeks), >= 1.
        interval: mass of the predictive band, in (0, 1).
        state: which state's posterior probability to plot (default the highest).

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ConfigurationError: ``hours < 1``, a bad ``interval``, an unknown group, a
            group that is not ``ok`` (names its error), or one without stored
            predictive draws.

    Examples:
        >>> key = {"network": "n1", "region": "r0"}
        >>> plot_group("out/", key, "g.png")  # doctest: +SKIP
    """
    if isinstance(hours, bool) or not isinstance(hours, int) or hours < 1:
        raise ConfigurationError(
            f"hours={hours!r} must be a positive number of points."
        )
    if not 0 < interval < 1:
        raise ConfigurationError(f"interval={interval} must lie in (0, 1), e.g. 0.9.")
    rec = find_group(output_dir, key)
    if rec["status"] != "ok":
        raise ConfigurationError(
            f"group {json.dumps(rec['key'])} was not fitted: it is {rec['status']} "
            f"({rec.get('error')})."
        )
    out = Path(output_dir)
    sub = store.group_path(rec["key"])
    states_file = out / "states" / sub / "part-0.parquet"
    if not states_file.exists():
        why = rec.get("predictive_error") or "num_predictive_draws=0"
        raise ConfigurationError(
            f"group {json.dumps(rec['key'])} has no stored predictive draws to plot "
            f"({why})."
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = pd.read_parquet(states_file).iloc[:hours]
    pred = pd.read_parquet(out / "predictive" / sub / "part-0.parquet")
    pred = pred[pred["timestamp"].isin(states["timestamp"])]
    lo, hi = (1 - interval) / 2, 1 - (1 - interval) / 2
    band = pred.groupby("timestamp")["y_pred"].quantile([lo, hi]).unstack()
    pcols = [c for c in states.columns if c.startswith("p_state_")]
    if pcols:
        fig, (ax, ax2) = plt.subplots(
            2, 1, figsize=(11, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
        fig, ax = plt.subplots(1, 1, figsize=(11, 4))
    ax.fill_between(
        band.index,
        band[lo],
        band[hi],
        color="C0",
        alpha=0.3,
        step="mid",
        label=f"{interval:.0%} posterior predictive",
    )
    ax.plot(
        states["timestamp"],
        states["y_pred_mean"],
        color="C0",
        lw=1,
        label="predictive mean",
    )
    ax.plot(states["timestamp"], states["y"], "k.", ms=3, label="observed")
    ax.set_ylabel("count per period")
    group = ", ".join(f"{k}={v}" for k, v in rec["key"].items())
    ax.set_title(
        f"Observed counts and {interval:.0%} posterior predictive band\n"
        f"group {group}",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)
    bottom = ax
    if pcols:
        ax2.plot(states["timestamp"], states[pcols[state]], color="C3")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel(f"P(state {pcols[state][-1]} | data)", fontsize=9)
        bottom = ax2
    bottom.set_xlabel("time")
    fig.autofmt_xdate()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return fig
