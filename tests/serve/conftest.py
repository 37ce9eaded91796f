"""Fixtures of the serve tests: a simulated fleet output folder and a live server."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_support import FAILED, INVALID, NUM_DRAWS, NUM_STEPS, running_server


@pytest.fixture(scope="session")
def fleet_out(tmp_path_factory) -> Path:
    """A fit_many output folder: 2 x 2 x 3 groups (one failed, one invalid),
    240 hours, 40 predictive draws, written from the simulator without fitting."""
    from raybayes.datasets.fleet_results import simulate_fleet_results

    out = tmp_path_factory.mktemp("fleet") / "out"
    simulate_fleet_results(
        out,
        2,
        2,
        3,
        num_steps=NUM_STEPS,
        num_draws=NUM_DRAWS,
        seed=3,
        failed=[FAILED],
        invalid=[INVALID],
        batch_size=4,
    )
    return out


@pytest.fixture(scope="module")
def base_url(fleet_out):
    with running_server(fleet_out) as url:
        yield url
