"""The resilience policy's counters in the exposition and in `toolpool top`, against a real
downstream that answers 503 to everything: retries match what the server received, the
breaker opens and refuses, the adaptive limit comes down with its reason."""

from __future__ import annotations

import io

from prometheus_client import CollectorRegistry
from rich.console import Console

import toolpool
import toolpool.metrics
from tests._support.prometheus_samples import scrape_registry
from toolpool import _top
from toolpool.resilience import AdaptiveLimit, CircuitBreaker, Policy, Retry
from toolpool.testing import Downstream, ServiceSpec


def test_retries_breaker_and_limit_in_metrics_and_top() -> None:
    policy = Policy(
        retry=Retry(attempts=2, backoff=0.001, max_backoff=0.002),
        breaker=CircuitBreaker(consecutive_failures=3, open_for=60.0),
        # Windows of 1 ms: every call (two attempts with a backoff) ends one, so each 503
        # lowers the limit; a slower machine only ends windows sooner.
        adaptive=AdaptiveLimit(interval=0.001),
    )
    with Downstream({"billing": ServiceSpec(require_auth=False)}) as ds:
        ds.set_fault("billing", "status", status=503)
        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    "billing", ds.url("billing"), max_connections=10, warmup=0.0, policy=policy
                )
            ]
        )
        registry = CollectorRegistry()
        toolpool.metrics.register(pool, registry)
        answered = refused = 0
        with pool, pool.sync_client() as client:
            before = _top.parse(toolpool.metrics.exposition(registry), 0.0)
            for _ in range(20):
                try:
                    response = client.get(ds.url("billing") + "/anything")
                except toolpool.DestinationUnavailable:
                    refused += 1
                    if refused == 3:
                        break
                else:
                    assert response.status_code == 503
                    answered += 1
            samples = scrape_registry(registry)
            after = _top.parse(samples.text, 1.0)
            stats = pool.destination("billing").policy.stats()
            effective = pool.stats()["billing"].effective_limit
        server = ds.stats("billing")

    d = {"destination": "billing"}
    assert refused == 3 and answered >= 1
    # Every request the server received is a first attempt of an answered call or a retry.
    retries = samples.get("toolpool_retries_total", reason="http_503", **d)
    assert retries == stats.retries_total["http_503"] > 0
    assert answered + retries == server.requests_total == server.http_503
    # The breaker is open and refused the last three calls without sending them.
    assert samples.get("toolpool_breaker_state", state="open", **d) == 1
    assert samples.get("toolpool_breaker_state", state="closed", **d) == 0
    assert samples.get("toolpool_breaker_transitions_total", state="open", **d) == 1
    assert samples.get("toolpool_rejections_total", reason="breaker_open", **d) == refused
    # 503s lowered the adaptive limit, and the reason is exported.
    limit = samples.get("toolpool_connections_limit", **d)
    assert limit == effective == stats.effective_limit < 10
    assert samples.get("toolpool_connections_limit_reason", reason="http_503", **d) == 1
    assert samples.get("toolpool_connections_limit_changes_total", direction="decrease", **d) >= 1
    # The pool's own wait histogram counts each attempt that got a connection.
    assert samples.get("toolpool_connection_wait_seconds_count", **d) == server.requests_total

    row = next(iter(_top.rows(before, after)))
    assert row.breaker == "open"
    assert row.limit == int(limit)
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    console.print(_top.render([row], url="http://127.0.0.1/metrics", window=1.0))
    line = next(x for x in console.export_text().splitlines() if x.strip().startswith("billing"))
    cells = [c.strip() for c in line.split("│")]
    assert cells[2] == f"0/{row.idle}/10 ↓{int(limit)}"
    assert cells[9] == "open"
