"""MCP storm: N agents (tenants) x P parallel MCP tool calls, with and without toolpool.

Without toolpool every tool call does what agent frameworks' MCP clients do: a new httpx
client, a new MCP session (initialize, notifications/initialized, on a stateful server a GET
event stream), the call, then DELETE and close. With toolpool the calls go through
`toolpool.mcp.McpSessions` on a `Pool`: one initialized session per (server, tenant), reused.

The MCP server is a real FastMCP server (the `mcp` package) under uvicorn in a child process
on 127.0.0.1 (stateful: FastMCP's defaults; stateless: `stateless_http=True`, JSON answers);
it counts TCP connections (distinct client ports) and `initialize` requests, read at the end
of each run. Reported per mode: tool-call latency p50 / p99, MCP sessions initialized per
minute in the steady state (after every agent's first round), sessions and connections
opened in all, failures; each cell repeated, median [min-max].

    python benchmarks/mcp_storm.py --agents 8 --parallel 5 --rounds 10 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

import toolpool
from toolpool.auth import Bearer
from toolpool.mcp import McpServer, McpSessions

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- the server


def serve(port: int, stateful: bool) -> None:
    """The child process: FastMCP with one tool, counting connections and sessions."""
    import uvicorn
    from mcp.server.fastmcp import FastMCP

    server = FastMCP(
        "bench", log_level="CRITICAL", stateless_http=not stateful, json_response=not stateful
    )

    @server.tool()
    async def lookup(key: str, delay: float = 0.01) -> str:
        """Look a key up (takes `delay` seconds)."""
        await asyncio.sleep(delay)
        return f"value-of-{key}"

    app = server.streamable_http_app()
    ports: set[int] = set()
    counts = {"initialize": 0, "requests": 0}

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if scope["path"] == "/__stats":
            body = json.dumps({"connections": len(ports), **counts}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        ports.add(scope["client"][1])
        counts["requests"] += 1
        if scope["method"] != "POST":
            await app(scope, receive, send)
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if b'"method":"initialize"' in body.replace(b" ", b""):
            counts["initialize"] += 1
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        await app(scope, replay, send)

    uvicorn.run(counting, host=HOST, port=port, log_level="critical", timeout_keep_alive=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, stateful: bool) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port)]
            + (["--stateful"] if stateful else []),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.url = f"http://{HOST}:{self.port}/mcp"
        self.origin = f"http://{HOST}:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.origin}/__stats", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the MCP server did not start"
                time.sleep(0.1)

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.origin}/__stats", timeout=10).json())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# ---------------------------------------------------------------------------- the clients


async def _unpooled_call(url: str, tenant: str, key: str) -> None:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    headers = {"authorization": f"Bearer t-{tenant}"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as client,
        streamable_http_client(url, http_client=client) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool("lookup", {"key": key})
        if result.isError:
            raise RuntimeError(str(result.content))


async def run_once(
    mode: str, server: ServerProcess, agents: int, parallel: int, rounds: int, cap: int
) -> dict[str, Any]:
    before = server.stats()
    latencies: list[float] = []
    failures = 0
    pool: toolpool.Pool | None = None
    sessions: McpSessions | None = None
    if mode == "toolpool":
        dest = toolpool.Destination(
            "mcp", server.origin, auth=Bearer(lambda c: f"t-{c.tenant}"), max_connections=cap
        )
        pool = toolpool.Pool([dest], warmup=0)
        await pool.astart()
        sessions = McpSessions(pool)
    mcp_server = McpServer(server.url)

    async def call(tenant: str, key: str) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            if sessions is not None:
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    result = await sessions.call_tool(mcp_server, "lookup", {"key": key})
                if result.isError:
                    raise RuntimeError(str(result.content))
            else:
                await _unpooled_call(server.url, tenant, key)
        except Exception:
            failures += 1
            return
        latencies.append(time.perf_counter() - started)

    async def agent(i: int, first: int, last: int) -> None:
        for r in range(first, last):
            await asyncio.gather(*(call(f"tenant{i}", f"k{r}-{p}") for p in range(parallel)))

    peak = {"connections": 0, "streams": 0}
    sampling = True

    async def sample() -> None:
        # Connections the pool held at once (in use, opening), and event streams among them.
        while sampling and pool is not None:
            st = pool.stats()["mcp"]
            peak["connections"] = max(peak["connections"], st.in_use + st.opening)
            peak["streams"] = max(peak["streams"], st.streams)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    # The first round opens whatever a client opens; the rest is the steady state.
    await asyncio.gather(*(agent(i, 0, 1) for i in range(agents)))
    warm = server.stats()
    steady_started = time.perf_counter()
    await asyncio.gather(*(agent(i, 1, rounds) for i in range(agents)))
    steady = time.perf_counter() - steady_started
    elapsed = time.perf_counter() - started
    sampling = False
    await sampler
    if sessions is not None and pool is not None:
        await sessions.aclose()
        await pool.aclose()
    after = server.stats()
    latencies.sort()
    initialized = after["initialize"] - before["initialize"]
    return {
        "calls": agents * parallel * rounds,
        "seconds": elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "sessions": initialized,
        # MCP sessions initialized per minute after the first round (goal: none left, as
        # every (server, tenant) has its session by then).
        "sessions_per_min": (after["initialize"] - warm["initialize"]) / steady * 60,
        "connections": after["connections"] - before["connections"],
        "failures": failures,
        "peak_connections": peak["connections"] if pool is not None else None,
        "peak_streams": peak["streams"] if pool is not None else None,
    }


def _cell(values: list[float], fmt: str = "{:.0f}") -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def _peak(runs: list[dict[str, Any]]) -> str:
    if runs[0]["peak_connections"] is None:
        return "-"
    conns = _cell([r["peak_connections"] for r in runs])
    return f"{conns} ({_cell([r['peak_streams'] for r in runs])})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stateful", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cap", type=int, default=32, help="toolpool max_connections")
    parser.add_argument("--json", help="write the raw runs here")
    parser.add_argument("--modes", default="unpooled,toolpool", help="clients to run")
    parser.add_argument("--servers", default="stateful,stateless", help="servers to run")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.stateful)
        return
    raw: list[dict[str, Any]] = []
    print(
        f"{args.agents} agents x {args.parallel} parallel calls x {args.rounds} rounds, "
        f"toolpool cap {args.cap}, {args.repeat} repetitions"
    )
    print(
        "| server | client | p50 ms | p99 ms | steady sessions/min | sessions | connections "
        "| failures | peak connections (streams) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.servers.split(","):
        for mode in args.modes.split(","):
            runs = []
            for _ in range(args.repeat):
                server = ServerProcess(kind == "stateful")  # fresh: no state carried over
                try:
                    shape = (args.agents, args.parallel, args.rounds, args.cap)
                    runs.append(asyncio.run(run_once(mode, server, *shape)))
                finally:
                    server.stop()
            raw += [{"server": kind, "mode": mode, **r} for r in runs]
            print(
                f"| {kind} | {mode} | {_cell([r['p50_ms'] for r in runs], '{:.1f}')} "
                f"| {_cell([r['p99_ms'] for r in runs], '{:.1f}')} "
                f"| {_cell([r['sessions_per_min'] for r in runs])} "
                f"| {_cell([r['sessions'] for r in runs])} "
                f"| {_cell([r['connections'] for r in runs])} "
                f"| {_cell([r['failures'] for r in runs])} "
                f"| {_peak(runs)} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(raw, out, indent=1)


if __name__ == "__main__":
    main()
