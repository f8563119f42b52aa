"""Suite-wide settings: nothing may phone home, and every test runs offline on loopback."""

from __future__ import annotations

import os

# Fixtures shared by several folders (the helpers themselves are plain modules of
# tests/_support, importable as `tests._support.<module>` through pytest's `pythonpath`).
pytest_plugins = ["tests._support.fixtures"]

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
