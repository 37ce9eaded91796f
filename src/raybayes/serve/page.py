"""The results page of ``raybayes serve``: one HTML form, one Plotly figure, one table.

The page is rendered on the server for each request (a plain HTML form that
reloads the page): pick groups by their keys (one value of every key shows that
group; leaving keys at "all" sums the matching groups draw by draw), a time
window and an interval. The figure (observations, posterior predictive band and
mean, posterior mean state) is built with Plotly's Python API and drawn by
Plotly's JavaScript bundle, served from the ``plotly`` package (no CDN). The
diagnostics table (R-hat, ESS, divergences, status) lists failures first.
"""

from __future__ import annotations

from datetime import timedelta
from importlib import resources
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from raybayes.errors import ConfigurationError
from raybayes.serve.results import FleetResults, parse_interval, parse_time

__all__ = ["render_page", "plotly_js_path", "build_figure", "DEFAULT_WINDOW"]

#: Window shown when the request names no end: two weeks from its start.
DEFAULT_WINDOW = timedelta(days=14)
MAX_TABLE_ROWS = 500
_INTERVALS = ("0.5", "0.8", "0.9", "0.95", "0.99")
_DIAGNOSTICS = (
    "status",
    "max_r_hat",
    "min_ess_bulk",
    "min_ess_tail",
    "num_divergences",
    "num_draws",
    "num_restarts",
    "error",
)

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("raybayes.serve", "templates"), autoescape=True
)


def plotly_js_path() -> Path:
    """The Plotly JavaScript bundle shipped in the ``plotly`` Python package."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def build_figure(band: pd.DataFrame, observed: pd.DataFrame, interval: float):
    """The two-panel figure: counts with the predictive band, and the mean state.

    Args:
        band: ``timestamp``, ``mean``, ``lower``, ``upper`` (from
            :meth:`FleetResults.aggregate`).
        observed: ``timestamp``, ``y``, ``mean_state`` (from
            :meth:`FleetResults.observed`).
        interval: mass of the band, for the legend.

    Returns:
        ``plotly.graph_objects.Figure`` (traces: interval lower, interval upper,
        predictive mean, observed, posterior mean state).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    def col(df, name):
        return [None if pd.isna(v) else float(v) for v in df[name]]

    t = [ts.isoformat() for ts in pd.to_datetime(band["timestamp"])]
    to = [ts.isoformat() for ts in pd.to_datetime(observed["timestamp"])]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.75, 0.25],
        vertical_spacing=0.05,
    )
    label = f"{interval:.0%} posterior predictive interval"
    fig.add_trace(
        go.Scatter(
            x=t,
            y=col(band, "lower"),
            name="lower",
            mode="lines",
            line={"width": 0, "shape": "hv"},
            showlegend=False,
            legendgroup="band",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=t,
            y=col(band, "upper"),
            name=label,
            mode="lines",
            line={"width": 0, "shape": "hv"},
            fill="tonexty",
            fillcolor="rgba(31, 119, 180, 0.3)",
            legendgroup="band",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=t,
            y=col(band, "mean"),
            name="predictive mean",
            mode="lines",
            line={"color": "rgb(31, 119, 180)", "width": 1},
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=to,
            y=col(observed, "y"),
            name="observed",
            mode="markers",
            marker={"color": "black", "size": 3},
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=to,
            y=col(observed, "mean_state"),
            name="posterior mean state",
            mode="lines",
            line={"color": "rgb(214, 39, 40)"},
        ),
        row=2,
        col=1,
    )
    fig.update_yaxes(title_text="count", row=1, col=1)
    fig.update_yaxes(title_text="mean state", row=2, col=1)
    fig.update_xaxes(title_text="time", row=2, col=1)
    fig.update_layout(
        height=560, margin={"t": 40, "b": 60}, legend={"orientation": "h", "y": 1.08}
    )
    return fig


def _table(df: pd.DataFrame, keys: list[str]) -> str:
    cols = keys + [c for c in _DIAGNOSTICS if c in df.columns]
    df = df[cols].head(MAX_TABLE_ROWS).copy()
    formats = {
        "max_r_hat": "{:.3f}",
        "min_ess_bulk": "{:.0f}",
        "min_ess_tail": "{:.0f}",
        "num_divergences": "{:.0f}",
        "num_draws": "{:.0f}",
        "num_restarts": "{:.0f}",
    }
    for name, fmt in formats.items():
        if name in df:
            df[name] = [("" if pd.isna(v) else fmt.format(float(v))) for v in df[name]]
    df = df.fillna("").astype(str)
    template = _TEMPLATES.get_template("table.html")
    return template.render(cols=cols, rows=df.to_dict("records"))


def render_page(results: FleetResults, params) -> tuple[str, int]:
    """Render the results page for the query parameters ``params``.

    Args:
        results: the output folder's :class:`FleetResults`.
        params: ``(name, value)`` pairs: one per group key (empty: all values),
            ``start``, ``end`` (ISO 8601; default the first two weeks) and
            ``interval``.

    Returns:
        ``(html, status)``: status 400 when the input was bad (the page then
        shows the message and the diagnostics table alone).
    """
    keys = results.keys
    values = results.key_values()
    given = {}
    for name, value in params:
        given.setdefault(name, value)
    selected = {k: given[k] for k in keys if given.get(k)}
    error, chart, title = None, "", ""
    status = 200
    interval_text = given.get("interval") or "0.9"
    start_text, end_text = given.get("start") or "", given.get("end") or ""
    try:
        unknown = [
            n for n in given if n not in keys and n not in ("start", "end", "interval")
        ]
        if unknown:
            raise ConfigurationError(
                f"unknown parameter {unknown[0]!r}: use the group keys "
                f"({', '.join(keys)}), "
                "start, end or interval."
            )
        interval = parse_interval(interval_text)
        start, end = parse_time(start_text, "start"), parse_time(end_text, "end")
        if not keys:
            raise ConfigurationError(
                "no groups are recorded yet; reload when fit-many "
                "has finished its first batch."
            )
        if start is None:
            start = results.time_range(selected)[0]
        if end is None:
            end = start + DEFAULT_WINDOW
        start_text, end_text = start.isoformat(), end.isoformat()
        band = results.aggregate((), selected, start, end, interval)
        observed = results.observed(selected, start, end)
        n = band.attrs["num_groups"]
        named = ", ".join(f"{k}={v}" for k, v in selected.items())
        if n == 1 and len(selected) == len(keys):
            title = f"Group {named}"
        else:
            title = f"Sum of {n} groups ({named or 'all groups'}), draw by draw"
        fig = build_figure(band, observed, interval)
        chart = fig.to_html(full_html=False, include_plotlyjs=False, div_id="chart")
    except ConfigurationError as err:
        error, status = str(err), 400
    try:
        table_df = results.groups(
            {k: v for k, v in selected.items() if v in values.get(k, [])}
        )
    except ConfigurationError:
        table_df = results.groups()
    counts = results.groups()["status"].value_counts()
    shown = min(len(table_df), MAX_TABLE_ROWS)
    html = _TEMPLATES.get_template("page.html").render(
        keys=[(k, values[k]) for k in keys],
        selected=selected,
        start=start_text,
        end=end_text,
        interval=interval_text,
        intervals=_INTERVALS,
        error=error,
        title=title,
        chart=Markup(chart),
        table=Markup(_table(table_df, keys)),
        table_note=(
            f"{shown} of {len(table_df)} groups in the selection, failures first."
        ),
        num_groups=int(counts.sum()),
        statuses=", ".join(f"{k} {v}" for k, v in counts.items()) or "none",
    )
    return html, status
