"""toolpool.testing: real HTTP/1.1 and HTTP/2 services on loopback for tests, demos, benchmarks.

Import it explicitly (``import toolpool`` does not); TLS needs ``trustme``
(``pip install 'toolpool[testing]'``)::

    import httpx
    from toolpool.testing import Downstream, ServiceSpec

    services = {"crm": ServiceSpec(), "search": ServiceSpec(require_auth=False)}
    with Downstream(services, tls=True) as ds:
        ds.register_client("crm", client_id="acme-app", client_secret="s3cret", tenant="acme")
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            grant = client.post(
                ds.token_url("crm"),
                data={"grant_type": "client_credentials"},
                auth=("acme-app", "s3cret"),
            ).json()
            headers = {"Authorization": f"Bearer {grant['access_token']}"}
            client.get(ds.url("crm") + "/anything", headers=headers).json()["tenant"]  # "acme"
        assert ds.stats("crm").mixed_connections() == {}

What is here:

- :class:`Downstream`: named services, each on its own 127.0.0.1 port, served from a loop
  thread it owns (sync and async context manager). Token endpoint (client credentials,
  RFC 8693 exchange), bearer / ``X-Tenant`` / mTLS tenants, API routes (``/anything``,
  ``/echo``, ``/bytes``, ``/stream``, ``/status/<code>``, ``/redirect``, ``/cookies``,
  ``/delay``, ``/hang``, ``/close``), faults (:meth:`Downstream.set_fault`), exact counters
  (:class:`ServiceStats`, :meth:`Downstream.wait_stats`). With TLS, services speak HTTP/2 to
  clients that offer ``h2`` by ALPN; stats then count streams per connection and the peak of
  concurrent streams, and the HTTP/2 fault kinds (goaway, rst_stream, refused_stream,
  max_streams_1, silent, http1) apply.
- :class:`ServiceSpec`: one service's behaviour (service time, concurrency limit, keep-alive
  timeout, auth, token latency and lifetime, mTLS).
- :class:`LatencyRelay`: a TCP wire with a one-way delay (``Downstream(latency=...)`` puts
  one in front of every service).
- :class:`HostMap`: a resolver hook for ``toolpool.Egress(resolver=...)``: test-only host
  names answered from a table (changeable between connects), no DNS.
- :func:`spawn_downstream`: the same Downstream in a child process
  (``python -m toolpool.testing serve``), driven over its admin endpoint; and
  ``python -m toolpool.testing bench`` to measure the test bed's own throughput.
- :func:`tenant_fairness`: how evenly a burst served its tenants (per-tenant p99, and the
  same question asked of the order in which calls finished, which load does not move).
"""

from __future__ import annotations

from toolpool.testing._downstream import Downstream
from toolpool.testing._fairness import TenantFairness, tenant_fairness
from toolpool.testing._faults import Fault, FaultEndpoint, FaultKind
from toolpool.testing._hostmap import HostMap
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
    "HostMap",
    "LatencyRelay",
    "LoopName",
    "RemoteDownstream",
    "Seconds",
    "ServiceSpec",
    "ServiceStats",
    "TenantFairness",
    "spawn_downstream",
    "tenant_fairness",
]
