"""``raybayes serve``: an HTTP API and a results page over a fleet's output folder.

:class:`FleetResults` queries a ``fit_many`` output folder through DuckDB
(read-only, consistent while the job still writes); :func:`create_app` wraps it
in a FastAPI application (JSON endpoints, an OpenAPI schema and a results page);
:func:`serve` runs that application with uvicorn, on the loopback interface by
default.
"""

from raybayes.serve.app import create_app, serve
from raybayes.serve.results import FleetResults, UnknownGroupError

__all__ = ["FleetResults", "UnknownGroupError", "create_app", "serve"]
