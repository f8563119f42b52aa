"""Fixtures of the OpenTelemetry tests: the SDK enabled for these tests only, spans kept in
memory, metrics read by an in-memory reader.

The Makefile exports OTEL_SDK_DISABLED=true (nothing may phone home); the SDK reads it when a
provider is built, so the providers here are built with it lifted for that moment. AutoGen
traces through the global tracer provider, which can be set once per process: the first use
sets it, and a gate lets spans through only while a test of this package runs.
"""

from __future__ import annotations

import os

for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "AUTOGEN_DISABLE_RUNTIME_TRACING": "true",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
}.items():
    os.environ.setdefault(_name, _value)

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)


class _Gate(SimpleSpanProcessor):
    """Exports spans only while open (the global provider outlives these tests)."""

    open = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.open:
            super().on_end(span)


def _sdk_enabled() -> dict[str, str]:
    saved = {k: os.environ.pop(k) for k in ("OTEL_SDK_DISABLED",) if k in os.environ}
    return saved


_EXPORTER = InMemorySpanExporter()
_GATE = _Gate(_EXPORTER)


def _global_provider() -> TracerProvider:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        saved = _sdk_enabled()
        try:
            provider = TracerProvider()
        finally:
            os.environ.update(saved)
        trace.set_tracer_provider(provider)
        assert trace.get_tracer_provider() is provider, "another tracer provider is global"
    if not getattr(provider, "_toolpool_gate", False):
        provider.add_span_processor(_GATE)
        provider._toolpool_gate = True  # type: ignore[attr-defined]
    return provider


@pytest.fixture
def tracer_provider() -> Iterator[TracerProvider]:
    """The global SDK tracer provider (AutoGen's spans go there too), exporting to memory."""
    provider = _global_provider()
    _EXPORTER.clear()
    _GATE.open = True
    try:
        yield provider
    finally:
        _GATE.open = False
        _EXPORTER.clear()


@pytest.fixture
def exporter(tracer_provider: TracerProvider) -> InMemorySpanExporter:
    return _EXPORTER


@pytest.fixture
def metric_reader() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    """A fresh SDK meter provider with an in-memory reader."""
    reader = InMemoryMetricReader()
    saved = _sdk_enabled()
    try:
        provider = MeterProvider(metric_readers=[reader])
    finally:
        os.environ.update(saved)
    yield provider, reader
    provider.shutdown()
