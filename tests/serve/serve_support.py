"""Helpers of the serve tests: a live server in a thread, raw draws for references."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raybayes.fleet import store

KEYS = ["region", "demographic", "network"]
FAILED = {"region": "r0", "demographic": "d0", "network": "n0"}
INVALID = {"region": "r1", "demographic": "d1", "network": "n2"}
NUM_STEPS = 24 * 10
NUM_DRAWS = 40


@contextlib.contextmanager
def running_server(output_dir):
    """A real uvicorn server on 127.0.0.1, on a free port, in a thread."""
    import uvicorn

    from raybayes.serve import create_app

    config = uvicorn.Config(
        create_app(output_dir),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def group_draws(output_dir: Path, key: dict) -> tuple[np.ndarray, np.ndarray]:
    """One group's predictive draws from its file: ``(times (T,), y (D, T))``."""
    table = pq.read_table(
        output_dir / "predictive" / store.group_path(key) / "part-0.parquet"
    )
    df = table.to_pandas()
    wide = df.pivot(index="draw", columns="timestamp", values="y_pred").sort_index(
        axis=1
    )
    return wide.columns.to_numpy(), wide.to_numpy(np.float64)


def ok_keys(output_dir: Path, **where) -> list[dict]:
    """Keys of the groups recorded ``ok`` matching ``where`` (values or lists)."""
    keys = []
    for rec in store.read_manifest(output_dir).values():
        key = rec["key"]
        if rec["status"] == "ok" and all(
            key[k] in (v if isinstance(v, list) else [v]) for k, v in where.items()
        ):
            keys.append(key)
    return keys
