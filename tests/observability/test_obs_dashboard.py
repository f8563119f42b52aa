"""The shipped Grafana dashboard queries only series toolpool.metrics exports (names and label
names), and has a panel for every column of `toolpool top`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

import toolpool
import toolpool.metrics
from toolpool.testing import Downstream, ServiceSpec

DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "toolpool-dashboard.json"
# Label names the exporter uses (plus `le` of histogram buckets).
LABELS = {"destination", "state", "reason", "source", "direction", "le", "tenant", "outcome"}


def _panels() -> list[dict]:
    data = json.loads(DASHBOARD.read_text())
    return [p for p in data["panels"] if p["type"] != "row"]


def test_every_query_uses_exported_metric_and_label_names() -> None:
    known = set(toolpool.metrics.METRICS)
    histograms = {n for n, (kind, _) in toolpool.metrics.METRICS.items() if kind == "histogram"}
    used: set[str] = set()
    for panel in _panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for name in re.findall(r"\btoolpool_[a-z0-9_]+", expr):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                if base in histograms:
                    assert name != base, f"{panel['title']}: a histogram is queried by its suffixes"
                    used.add(base)
                else:
                    assert name in known, f"{panel['title']}: {name} is not exported"
                    used.add(name)
            for labels in re.findall(r"(?:by|on) \(([^)]*)\)", expr):
                for label in labels.split(","):
                    assert label.strip() in LABELS, f"{panel['title']}: label {label!r}"
            for label in re.findall(r"\b([a-z_]+)=~?\"", expr):
                assert label in LABELS, f"{panel['title']}: label {label!r}"
    # The seed's five metrics are all on the dashboard.
    assert {
        "toolpool_connections",
        "toolpool_connection_wait_seconds",
        "toolpool_connections_created_total",
        "toolpool_connections_closed_total",
        "toolpool_auth_refreshes_total",
    } <= used
    # HTTP/2 destinations: creations and evictions of connections, not of stream permits.
    assert {
        "toolpool_http2_connections_created_total",
        "toolpool_http2_connections_closed_total",
    } <= used


def test_the_columns_of_top_have_panels() -> None:
    titles = " | ".join(p["title"].lower() for p in _panels())
    for column in (
        "utilization",
        "used / idle / max",
        "queue",
        "wait p50 / p99",
        "creations/s",
        "evictions/s",
        "auth refreshes/s",
        "breaker state",
    ):
        assert column in titles, column


def test_the_queried_series_exist_in_a_real_exposition() -> None:
    """Every plain series the Pool row of the dashboard reads is present after real traffic."""
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        registry = CollectorRegistry()
        pool = toolpool.Pool(
            [toolpool.Destination("crm", ds.url("crm"), max_connections=2, warmup=0.0)]
        )
        toolpool.metrics.register(pool, registry)
        with pool, pool.sync_client() as client:
            assert client.get(ds.url("crm") + "/anything").status_code == 200
            text = toolpool.metrics.exposition(registry)
    for name in (
        "toolpool_connections",
        "toolpool_connections_max",
        "toolpool_connections_limit",
        "toolpool_pending_requests",
        "toolpool_pending_requests_max",
        "toolpool_connection_wait_seconds_bucket",
        "toolpool_connection_wait_seconds_count",
        "toolpool_connections_created_total",
        "toolpool_connections_closed_total",
        "toolpool_connection_create_seconds_bucket",
        "toolpool_connection_use_seconds_bucket",
        "toolpool_connection_acquisitions_total",
        "toolpool_rejections_total",
    ):
        assert re.search(rf'^{name}\{{destination="crm"', text, re.M), name
