"""An unreachable or malformed Ray address fails fast, naming the address and timeout.

This module never starts Ray: RayBackend.start() returns early when Ray is already
initialized in the process, so these checks need a process without Ray running.
"""

from __future__ import annotations

import time

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from raybayes import ClusterConnectionError, ConfigurationError
from raybayes.backends import RayBackend

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def no_ray_running(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.fail("Ray is running in this process; these tests need it stopped")
    yield
    assert not ray.is_initialized()


def tiny_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_refused_address_names_address_and_timeout():
    backend = RayBackend("127.0.0.1:1", connect_timeout_s=2.5)
    start = time.perf_counter()
    with pytest.raises(ClusterConnectionError) as info:
        backend.start()
    assert time.perf_counter() - start < 2.5 + 2
    message = str(info.value)
    assert "'127.0.0.1:1'" in message
    assert "2.5 s" in message
    assert isinstance(info.value, ConnectionError)


def test_sample_with_unreachable_address_fails_before_sampling():
    start = time.perf_counter()
    with pytest.raises(ClusterConnectionError) as info:
        raybayes.sample(
            tiny_model,
            np.array([0.5], dtype=np.float32),
            num_chains=1,
            num_warmup=10,
            num_samples=10,
            address="127.0.0.1:1",
            progress_bar=False,
        )
    assert time.perf_counter() - start < 10
    assert "'127.0.0.1:1'" in str(info.value)
    assert "10 s" in str(info.value)  # the default connect timeout


def test_ray_address_environment_variable_is_used(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ClusterConnectionError, match="'127.0.0.1:1'"):
        RayBackend(connect_timeout_s=1.0).start()


@pytest.mark.parametrize("address", ["localhost", "10.0.0.1:port", "ray://host"])
def test_malformed_address(address):
    with pytest.raises(ConfigurationError) as info:
        RayBackend(address, connect_timeout_s=1.0).start()
    assert repr(address) in str(info.value)
    assert "host:port" in str(info.value)


def test_negative_resources_are_rejected():
    with pytest.raises(ConfigurationError, match="negative"):
        RayBackend(resources_per_worker={"CPU": -1})
