"""`mxd-lens export --help` answers without importing torch, like the other commands."""

from __future__ import annotations

import subprocess
import sys

from tests.test_cli import _PROBE


def test_export_help_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", _PROBE, "export", "--help"], capture_output=True, text=True, timeout=60)
    probe = done.stderr.strip().splitlines()[-1].split()
    assert probe[0] == "PROBE", done.stderr
    assert probe[2] == "-", f"export --help imported {probe[2]}"
    assert "--format" in done.stdout and "circuit-tracer" in done.stdout and "sparsify" in done.stdout
