"""Suite-wide settings: nothing may phone home, and every test runs offline on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Test modules are imported by path (--import-mode=importlib), so test files in different
# folders may share a name. Each folder's helper modules (rawhttp, lc_support, ...) and the
# `tests.<area>` package paths stay importable:
_TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
if str(_TESTS.parent) not in sys.path:
    sys.path.insert(0, str(_TESTS.parent))

# Agent frameworks and their dependencies must not try to reach the network.
for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
    "HF_HUB_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
}.items():
    os.environ[_name] = _value
