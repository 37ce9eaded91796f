"""An unreachable or malformed Ray address fails fast, naming the address and timeout.

This module never starts Ray: RayBackend.start() returns early when Ray is already
initialized in the process, so these checks need a process without Ray running.
Instead of wall-clock bounds (which a loaded machine breaks), the tests check the
behaviour that makes the failure fast: the one reachability probe gets the
configured timeout, and ``ray.init`` (which would wait for a cluster) is never
called.
"""

from __future__ import annotations

import socket

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


@pytest.fixture
def probes(monkeypatch):
    """Record every TCP connection attempt (address, timeout), every socket wait
    (``settimeout``, in seconds) and every ray.init."""
    seen = {"connect": [], "ray_init": 0, "waits": []}
    real_connect = socket.create_connection
    real_settimeout = socket.socket.settimeout

    def settimeout(self, value):
        seen["waits"].append(value)
        return real_settimeout(self, value)

    def create_connection(address, timeout=None, *args, **kwargs):
        seen["connect"].append((tuple(address), timeout))
        return real_connect(address, timeout, *args, **kwargs)

    def ray_init(*args, **kwargs):
        seen["ray_init"] += 1
        raise AssertionError("ray.init must not run for an unreachable address")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "settimeout", settimeout)
    monkeypatch.setattr(ray, "init", ray_init)
    return seen


def tiny_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_refused_address_names_address_and_timeout(probes):
    backend = RayBackend("127.0.0.1:1", connect_timeout_s=2.5)
    with pytest.raises(ClusterConnectionError) as info:
        backend.start()
    # One probe, bounded by the configured timeout; Ray itself never started.
    assert probes["connect"] == [(("127.0.0.1", 1), 2.5)]
    assert probes["ray_init"] == 0
    message = str(info.value)
    assert "'127.0.0.1:1'" in message
    assert "2.5 s" in message
    assert isinstance(info.value, ConnectionError)


def test_sample_with_unreachable_address_fails_before_sampling(probes):
    with pytest.raises(ClusterConnectionError) as info:
        raybayes.sample(
            tiny_model,
            np.array([0.5], dtype=np.float32),
            num_chains=1,
            num_warmup=10,
            num_samples=10,
            address="127.0.0.1:1",  # backend="auto" with an address: Ray
            progress_bar=False,
        )
    assert probes["connect"] == [(("127.0.0.1", 1), 10.0)]  # the default timeout
    # No ray.init, so no worker existed and no chain ran.
    assert probes["ray_init"] == 0
    assert "'127.0.0.1:1'" in str(info.value)
    assert "10 s" in str(info.value)


def test_ray_address_environment_variable_is_used(monkeypatch, probes):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ClusterConnectionError, match="'127.0.0.1:1'"):
        RayBackend(connect_timeout_s=1.0).start()
    assert probes["connect"] == [(("127.0.0.1", 1), 1.0)]
    assert probes["ray_init"] == 0


@pytest.mark.parametrize("address", ["localhost", "10.0.0.1:port", "ray://host"])
def test_malformed_address(address, probes):
    with pytest.raises(ConfigurationError) as info:
        RayBackend(address, connect_timeout_s=1.0).start()
    assert repr(address) in str(info.value)
    assert "host:port" in str(info.value)
    assert probes["connect"] == [] and probes["ray_init"] == 0


def test_negative_resources_are_rejected():
    with pytest.raises(ConfigurationError, match="negative"):
        RayBackend(resources_per_worker={"CPU": -1})


class _Listener:
    """A TCP server on 127.0.0.1 that is not Ray: it accepts, then stays silent
    (``reply=None``) or answers with ``reply``."""

    def __init__(self, reply=None):
        import socket
        import threading

        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                conn.sendall(self.reply)

    def close(self):
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize(
    "reply", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["silent", "http1"]
)
def test_a_port_that_listens_but_is_not_ray_fails_within_the_timeout(reply, probes):
    """Probe 7: such a port hung sample(address=...) for more than 110 s."""
    listener = _Listener(reply)
    try:
        with pytest.raises(ClusterConnectionError) as info:
            raybayes.sample(
                tiny_model,
                np.array([0.5], dtype=np.float32),
                num_chains=1,
                num_warmup=10,
                num_samples=10,
                address=f"127.0.0.1:{listener.port}",
                progress_bar=False,
            )
    finally:
        listener.close()
    # One probe with the default connect timeout, every wait on it bounded by that
    # timeout, and no ray.init (which would hang on such a port).
    assert probes["connect"] == [(("127.0.0.1", listener.port), 10.0)]
    assert probes["waits"] and all(0 < w <= 10.0 for w in probes["waits"])
    assert probes["ray_init"] == 0
    message = str(info.value)
    assert f"'127.0.0.1:{listener.port}'" in message
    assert "is not a Ray cluster" in message and "10 s" in message


def test_silent_port_fails_within_a_short_timeout(probes):
    listener = _Listener()
    try:
        with pytest.raises(ClusterConnectionError, match="not a Ray cluster"):
            RayBackend(f"127.0.0.1:{listener.port}", connect_timeout_s=1.5).start()
    finally:
        listener.close()
    assert probes["connect"] == [(("127.0.0.1", listener.port), 1.5)]
    # The wait for Ray's answer is bounded by what is left of the 1.5 s.
    assert probes["waits"] and all(0 < w <= 1.5 for w in probes["waits"])
    assert probes["ray_init"] == 0


def test_a_tls_cluster_is_only_checked_for_a_listening_port(monkeypatch):
    from raybayes.backends.ray import _check_reachable

    monkeypatch.setenv("RAY_USE_TLS", "1")  # its GCS expects a TLS handshake first
    listener = _Listener()
    try:
        _check_reachable(f"127.0.0.1:{listener.port}", 1.0)
    finally:
        listener.close()
