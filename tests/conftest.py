"""Shared fixtures: the test data folder and one Ray instance per test module."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# JAX's persistent compilation cache, shared by the test process, its Ray workers
# and its subprocesses (they inherit the environment): many tests compile the same
# samplers for the same models. Set before JAX is imported anywhere.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="raybayes-jax-cache-")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of vendored test data (``tests/data``)."""
    return DATA_DIR


@pytest.fixture(scope="module")
def ray_backend(request):
    """An embedded 2-CPU Ray instance, started once per test module.

    Pass it as ``backend=`` to :func:`raybayes.sample` so that it is reused; the
    sampler does not shut down a backend it did not create. It is shut down at the
    end of the module, and no Ray process outlives it.

    Test modules are not importable on Ray workers, so the requesting module's
    functions (its models) are sent to the workers by value.
    """
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    from raybayes.backends import RayBackend

    if ray.is_initialized():
        pytest.fail("a Ray instance is already running; each module must stop its own")
    cloudpickle.register_pickle_by_value(request.module)
    backend = RayBackend(num_cpus=2).start()
    try:
        yield backend
    finally:
        backend.shutdown()
        cloudpickle.unregister_pickle_by_value(request.module)
    assert not ray.is_initialized()
