"""The README's cluster recipe works against a ``ray start`` head with token auth.

Probe 11 of issue 21: ``ray start --head --port=P`` then
``raybayes.sample(..., address="127.0.0.1:P")`` failed with "Failed to connect";
the cause, token authentication (the head requires a token and the client ran
with ``RAY_AUTH_MODE`` unset), was hidden.

The head is started here with ``ray start --block`` in its own session and on
ports of its own, and exactly its processes (its descendants, and any process
whose command line names its temporary folder or its GCS address) are stopped at
the end: ``ray stop`` would stop every Ray instance of the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

CLIENT = textwrap.dedent(
    """
    import sys
    import numpy as np, numpyro, numpyro.distributions as dist
    import raybayes

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = np.array([0.3, -0.1, 0.8])
    kw = dict(num_chains=2, num_warmup=30, num_samples=30, seed=5, progress_bar=False)
    try:
        remote = raybayes.sample(model, y, address=sys.argv[1], num_workers=2, **kw)
    except raybayes.ClusterConnectionError as err:
        print("CONNECTION_ERROR " + str(err).replace("\\n", " "))
        raise SystemExit(3)
    local = raybayes.sample(model, y, backend="local", **kw)
    same = np.array_equal(remote.posterior["mu"].values, local.posterior["mu"].values)
    print(f"DRAWS {remote.posterior.sizes['chain']} {remote.posterior.sizes['draw']}")
    print(f"SAME_AS_LOCAL {same}")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"
    }
    env.update(extra)
    return env


def _own_processes(proc, folder, port):
    found = {}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(proc.pid).children(recursive=True):
            found[p.pid] = p
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or []
        if any(folder in a or a.endswith(f":{port}") for a in args):
            found[p.pid] = p
    found.pop(os.getpid(), None)
    return list(found.values())


@pytest.fixture(scope="module")
def head():
    folder = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Unix socket paths
    home = tempfile.mkdtemp(prefix="rb-home-")  # no ~/.ray/auth_token of the user's
    port = _free_port()
    token = secrets.token_hex(32)
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=home)
    ports = {
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={folder}",
        "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        "--block", *(f"{k}={v}" for k, v in ports.items()),
    ]
    log = open(os.path.join(home, "head.log"), "w")
    proc = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        from raybayes.backends.ray import _check_reachable

        deadline = time.monotonic() + 240
        while True:
            try:
                _check_reachable(f"127.0.0.1:{port}", 2.0)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("ray start failed:\n" + open(log.name).read()[-3000:])
                time.sleep(1)
        time.sleep(3)  # the raylet registers after the GCS answers
        yield dict(port=port, token=token, home=home)
    finally:
        # Its descendants, and any process that names the head's temporary folder
        # or ends an argument with its GCS port.
        own = _own_processes(proc, folder, port)
        for p in [psutil.Process(proc.pid), *own]:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        gone, alive = psutil.wait_procs(own, timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _client(head, tmp_path, **env):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.run(
        [sys.executable, str(script), f"127.0.0.1:{head['port']}"],
        env=_clean_env(HOME=str(tmp_path), **env),
        capture_output=True,
        text=True,
        timeout=400,
    )
    return proc


def test_sample_on_a_token_cluster_with_the_token(head, tmp_path):
    proc = _client(head, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "DRAWS 2 30" in proc.stdout
    assert "SAME_AS_LOCAL True" in proc.stdout


def test_authentication_failure_is_reported_with_the_fix(head, tmp_path):
    proc = _client(head, tmp_path, RAY_AUTH_MODE="disabled")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CONNECTION_ERROR"))
    assert "token authentication" in line
    assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line
    assert "auth_token" in line  # the token file
