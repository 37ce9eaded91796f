"""The embedded Ray instance serves this machine only, and starts quietly.

Probes 6 and 10 of issue 21: the embedded instance listened on every interface
(GCS, raylet and workers on ``*``; agents on 0.0.0.0 and the host address), and
every ``sample(backend="ray")`` printed two ``os.fork()`` RuntimeWarnings.

The run happens in a fresh interpreter, as a user's script would: JAX is
initialised (the model is traced) before Ray starts, which is what made the fork
warnings appear. While its chains run, the script lists the listening sockets of
every process of its Ray instance (its descendants).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np, numpyro, numpyro.distributions as dist, psutil
    import raybayes
    from raybayes.backends import RayBackend

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    found = {"sockets": [], "processes": []}

    def listening():
        me = psutil.Process()
        for p in me.children(recursive=True) + [me]:
            try:
                cmdline = p.cmdline()
                name = " ".join(cmdline[:3])
                if any("dashboard.py" in a for a in cmdline):
                    found["dashboard"] = cmdline
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue
            found["processes"].append(name)
            found["sockets"] += [[name, c.laddr.ip, c.laddr.port] for c in conns
                                 if c.status == psutil.CONN_LISTEN]

    class Probe(RayBackend):
        def create_pool(self, *args, **kwargs):
            pool = super().create_pool(*args, **kwargs)
            for actor in pool._actors:  # workers up: every process exists now
                self._ray.get(actor.ping.remote())
            listening()
            return pool

        @property
        def _ray(self):
            import ray
            return ray

    backend = Probe(num_cpus=1)
    try:
        idata = raybayes.sample(model, np.array([0.3, -0.1]), num_chains=1,
                                num_warmup=20, num_samples=20, backend=backend,
                                num_workers=1, progress_bar=False)
    finally:
        backend.shutdown()
    found["draws"] = int(idata.posterior.sizes["draw"])
    print("RESULT " + json.dumps(found))
    """
)


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    script = tmp_path_factory.mktemp("embedded") / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stderr


def test_every_ray_socket_listens_on_loopback_only(embedded_run):
    found, _ = embedded_run
    assert found["draws"] == 20
    assert any("raylet" in p for p in found["processes"])  # Ray's processes were seen
    assert found["sockets"], "no listening socket found: the probe saw nothing"
    exposed = [s for s in found["sockets"] if not _is_loopback(s[1])]
    assert not exposed, f"listening on non-loopback addresses: {exposed}"


def test_no_dashboard_is_served(embedded_run):
    """Ray always starts its head process; without a dashboard it serves no UI."""
    found, _ = embedded_run
    head = set(found.get("dashboard") or [])
    no_ui = {"--disable-frontend", "--modules-to-load=UsageStatsHead"}
    assert not head or no_ui <= head, head


def test_no_fork_warnings(embedded_run):
    _, stderr = embedded_run
    assert "os.fork() was called" not in stderr
    assert "RuntimeWarning" not in stderr


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_loopback_check_accepts_loopback(ip):
    assert _is_loopback(ip)


@pytest.mark.parametrize("ip", ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"])
def test_loopback_check_rejects_other_addresses(ip):
    assert not _is_loopback(ip)
