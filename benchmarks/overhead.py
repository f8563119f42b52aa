"""Per-request overhead of toolpool against other HTTP clients, on a loopback server.

The server (toolpool.testing, uvloop) runs in another process, so this process's CPU time is
the client's alone. For each concurrency level, plain HTTP and TLS, every client runs the same
closed loop (N tasks each sending GET /anything back to back for a fixed time) and we record
requests/s, errors and client CPU per request. Ratios are taken within one run.

    python benchmarks/overhead.py --repeat 3 --json benchmarks/out/overhead.json

Clients:
  httpx-default   httpx.AsyncClient() with its own (httpcore) pool, default limits
  httpx+toolpool  httpx.AsyncClient(transport=toolpool.AsyncTransport(pool)), default policy
  httpx+toolpool-nopolicy  the same with Pool(policy=None): the core transport alone, without
                  the resilience layer (retries, breaker, adaptive limit, admission counting)
  toolpool-lean   await pool.request(...): the pool without httpx's client layer (default policy),
                  on HTTP/1.1 (`http2=False`; `toolpool-lean-h2`: the same on HTTP/2)
  httpx-null      httpx.AsyncClient on a transport that answers at once without any I/O: the
                  ceiling httpx's client layer alone allows (not a client one can use)
  aiohttp         aiohttp.ClientSession(connector=TCPConnector(limit=100))
  httpx-h2        httpx.AsyncClient(http2=True): one shared client, httpx's own HTTP/2 (TLS)
  httpx+toolpool-h2  the toolpool client on Pool(http2=True): a connection per tenant, the
                  cap (100) counted in streams (TLS; plain stays HTTP/1.1)
`--tenants N` spreads the closed loop's workers over N auth contexts (worker i acts for tenant
i mod N; httpx and aiohttp ignore it and share their connections across tenants):

    python benchmarks/overhead.py --tls tls --concurrency 1,100 --tenants 10 \
        --clients httpx-h2,httpx+toolpool-h2,httpx+toolpool
  <toolpool client>+otel-api  the same pool under toolpool.otel.instrument() with only the
                  OpenTelemetry API (no SDK configured: non-recording spans, no-op meter)
  <toolpool client>+otel-sdk  instrumented with the SDK: every span recorded and handed to a
                  BatchSpanProcessor (its exporter drops them), metrics into an SDK meter
                  (+otel-sdk-traces / +otel-sdk-metrics: only one of the two)
The toolpool clients without a suffix are the pool with tracing off (not instrumented).
`--otel-hooks` measures what the off path costs per request (the drivers' probe and
observer tests) with timeit instead.
All pools are capped at 100 connections.

`--parsers` measures the HTTP/1.1 response parsers alone instead (issue 16): the codec the
checkout ships (`toolpool._http11.ResponseParser`), h11 (httpcore's parser), llhttp through
httptools with no work in its callbacks, and with `--baseline FILE` another version of the
codec (an `_http11.py` from another commit), interleaved in the same run:

    git show f6e6065:packages/core/toolpool/_http11.py > /tmp/http11_before.py
    python benchmarks/overhead.py --parsers --repeat 15 --baseline /tmp/http11_before.py
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import ssl
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

import toolpool
from toolpool.testing import ServiceSpec, spawn_downstream

Send = Callable[[], Awaitable[None]]
CLIENTS = ("httpx-default", "httpx+toolpool", "httpx+toolpool-nopolicy", "toolpool-lean", "aiohttp")


async def _closed_loop(
    send: Send, concurrency: int, seconds: float, tenants: int = 1
) -> tuple[int, int]:
    done = 0
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done, errors
        ctx = toolpool.AuthContext(tenant=f"tenant-{i % tenants}") if tenants > 1 else None
        with toolpool.auth_context(ctx):
            while time.perf_counter() < deadline:
                try:
                    await send()
                    done += 1
                except Exception:
                    errors += 1

    await asyncio.gather(*[worker(i) for i in range(concurrency)])
    return done, errors


async def _run_client(
    name: str,
    url: str,
    sslctx: ssl.SSLContext | None,
    ca_path: str | None,
    concurrency: int,
    seconds: float,
    tenants: int = 1,
) -> dict[str, Any]:
    target = url + "/anything"
    cleanup: Callable[[], Awaitable[None]]
    if name in ("httpx-default", "httpx-h2"):
        client = httpx.AsyncClient(
            verify=sslctx if sslctx is not None else True, http2=name == "httpx-h2"
        )

        async def send() -> None:
            r = await client.get(target)
            r.raise_for_status()

        cleanup = client.aclose
    elif name == "httpx-null":

        class NullTransport(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                return httpx.Response(200, content=b'{"ok":true}')

        null = httpx.AsyncClient(transport=NullTransport())

        async def send() -> None:
            (await null.get(target)).raise_for_status()

        cleanup = null.aclose
    elif name.split("+otel")[0] in ("toolpool-lean", "toolpool-lean-h2"):
        lean = toolpool.Pool(
            [toolpool.Destination("api", url, max_connections=100, verify=ca_path or True)],
            queue_factor=4,
            warmup=0,
            http2="-h2" in name,  # the rows before HTTP/2 became the default are HTTP/1.1's
        )
        stop_otel = _instrument(lean, name)
        await lean.astart()

        async def send() -> None:
            (await lean.request("GET", target)).raise_for_status()

        async def cleanup() -> None:
            await lean.aclose()
            stop_otel()
    elif name.startswith("httpx+toolpool"):
        pool = toolpool.Pool(
            [toolpool.Destination("api", url, max_connections=100, verify=ca_path or True)],
            queue_factor=4,
            warmup=0,
            http2="-h2" in name,
            **({"policy": None} if "nopolicy" in name else {}),
        )
        stop = _instrument(pool, name)
        await pool.astart()
        client = pool.client()

        async def send() -> None:
            r = await client.get(target)
            r.raise_for_status()

        async def cleanup() -> None:
            await client.aclose()
            await pool.aclose()
            stop()
    elif name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, ssl=sslctx if sslctx is not None else True)
        )

        async def send() -> None:
            async with session.get(target) as r:
                await r.read()
                r.raise_for_status()

        cleanup = session.close
    else:
        raise SystemExit(f"unknown client {name!r}")
    try:
        await _closed_loop(send, min(concurrency, 20), 0.3, tenants)  # warm connections, caches
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        done, errors = await _closed_loop(send, concurrency, seconds, tenants)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    finally:
        await cleanup()
    return {
        "client": name,
        "tenants": tenants,
        "concurrency": concurrency,
        "requests_per_s": done / wall,
        "errors": errors,
        "cpu_us_per_request": 1e6 * cpu / max(done, 1),
    }


def _instrument(pool: toolpool.Pool, name: str) -> Callable[[], None]:
    """toolpool.otel for the "+otel-api" / "+otel-sdk" clients; returns how to undo it."""
    if "+otel" not in name:
        return lambda: None
    import toolpool.otel

    if name.endswith("+otel-api"):
        from opentelemetry.metrics import NoOpMeterProvider
        from opentelemetry.trace import NoOpTracerProvider

        toolpool.otel.instrument(
            pool, tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider()
        )
        return lambda: None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    disabled = os.environ.pop("OTEL_SDK_DISABLED", None)  # the Makefile's safety default
    try:
        tracer_provider = TracerProvider()
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    finally:
        if disabled is not None:
            os.environ["OTEL_SDK_DISABLED"] = disabled
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    toolpool.otel.instrument(
        pool,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        traces=not name.endswith("-metrics"),
        metrics=not name.endswith("-traces"),
    )

    def stop() -> None:
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return stop


def hook_cost(repeat: int) -> str:
    """ns per request that the tracing hooks cost when off: the tests the drivers and the
    state machine make per request (probe twice in send, observer for wait and use)."""
    import timeit

    pool = toolpool.Pool([toolpool.Destination("api", "http://127.0.0.1:9")])
    dest = pool.destination("api")
    state = dest.state

    def off_path() -> None:
        probe = dest.probe
        if probe is not None:
            raise AssertionError
        if probe is not None:
            raise AssertionError
        if state.observer is not None:
            raise AssertionError
        if state.observer is not None:
            raise AssertionError

    def empty() -> None:
        pass

    n = 1_000_000
    runs = []
    for _ in range(repeat):
        hooks = min(timeit.repeat(off_path, number=n, repeat=5)) / n
        base = min(timeit.repeat(empty, number=n, repeat=5)) / n
        runs.append((hooks - base) * 1e9)
    return (
        f"tracing off, hook tests per request: {statistics.median(runs):.1f} ns "
        f"[{min(runs):.1f}-{max(runs):.1f}] (median of {repeat}, call overhead subtracted)"
    )


_PARSER_INPUTS = {
    "small (CL, 120 B)": (
        b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 03:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-type: application/json\r\ncontent-length: 120\r\n\r\n" + b"x" * 120
    ),
    "chunked (8 x 1 KiB)": (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"400\r\n"
        + b"y" * 1024
        + b"\r\n"
    )
    * 1
    + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 7
    + b"0\r\n\r\n",
    "large (CL, 256 KiB in 64 KiB reads)": b"HTTP/1.1 200 OK\r\ncontent-length: 262144\r\n\r\n"
    + b"z" * 262144,
}


_CONNECTION_PARSERS: dict[Any, Any] = {}


def _parse_toolpool(raw: bytes, reads: list[bytes], codec: Any = None) -> None:
    # One parser per connection, `start()` per response: as the drivers use it.
    parser = _CONNECTION_PARSERS.get(codec)
    if parser is None:
        if codec is None:
            from toolpool import _http11 as default_codec

            parser = default_codec.ResponseParser()
        else:
            parser = codec.ResponseParser()
        _CONNECTION_PARSERS[codec] = parser
    parser.start(False)
    for data in reads:
        parser.feed(data)
        parser.take_body()
    assert parser.complete


def _parse_h11(raw: bytes, reads: list[bytes]) -> None:
    import h11

    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    for data in reads:
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or type(event) is h11.EndOfMessage:
                break
    assert conn.their_state is h11.DONE


class _Sink:
    __slots__ = ("body", "done", "headers")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _parse_httptools(raw: bytes, reads: list[bytes]) -> None:
    import httptools

    sink = _Sink()
    parser = httptools.HttpResponseParser(sink)
    for data in reads:
        parser.feed_data(data)
    assert sink.done


PARSERS = {"toolpool": _parse_toolpool, "h11": _parse_h11, "httptools-raw": _parse_httptools}


def parser_bench(repeat: int, baseline: str | None) -> str:
    """Microseconds per response for each parser and input: median [min-max] of `repeat`."""
    import importlib.util
    from functools import partial

    parsers: dict[str, Callable[[bytes, list[bytes]], None]] = dict(PARSERS)
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_http11", baseline)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parsers["baseline"] = partial(_parse_toolpool, codec=module)
    names = list(parsers)
    lines = [
        f"response parsers, µs per response, median [min-max] of {repeat}"
        + (f"; baseline codec: {baseline}" if baseline else ""),
        "",
        f"| input | {' | '.join(names)} | h11 ÷ toolpool |"
        + (" toolpool ÷ baseline (min) |" if baseline else ""),
        "|---|" + "---|" * (len(names) + 1 + bool(baseline)),
    ]
    for label, raw in _PARSER_INPUTS.items():
        reads = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
        n = 200 if len(raw) > 100_000 else 5000
        cells: dict[str, list[float]] = {}
        for parse in parsers.values():  # warm-up: imports, caches, the allocator's heap
            for _ in range(10):
                parse(raw, reads)
        for _ in range(repeat):
            for name, parse in parsers.items():
                gc.collect()
                start = time.perf_counter()
                for _ in range(n):
                    parse(raw, reads)
                cells.setdefault(name, []).append(1e6 * (time.perf_counter() - start) / n)
        med = {k: statistics.median(v) for k, v in cells.items()}
        row = [f"{med[k]:.1f} [{min(v):.1f}-{max(v):.1f}]" for k, v in cells.items()]
        line = f"| {label} | {' | '.join(row)} | {med['h11'] / med['toolpool']:.1f} |"
        if baseline:
            line += f" {min(cells['toolpool']) / min(cells['baseline']):.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,10,100,400")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per cell")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tls", choices=["both", "plain", "tls"], default="both")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tenants", default="1", help="auth contexts, e.g. 1,10")
    parser.add_argument("--otel-hooks", action="store_true", help="time the off path only")
    parser.add_argument("--parsers", action="store_true", help="measure the parsers alone")
    parser.add_argument("--baseline", help="with --parsers: another _http11.py to compare")
    args = parser.parse_args()
    if args.otel_hooks:
        print(hook_cost(args.repeat))
        return
    if args.parsers:
        print(parser_bench(args.repeat, args.baseline))
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    clients = args.clients.split(",")
    modes = ["plain", "tls"] if args.tls == "both" else [args.tls]
    tenant_levels = [int(t) for t in args.tenants.split(",")]
    rows: list[dict[str, Any]] = []
    for mode in modes:
        with spawn_downstream({"api": ServiceSpec(require_auth=False)}, tls=mode == "tls") as ds:
            sslctx = ds.client_ssl_context() if mode == "tls" else None
            ca_path = ds.ca_pem_path if mode == "tls" else None
            for level in levels:
                for tenants in tenant_levels:
                    for rep in range(args.repeat):
                        for name in clients:
                            row = asyncio.run(
                                _run_client(
                                    name,
                                    ds.url("api"),
                                    sslctx,
                                    ca_path,
                                    level,
                                    args.seconds,
                                    tenants,
                                )
                            )
                            row.update(mode=mode, repeat=rep)
                            rows.append(row)
                            print(
                                f"{mode:5} c={level:<4} t={tenants:<3} {name:15} "
                                f"{row['requests_per_s']:9.0f} req/s "
                                f"{row['cpu_us_per_request']:7.1f} us cpu/req "
                                f"errors={row['errors']}",
                                file=sys.stderr,
                            )
    summary = summarize(rows)
    print(render(summary, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and spread per (mode, concurrency, client), plus ratios against the others."""
    cells: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["mode"], row["concurrency"], row.get("tenants", 1), row["client"])
        cells.setdefault(key, []).append(row)
    out = []
    for (mode, level, tenants, name), runs in cells.items():
        rates = [r["requests_per_s"] for r in runs]
        out.append(
            {
                "mode": mode,
                "concurrency": level,
                "tenants": tenants,
                "client": name,
                "rps_median": statistics.median(rates),
                "rps_min": min(rates),
                "rps_max": max(rates),
                "cpu_us_median": statistics.median(r["cpu_us_per_request"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
            }
        )
    by = {(c["mode"], c["concurrency"], c["tenants"], c["client"]): c for c in out}
    for cell in out:
        where = (cell["mode"], cell["concurrency"], cell["tenants"])
        base_name = cell["client"].split("+otel")[0]
        if base_name != cell["client"]:
            off = by.get((*where, base_name))
            if off and off["rps_median"]:
                cell["vs_tracing_off"] = cell["rps_median"] / off["rps_median"]
                cell["cpu_us_added"] = cell["cpu_us_median"] - off["cpu_us_median"]
        for other in ("httpx-default", "aiohttp", "httpx-h2"):
            base = by.get((*where, other))
            if base and other != cell["client"] and base["rps_median"]:
                cell[f"vs_{other}"] = cell["rps_median"] / base["rps_median"]
    return out


def render(summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"overhead benchmark, {os.cpu_count()} cores, {args.seconds} s per cell, "
        f"repeat {args.repeat} (median [min-max])",
        "",
        "| mode | conc. | tenants | client | req/s | client CPU µs/req | errors "
        "| × httpx-default | × aiohttp | × httpx-h2 | × tracing off | CPU µs added |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(summary, key=lambda c: (c["mode"], c["concurrency"], c["tenants"], c["client"]))
    for c in order:
        ratio_h = c.get("vs_httpx-default")
        ratio_2 = c.get("vs_httpx-h2")
        ratio_a = c.get("vs_aiohttp")
        ratio_o = c.get("vs_tracing_off")
        added = c.get("cpu_us_added")
        lines.append(
            f"| {c['mode']} | {c['concurrency']} | {c['tenants']} | {c['client']} "
            f"| {c['rps_median']:.0f} "
            f"[{c['rps_min']:.0f}-{c['rps_max']:.0f}] | {c['cpu_us_median']:.0f} | {c['errors']} "
            f"| {'' if ratio_h is None else f'{ratio_h:.2f}'} "
            f"| {'' if ratio_a is None else f'{ratio_a:.2f}'} "
            f"| {'' if ratio_2 is None else f'{ratio_2:.2f}'} "
            f"| {'' if ratio_o is None else f'{ratio_o:.2f}'} "
            f"| {'' if added is None else f'{added:+.0f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
