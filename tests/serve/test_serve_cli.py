"""``raybayes serve`` on the command line: loopback default, --host/--port, bad folder.

The subprocess test starts the real command (its import of raybayes takes about
20 s on a loaded 2-core machine, hence ``slow``); the others run the command
in-process with uvicorn's ``run`` replaced.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if any."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


@pytest.fixture()
def uvicorn_calls(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def test_serve_defaults_to_loopback_and_port_8000(fleet_out, uvicorn_calls):
    from typer.testing import CliRunner

    from raybayes.cli import app

    result = CliRunner().invoke(app, ["serve", str(fleet_out)])
    assert result.exit_code == 0, result.output
    ((fastapi_app, kw),) = uvicorn_calls
    assert (kw["host"], kw["port"]) == ("127.0.0.1", 8000)
    assert fastapi_app.state.results.output_dir == fleet_out.resolve()
    assert "http://127.0.0.1:8000/" in result.output


def test_serve_host_and_port_options_warn_off_loopback(
    fleet_out, uvicorn_calls, caplog
):
    from typer.testing import CliRunner

    from raybayes.cli import app

    result = CliRunner().invoke(
        app, ["serve", str(fleet_out), "--host", "0.0.0.0", "--port", "9123"]
    )
    assert result.exit_code == 0, result.output
    assert [(kw["host"], kw["port"]) for _, kw in uvicorn_calls] == [("0.0.0.0", 9123)]
    assert "no authentication" in caplog.text


def test_serve_command_rejects_a_missing_folder(tmp_path, uvicorn_calls):
    from typer.testing import CliRunner

    from raybayes.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert result.exit_code == 2 and not uvicorn_calls
    assert "is not a folder" in result.output and "fit-many" in result.output


@pytest.mark.slow
def test_serve_command_binds_loopback_by_default(fleet_out):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raybayes.cli",
            "serve",
            str(fleet_out),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/keys", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert r.status_code == 200 and r.json()["num_groups"] == 12
        addr = _outward_address()
        if addr is not None:  # not listening on the machine's other interfaces
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(5)
                s.connect((addr, port))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}/" in out
