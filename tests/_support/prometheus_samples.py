"""Helpers for the observability tests: scrape a registry (or a URL) into samples and look
series up by name and labels."""

from __future__ import annotations

import math
from collections.abc import Mapping

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import toolpool.metrics

Labels = frozenset[tuple[str, str]]


class Samples:
    """One scrape's samples: (sample name, labels) -> value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = float(s.value)

    def get(self, name: str, **labels: str) -> float:
        """The one sample named `name` with exactly these labels (KeyError if absent)."""
        return self.values[(name, frozenset(labels.items()))]

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample named `name` whose labels include `labels`."""
        want = set(labels.items())
        found = [v for (n, lab), v in self.values.items() if n == name and want <= lab]
        if not found:
            raise KeyError(f"no sample {name} with {labels}")
        return sum(found)

    def series(self, name: str) -> dict[Labels, float]:
        return {lab: v for (n, lab), v in self.values.items() if n == name}

    def buckets(self, name: str, **labels: str) -> dict[float, float]:
        """A histogram's cumulative buckets: upper bound -> count."""
        out: dict[float, float] = {}
        for (n, lab), v in self.values.items():
            d = dict(lab)
            le = d.pop("le", None)
            if n == name + "_bucket" and le is not None and d == labels:
                out[math.inf if le == "+Inf" else float(le)] = v
        return out


def scrape_registry(registry: CollectorRegistry) -> Samples:
    return Samples(toolpool.metrics.exposition(registry))


def scrape_url(url: str) -> Samples:
    response = httpx.get(url, timeout=10.0, trust_env=False)
    response.raise_for_status()
    return Samples(response.text)


def closed_by_reason(samples: Samples, destination: str, h2: bool = False) -> Mapping[str, float]:
    """Closes by reason: of slots (`toolpool_connections_closed_total`), or with `h2` of
    HTTP/2 connections (`toolpool_http2_connections_closed_total`)."""
    name = "toolpool_http2_connections_closed_total" if h2 else "toolpool_connections_closed_total"
    return {
        dict(lab)["reason"]: v
        for lab, v in samples.series(name).items()
        if dict(lab)["destination"] == destination
    }
