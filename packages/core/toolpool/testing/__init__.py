"""toolpool.testing: real HTTP/1.1 services on loopback for tests, demos and benchmarks.

Import it explicitly (``import toolpool`` does not); TLS needs ``trustme``
(``pip install 'toolpool[testing]'``)::

    from toolpool.testing import Downstream, ServiceSpec

    with Downstream({"crm": ServiceSpec(), "search": ServiceSpec(require_auth=False)}) as ds:
        ds.register_client("crm", client_id="acme-app", client_secret="s3cret", tenant="acme")
        ...
"""

from __future__ import annotations

from toolpool.testing._downstream import Downstream
from toolpool.testing._faults import Fault, FaultEndpoint, FaultKind
from toolpool.testing._loop import LoopName
from toolpool.testing._relay import LatencyRelay
from toolpool.testing._remote import RemoteDownstream, spawn_downstream
from toolpool.testing._spec import Seconds, ServiceSpec
from toolpool.testing._stats import ServiceStats

__all__ = [
    "Downstream",
    "Fault",
    "FaultEndpoint",
    "FaultKind",
    "LatencyRelay",
    "LoopName",
    "RemoteDownstream",
    "Seconds",
    "ServiceSpec",
    "ServiceStats",
    "spawn_downstream",
]
