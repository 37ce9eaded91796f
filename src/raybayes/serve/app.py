"""The FastAPI application of ``raybayes serve``: JSON endpoints and the results page.

Every route is a read-only ``GET``. Group-key filters are ordinary query
parameters named after the keys (``?region=r0&network=n1&network=n2``: one value
or several per key); any other parameter name that is not one of the endpoint's
own gets a 400 that lists the allowed names. Errors are JSON ``{"detail": ...}``
with status 400 (bad input) or 404 (no such group).
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime
from pathlib import Path

import pandas as pd
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from raybayes.errors import ConfigurationError
from raybayes.serve.results import FleetResults, UnknownGroupError, parse_time

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_FILTER_HELP = (
    " Select groups with query parameters named after the group keys (see "
    "`/api/keys`), e.g. `?region=r0&network=n1&network=n2`: one or several values "
    "per key; groups must match every key given."
)
_WINDOW_HELP = (
    "ISO 8601 time, e.g. 2024-01-01 or 2024-01-01T06:00; the window is [start, end)."
)


# ---------------------------------------------------------------------- schemas
class KeysResponse(BaseModel):
    """The group keys and their values."""

    keys: list[str] = Field(description="Group key names, in the groups' order.")
    values: dict[str, list[str]] = Field(description="Each key's values (sorted).")
    num_groups: int = Field(description="Groups recorded in the manifest.")
    statuses: dict[str, int] = Field(description="Number of groups per status.")


class GroupRecord(BaseModel):
    """One group's manifest record (diagnostics such as ``max_r_hat``,
    ``min_ess_bulk``, ``num_divergences`` come as further fields)."""

    model_config = ConfigDict(extra="allow")
    group_id: str
    key: dict[str, str]
    status: str
    error: str | None = None


class GroupsResponse(BaseModel):
    keys: list[str]
    num_groups: int
    groups: list[GroupRecord] = Field(description="Failures first.")


class SummaryResponse(BaseModel):
    key: dict[str, str]
    group_id: str
    status: str
    record: dict = Field(
        description="The manifest record: R-hat, ESS, divergences, ..."
    )
    parameters: list[dict] = Field(
        description="Posterior summary, one row per scalar parameter: mean, sd, q05, "
        "q95, mcse_mean, ess_bulk, ess_tail, r_hat."
    )


class PredictiveResponse(BaseModel):
    """One group's predictive band, columns by timestamp."""

    key: dict[str, str]
    interval: float
    timestamp: list[datetime]
    mean: list[float]
    lower: list[float]
    upper: list[float]
    num_draws: list[int]
    y: list[float | None] = Field(description="Observed counts (null: missing).")
    y_pred_mean: list[float | None]
    mean_state: list[float | None] = Field(
        description="Posterior mean state index, sum_k k P(z_t = k | y)."
    )


class AggregateSeries(BaseModel):
    key: dict[str, str] = Field(description="The values of the `by` keys.")
    timestamp: list[datetime]
    mean: list[float]
    lower: list[float]
    upper: list[float]
    num_groups: list[int] = Field(description="Groups summed at each time.")
    num_draws: list[int]


class AggregateResponse(BaseModel):
    by: list[str]
    where: dict[str, list[str]]
    interval: float
    start: datetime | None
    end: datetime | None
    num_groups: int = Field(description="Groups with draws in the selection.")
    series: list[AggregateSeries]


class FailuresResponse(BaseModel):
    num_failed: int
    num_invalid: int
    groups: list[GroupRecord]


# ---------------------------------------------------------------------- helpers
def _values(series: pd.Series) -> list:
    return [
        None if (isinstance(v, float) and not math.isfinite(v)) else v
        for v in series.tolist()
    ]


def _times(series: pd.Series) -> list[datetime]:
    return [pd.Timestamp(t).to_pydatetime() for t in series]


def _records(rows: list[dict], keys: list[str]) -> list[dict]:
    return [
        dict(
            {k: v for k, v in row.items() if k not in keys},
            key={k: row[k] for k in keys if k in row},
        )
        for row in rows
    ]


def _where(request: Request, results: FleetResults, own: tuple[str, ...]) -> dict:
    """The group-key filters among the query parameters (others: 400)."""
    keys = results.keys
    where: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name in own:
            continue
        if name not in keys:
            allowed = ", ".join(keys) or "(none recorded yet)"
            raise ConfigurationError(
                f"unknown query parameter {name!r}: not a group key ({allowed})"
                + (f" nor one of: {', '.join(own)}." if own else ".")
            )
        where.setdefault(name, []).append(value)
    return where


def _split(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path"))
        got = e.get("input")
        parts.append(
            f"{loc}: {e.get('msg')}" + (f" (got {got!r})" if got is not None else "")
        )
    return "; ".join(parts) or str(err)


# ---------------------------------------------------------------------- the app
def create_app(
    output_dir: str | os.PathLike,
    threads: int | None = None,
    memory_limit: str | None = None,
    cache_mib: float = 1024,
) -> FastAPI:
    """The FastAPI application serving one ``fit_many`` output folder (read-only).

    Routes (all ``GET``): ``/`` (the results page), ``/api/keys``,
    ``/api/groups``, ``/api/group/summary``, ``/api/group/predictive``,
    ``/api/aggregate``, ``/api/failures``, ``/openapi.json``.

    Args:
        output_dir: the ``fit_many`` output folder.
        threads: DuckDB threads per query (default: one per core).
        memory_limit: DuckDB memory limit, e.g. ``"2GB"``.
        cache_mib: memory for decoded predictive draws, MiB (0: none); see
            :class:`FleetResults`.

    Returns:
        ``fastapi.FastAPI``; its ``state.results`` is the :class:`FleetResults`.

    Raises:
        ConfigurationError: ``output_dir`` is not a folder.

    Examples:
        >>> import tempfile
        >>> app = create_app(tempfile.mkdtemp())
        >>> sorted(r.path for r in app.routes if r.path.startswith("/api"))
        ... # doctest: +NORMALIZE_WHITESPACE
        ['/api/aggregate', '/api/failures', '/api/group/predictive',
         '/api/group/summary', '/api/groups', '/api/keys']
    """
    from raybayes import __version__
    from raybayes.serve.page import plotly_js_path, render_page

    results = FleetResults(
        output_dir, threads=threads, memory_limit=memory_limit, cache_mib=cache_mib
    )
    app = FastAPI(
        title="raybayes fleet results",
        version=__version__,
        description=(
            "Read-only access to the results of `raybayes fit-many`: groups, "
            "posterior summaries, predictive bands and draw-by-draw aggregates."
            + _FILTER_HELP
        ),
        docs_url=None,  # the interactive docs load their scripts from a CDN
        redoc_url=None,
    )
    app.state.results = results

    @app.exception_handler(UnknownGroupError)
    async def _not_found(request: Request, err: UnknownGroupError):
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(ConfigurationError)
    async def _bad_request(request: Request, err: ConfigurationError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, err: RequestValidationError):
        return JSONResponse({"detail": _validation_message(err)}, status_code=400)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/api/keys", response_model=KeysResponse, tags=["groups"])
    def keys():
        """The group keys, their values, and the number of groups per status."""
        rows = results.group_records()
        statuses: dict[str, int] = {}
        for row in rows:
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        return KeysResponse(
            keys=results.keys,
            values=results.key_values(),
            num_groups=len(rows),
            statuses=statuses,
        )

    @app.get(
        "/api/groups",
        response_model=GroupsResponse,
        tags=["groups"],
        description="The recorded groups and their diagnostics, failures first."
        + _FILTER_HELP,
    )
    def groups(
        request: Request,
        status: list[str] = Query(  # noqa: B008
            default=[],
            description="Keep these statuses only (ok, failed, invalid, ...).",
        ),
    ):
        where = _where(request, results, ("status",))
        rows = results.group_records(where)
        if status:
            keep = set(_split(status))
            rows = [r for r in rows if r["status"] in keep]
        return GroupsResponse(
            keys=results.keys, num_groups=len(rows), groups=_records(rows, results.keys)
        )

    @app.get("/api/failures", response_model=FailuresResponse, tags=["groups"])
    def failures():
        """The groups the manifest records as ``failed`` or ``invalid``, with errors."""
        rows = results.failures()
        return FailuresResponse(
            num_failed=sum(r["status"] == "failed" for r in rows),
            num_invalid=sum(r["status"] == "invalid" for r in rows),
            groups=_records(rows, results.keys),
        )

    @app.get(
        "/api/group/summary",
        response_model=SummaryResponse,
        tags=["group"],
        description="One group's posterior summary and diagnostics. Name the "
        "group by one value of every key, e.g. "
        "`?region=r0&demographic=d0&network=n1`.",
        responses={404: {"description": "No such group."}},
    )
    def group_summary(request: Request):
        return results.summary(_where(request, results, ()))

    @app.get(
        "/api/group/predictive",
        response_model=PredictiveResponse,
        tags=["group"],
        description="One group's posterior predictive band (mean and exact "
        "central interval of its draws), observations and posterior mean state "
        "over a time window. Name the group by one value of every key.",
        responses={404: {"description": "No such group, or no draws."}},
    )
    def group_predictive(
        request: Request,
        start: str | None = Query(None, description=_WINDOW_HELP),
        end: str | None = Query(None, description=_WINDOW_HELP),
        interval: float = Query(0.9, description="Central interval mass, in (0, 1)."),
    ):
        key = _where(request, results, ("start", "end", "interval"))
        df = results.predictive_band(key, start, end, interval)
        return PredictiveResponse(
            key={k: v[0] for k, v in key.items()},
            interval=interval,
            timestamp=_times(df["timestamp"]),
            mean=_values(df["mean"]),
            lower=_values(df["lower"]),
            upper=_values(df["upper"]),
            num_draws=_values(df["num_draws"]),
            y=_values(df["y"]),
            y_pred_mean=_values(df["y_pred_mean"]),
            mean_state=_values(df["mean_state"]),
        )

    @app.get(
        "/api/aggregate",
        response_model=AggregateResponse,
        tags=["aggregate"],
        description="Sum the selected groups' posterior predictive draws draw by "
        "draw (draw i of the sum is the sum of the groups' draws i), per "
        "combination of the `by` keys, over a time window; return the mean and "
        "the exact central interval of the summed draws." + _FILTER_HELP,
    )
    def aggregate(
        request: Request,
        by: list[str] = Query(  # noqa: B008
            default=[],
            description="Keys to keep (repeat or "
            "comma-separate); the others are summed over.",
        ),
        start: str | None = Query(None, description=_WINDOW_HELP),
        end: str | None = Query(None, description=_WINDOW_HELP),
        interval: float = Query(0.9, description="Central interval mass, in (0, 1)."),
    ):
        where = _where(request, results, ("by", "start", "end", "interval"))
        by = list(dict.fromkeys(_split(by)))
        df = results.aggregate(by, where, start, end, interval)
        series = []
        for combo, part in df.groupby(by, sort=True) if by else [((), df)]:
            combo = combo if isinstance(combo, tuple) else (combo,)
            series.append(
                AggregateSeries(
                    key=dict(zip(by, map(str, combo), strict=True)),
                    timestamp=_times(part["timestamp"]),
                    mean=_values(part["mean"]),
                    lower=_values(part["lower"]),
                    upper=_values(part["upper"]),
                    num_groups=_values(part["num_groups"]),
                    num_draws=_values(part["num_draws"]),
                )
            )
        return AggregateResponse(
            by=by,
            where=where,
            interval=interval,
            start=parse_time(start, "start"),
            end=parse_time(end, "end"),
            num_groups=df.attrs["num_groups"],
            series=series,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request):
        html, status = render_page(results, request.query_params.multi_items())
        return HTMLResponse(html, status_code=status)

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js():
        return FileResponse(
            plotly_js_path(),
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    return app


def serve(
    output_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    memory_limit: str | None = None,
    cache_mib: float = 1024,
    log_level: str = "info",
) -> None:
    """Serve a ``fit_many`` output folder over HTTP (blocks until stopped).

    Args:
        output_dir: the ``fit_many`` output folder (it may still be being written).
        host: interface to bind; the loopback interface by default. Any other
            value exposes every group's results, unauthenticated and unencrypted,
            to whoever can reach the port.
        port: TCP port.
        threads: DuckDB threads per query.
        memory_limit: DuckDB memory limit, e.g. ``"2GB"``.
        cache_mib: memory for decoded predictive draws, MiB (0: none).
        log_level: uvicorn's log level.

    Raises:
        ConfigurationError: ``output_dir`` is not a folder.
    """
    import uvicorn

    if not Path(output_dir).is_dir():
        raise ConfigurationError(
            f"output_dir={str(output_dir)!r} is not a folder; pass the folder that "
            "`raybayes fit-many ... -o OUT` writes."
        )
    app = create_app(
        output_dir, threads=threads, memory_limit=memory_limit, cache_mib=cache_mib
    )
    if host not in LOOPBACK_HOSTS:
        log.warning(
            "serving %s on %s:%d: anyone who can reach this address can read every "
            "group's results; there is no authentication and no TLS.",
            output_dir,
            host,
            port,
        )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
