"""``raybayes --help`` is fast (no JAX, no Ray) and readable at 80 columns.

Probe 10 of issue 21: ``--help`` took about 6 s (it imported JAX and Ray) and its
option names were cut at 80 columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMMANDS = [
    [], ["quickstart"], ["fit-elasticity"], ["fit-many"], ["aggregate"], ["plot-group"],
]

PROBE = """
import json, sys
from raybayes.cli import app
try:
    app(sys.argv[1:] + ["--help"], prog_name="raybayes")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
heavy = ["jax", "ray", "numpyro", "pandas", "pyarrow", "arviz", "duckdb", "matplotlib"]
print("LOADED " + json.dumps([m for m in heavy if m in sys.modules]))
"""


def _help(args):
    env = dict(os.environ, COLUMNS="80", TERMINAL_WIDTH="80")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text, _, loaded = proc.stdout.rpartition("LOADED ")
    return text, json.loads(loaded)


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "raybayes")
def test_help_imports_neither_jax_nor_ray(args):
    _, loaded = _help(args)
    assert loaded == []


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "raybayes")
def test_help_fits_80_columns_with_whole_option_names(args):
    text, _ = _help(args)
    assert "Usage: raybayes" in text
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long
    assert "…" not in text  # nothing cut
    if args == ["fit-many"]:
        for name in ("--num-predictive-draws", "--group-keys", "--mass-matrix"):
            assert name in text


def test_python_dash_m_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "raybayes.cli", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and "fit-many" in proc.stdout


def test_import_raybayes_is_lazy_but_complete():
    code = (
        "import sys, raybayes; assert 'jax' not in sys.modules; "
        "from raybayes.plan import Plan; "
        "assert callable(raybayes.plan) and raybayes.Plan is Plan; "
        "assert all(hasattr(raybayes, n) for n in raybayes.__all__); print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
