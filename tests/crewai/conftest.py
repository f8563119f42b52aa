"""Fixtures of the CrewAI adapter tests: an offline CrewAI (HOME in a temp dir, telemetry and
tracing off, every non-loopback connection attempt recorded and failed), a TLS test bed
with per-tenant OAuth clients, and pools in front of it."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

# Before CrewAI is imported: it writes under ~/.local/share and ~/.config/crewai at kickoff.
_HOME = tempfile.mkdtemp(prefix="toolpool-crewai-home-")
for _name, _value in {
    "HOME": _HOME,
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "CREWAI_STORAGE_DIR": os.path.join(_HOME, "crewai-storage"),
}.items():
    os.environ[_name] = _value

import toolpool  # noqa: E402
from toolpool.testing import Downstream, ServiceSpec  # noqa: E402

# ---------------------------------------------------------------------- network guard

_offsite: list[str] = []
_offsite_lock = threading.Lock()


def _loopback(host: Any) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


_guarding = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Records (and refuses) any attempt to leave the machine while these tests run; the hook
    # stays installed for the process but is inert outside them.
    if not _guarding:
        return
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _loopback(address[0]):
            with _offsite_lock:
                _offsite.append(f"connect {address!r}")
            raise OSError(f"test network guard: connection to {address!r} refused")
    elif event == "socket.getaddrinfo":
        host = args[0]
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not _loopback(host):
            with _offsite_lock:
                _offsite.append(f"resolve {host!r}")
            raise socket.gaierror(f"test network guard: lookup of {host!r} refused")


sys.addaudithook(_audit)

# CrewAI itself is imported under the guard: an import that phones home fails collection.
_guarding = True
try:
    import crewai  # noqa: F401
finally:
    _guarding = False
assert _offsite == [], f"importing CrewAI tried to reach the network: {_offsite}"


@pytest.fixture(autouse=True)
def no_network() -> Iterator[None]:
    """Fail a test that tried to reach anything but loopback (CrewAI telemetry, tracing,
    model catalogues)."""
    global _guarding
    with _offsite_lock:
        _offsite.clear()
    _guarding = True
    try:
        yield
    finally:
        _guarding = False
    with _offsite_lock:
        attempts = list(_offsite)
    assert attempts == [], f"the test tried to reach the network: {attempts}"


# ---------------------------------------------------------------------- test bed

from tests._support.crewai_crews import TENANTS, make_pool, register_tenants  # noqa: E402


@pytest.fixture(scope="module")
def downstream() -> Iterator[Downstream]:
    """Two TLS services that require their own bearer tokens (OAuth client credentials per
    tenant); a little service time, so parallel calls overlap as they do in production."""
    spec = ServiceSpec(service_time=0.005, token_latency=0.01)
    with Downstream({"crm": spec, "search": spec}, tls=True) as ds:
        register_tenants(ds, ("crm", "search"))
        yield ds


@pytest.fixture
def ds(downstream: Downstream) -> Downstream:
    downstream.reset_stats()
    return downstream


@pytest.fixture
def pool(ds: Downstream) -> Iterator[toolpool.Pool]:
    with make_pool(ds) as p:
        yield p


__all__ = ["TENANTS"]


_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # CrewAI 1.15 warns about its own deprecated fields on every kickoff; not ours to fix.
    for item in items:
        if str(item.path).startswith(_HERE):
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning:crewai"))
