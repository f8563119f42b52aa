"""One AutoGen agent run, traced with OpenTelemetry, drawn as a waterfall.

The agent (a scripted replay model, offline) asks for four parallel CRM lookups for tenant
"acme". The CRM is a loopback TLS service with OAuth client credentials, 5 ms of network
latency each way and 30 ms per request; the pool allows 2 requests in flight to it (HTTP/2:
2 streams, on one connection per tenant; HTTP/1.1: 2 connections). The trace shows where each
tool call's time went: AutoGen's own `execute_tool` spans, and inside them toolpool's request
spans with the token fetch, the TCP connect, the TLS handshake (ALPN), the wait for a stream
or a connection and the server's answer.

Spans are kept in memory (the SDK's InMemorySpanExporter) and drawn with matplotlib:

    python examples/otel_trace.py                 # HTTP/2: writes examples/otel_trace.png
    python examples/otel_trace.py --http1         # writes examples/otel_trace_http11.png
    python examples/otel_trace.py --out trace.png --json trace.json

Everything runs on 127.0.0.1; no span leaves the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

for _name, _value in {
    "AUTOGEN_DISABLE_RUNTIME_TRACING": "true",
    "ANONYMIZED_TELEMETRY": "false",
}.items():
    os.environ.setdefault(_name, _value)
# The Makefile disables OpenTelemetry SDKs by default (nothing may phone home); this script
# exports to memory only, so it turns its own SDK on.
os.environ.pop("OTEL_SDK_DISABLED", None)

import httpx  # noqa: E402
from autogen_agentchat.agents import AssistantAgent  # noqa: E402
from autogen_core import FunctionCall  # noqa: E402
from autogen_core.models import CreateResult, ModelFamily, ModelInfo, RequestUsage  # noqa: E402
from autogen_ext.models.replay import ReplayChatCompletionClient  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import toolpool  # noqa: E402
import toolpool.auth  # noqa: E402
import toolpool.autogen  # noqa: E402
import toolpool.otel  # noqa: E402
from toolpool.testing import Downstream, ServiceSpec  # noqa: E402

HERE = Path(__file__).resolve().parent
COLORS = {
    "agent": "#9e9e9e",
    "execute_tool": "#7e57c2",
    "request": "#1e88e5",
    "toolpool.auth.token": "#f9a825",
    "toolpool.auth.wait": "#fdd835",
    "toolpool.pool.wait": "#e53935",
    "toolpool.admission.wait": "#c62828",
    "toolpool.connect": "#43a047",
    "toolpool.tls": "#00897b",
    "toolpool.connect.wait": "#a5d6a7",
    "toolpool.ping": "#8d6e63",
    "toolpool.response": "#90caf9",
    "toolpool.retry": "#ff7043",
}


def _kind(span: ReadableSpan) -> str:
    if span.name in COLORS:
        return span.name
    if span.name.startswith("execute_tool"):
        return "execute_tool"
    scope = span.instrumentation_scope
    if span.kind == trace.SpanKind.CLIENT and scope is not None and scope.name == "toolpool":
        return "request"
    return "agent"


def _script() -> ReplayChatCompletionClient:
    calls = [
        FunctionCall(id=f"call-{i}", name="crm_lookup", arguments=json.dumps({"customer": i}))
        for i in range(1, 5)
    ]
    first = CreateResult(
        finish_reason="function_calls",
        content=calls,
        usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
        cached=False,
    )
    info = ModelInfo(
        vision=False,
        function_calling=True,
        json_output=False,
        family=ModelFamily.UNKNOWN,
        structured_output=False,
    )
    return ReplayChatCompletionClient([first, "four customers found"], model_info=info)


async def run(provider: TracerProvider, http2: bool) -> None:
    spec = ServiceSpec(service_time=0.03, token_latency=0.08)
    async with Downstream({"crm": spec}, tls=True, latency=0.005) as ds:
        ds.register_client("crm", client_id="acme-app", client_secret="acme-secret", tenant="acme")
        auth = toolpool.auth.OAuth2ClientCredentials(
            ds.token_url("crm"), credentials=lambda ctx: ("acme-app", "acme-secret")
        )
        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    "crm",
                    ds.url("crm"),
                    verify=ds.ca_pem_path,
                    auth=auth,
                    max_connections=2,
                    warmup=0.0,
                )
            ],
            http2=http2,
        )
        toolpool.otel.instrument(pool, tracer_provider=provider, metrics=False)
        url = ds.url("crm") + "/anything"

        async def crm_lookup(customer: int) -> str:
            """Look a customer up in the CRM (written the naive way: its own client)."""
            async with httpx.AsyncClient() as client:
                r = await client.get(url, params={"customer": customer})
                r.raise_for_status()
                return f"customer {customer}: tenant {r.json()['tenant']}"

        agent = AssistantAgent("support_agent", model_client=_script(), tools=[crm_lookup])
        toolpool.autogen.wrap(agent, pool)
        tracer = provider.get_tracer("examples.otel_trace")
        async with pool:
            with (
                tracer.start_as_current_span("agent run (tenant acme)"),
                toolpool.auth_context(toolpool.AuthContext(tenant="acme")),
            ):
                await agent.run(task="look up customers 1 to 4")


def _ordered(spans: list[ReadableSpan]) -> list[tuple[int, ReadableSpan]]:
    """Depth-first from the roots, children by start time: (depth, span)."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(s)
    out: list[tuple[int, ReadableSpan]] = []

    def visit(parent: int | None, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda s: s.start_time or 0):
            out.append((depth, s))
            visit(s.context.span_id, depth + 1)

    visit(None, 0)
    return out


def draw(spans: list[ReadableSpan], out: Path, http2: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = _ordered(spans)
    t0 = min(s.start_time or 0 for s in spans)
    height = 0.32 * len(rows) + 1.6
    fig, ax = plt.subplots(figsize=(13, height))
    for y, (depth, s) in enumerate(rows):
        start = ((s.start_time or 0) - t0) / 1e6
        width = max(((s.end_time or 0) - (s.start_time or 0)) / 1e6, 0.15)
        ax.barh(y, width, left=start, height=0.7, color=COLORS[_kind(s)])
        attrs = s.attributes or {}
        label = s.name
        if _kind(s) == "request":
            reused = "reused" if attrs.get("toolpool.connection.reused") else "new conn."
            status = attrs.get("http.response.status_code")
            version = attrs.get("network.protocol.version")
            stream = attrs.get("toolpool.http2.stream_id")
            where = reused if stream is None else f"stream {stream}, {reused}"
            label = (
                f"{s.name} {attrs.get('toolpool.destination')} → {status} HTTP/{version} ({where})"
            )
        elif s.name == "toolpool.tls" and attrs.get("tls.next_protocol"):
            label = f"{s.name} (ALPN: {attrs['tls.next_protocol']})"
        for event in s.events:  # resends, a request body's end, stream resets: a tick each
            at = (event.timestamp - t0) / 1e6
            ax.plot([at, at], [y - 0.4, y + 0.4], color="black", linewidth=1)
        ax.text(
            -0.44 + 0.02 * depth,
            y,
            label,
            ha="left",
            va="center",
            fontsize=8,
            transform=ax.get_yaxis_transform(),
        )
        ax.text(start + width + 1, y, f"{width:.1f} ms", va="center", fontsize=7, color="#555")
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the agent run started")
    ax.set_title(
        "One AutoGen agent run: 4 parallel tool calls, 2 streams on one HTTP/2 connection"
        if http2
        else "One AutoGen agent run: 4 parallel tool calls on a pool of 2 HTTP/1.1 TLS connections"
    )
    ax.spines[["top", "right", "left"]].set_visible(False)
    legend = [
        Patch(color=COLORS[k], label=k) for k in COLORS if any(_kind(s) == k for _, s in rows)
    ]
    ax.legend(
        handles=legend,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.6 / height - 0.02),
        ncol=5,
        fontsize=8,
        frameon=False,
    )
    fig.subplots_adjust(left=0.3, right=0.95, top=1 - 0.5 / height, bottom=1.3 / height)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def as_json(spans: list[ReadableSpan]) -> list[dict[str, Any]]:
    return [json.loads(s.to_json()) for s in spans]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="PNG to write (default: examples/otel_trace[_http11].png)")
    parser.add_argument("--json", help="also write the spans as JSON")
    parser.add_argument(
        "--http1", action="store_true", help="HTTP/1.1 only (http2=False) instead of HTTP/2"
    )
    args = parser.parse_args()
    http2 = not args.http1
    out = Path(args.out or HERE / ("otel_trace.png" if http2 else "otel_trace_http11.png"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # AutoGen traces through the global provider.
    trace.set_tracer_provider(provider)
    asyncio.run(run(provider, http2))
    spans = list(exporter.get_finished_spans())
    draw(spans, out, http2)
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(spans), indent=1))
    requests = [s for s in spans if _kind(s) == "request"]
    print(f"{len(spans)} spans, {len(requests)} pooled requests; waterfall in {out}")


if __name__ == "__main__":
    main()
