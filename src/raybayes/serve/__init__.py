"""``raybayes serve``: an HTTP API and a results page over a fleet's output folder.

:class:`FleetResults` queries a ``fit_many`` output folder through DuckDB
(read-only, consistent while the job still writes); :func:`create_app` wraps it
in a FastAPI application (JSON endpoints, an OpenAPI schema and a results page);
:func:`serve` runs that application with uvicorn, on the loopback interface by
default. The web parts need the ``serve`` extra (``pip install
'raybayes[serve]'``); :class:`FleetResults` does not.
"""

from raybayes.serve.results import FleetResults, UnknownGroupError

__all__ = ["FleetResults", "UnknownGroupError", "create_app", "serve"]


def __getattr__(name):
    if name in ("create_app", "serve"):
        try:
            from raybayes.serve import app
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"raybayes serve needs {err.name!r}, which is not installed; install "
                "the serve extra: pip install 'raybayes[serve]'."
            ) from err
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
