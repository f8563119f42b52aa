"""The documented demo of the three deployment patterns runs and shows what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "deployment_demo.py"


def test_deployment_demo_runs_all_three_patterns() -> None:
    proc = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tenants seen by the downstream ['acme', 'globex']" in out
    local = re.search(r"(\d+) calls on the local tier \(max 3 connections, 0 queued\), (\d+)", out)
    assert local is not None, out
    assert int(local.group(1)) + int(local.group(2)) == 40 and int(local.group(2)) >= 37
    assert "0 carried two tenants" in out
    drained = re.search(r'"accepted": (\d+), "answered": (\d+), "aborted": 0', out)
    assert drained is not None and drained.group(1) == drained.group(2), out
    assert out.rstrip().endswith("exit status 0")
