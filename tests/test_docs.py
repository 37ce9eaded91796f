"""The documentation site builds without warnings from the docstrings and guides."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_documentation_site_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocs", reason="install the test extras: pip install '.[test]'")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    warnings = [
        line for line in (proc.stdout + proc.stderr).splitlines()
        if line.startswith(("WARNING", "ERROR"))
    ]
    assert proc.returncode == 0 and not warnings, "\n".join(warnings) or proc.stderr[-3000:]
    # Every API page rendered at least one documented object.
    for page in (ROOT / "docs" / "api").glob("*.md"):
        html = (site / "api" / page.stem / "index.html").read_text()
        assert 'class="doc doc-heading"' in html or "doc-heading" in html, page.name
    shutil.rmtree(site)
