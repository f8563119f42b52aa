"""A raw keep-alive HTTP/1.1 load generator that measures the test bed's own throughput.

``python -m toolpool.testing bench`` runs the server in a child process (as benchmarks do)
and this client in the calling process, so the number it reports is what a benchmark can
expect from the test bed before the client under test becomes the limit.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from toolpool.testing._loop import LoopName, new_event_loop
from toolpool.testing._remote import spawn_downstream
from toolpool.testing._spec import ServiceSpec


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    requests: int
    errors: int
    seconds: float
    requests_per_second: float
    #: requests_total counted by the server for the run (equals ``requests + errors``).
    server_requests: int
    #: CPU seconds the server process used during the run (Linux only, else None).
    server_cpu_seconds: float | None


class _KeepAliveClient(asyncio.Protocol):
    """Sends one request, waits for its response, sends the next, until the deadline."""

    def __init__(self, request: bytes, deadline: float, done: asyncio.Future[None]) -> None:
        self._request = request
        self._deadline = deadline
        self._done = done
        self._buf = b""
        self._transport: asyncio.WriteTransport | None = None
        self.ok = 0
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        assert self._transport is not None
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else end])
            if len(self._buf) < end + 4 + length:
                return
            if self._buf.startswith(b"HTTP/1.1 200"):
                self.ok += 1
            else:
                self.errors += 1
            self._buf = self._buf[end + 4 + length :]
            assert self._transport is not None
            if time.perf_counter() >= self._deadline:
                self._transport.close()
                return
            self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def _load(port: int, connections: int, seconds: float) -> tuple[int, int, float]:
    loop = asyncio.get_running_loop()
    request = b"GET /anything HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Tenant: bench\r\n\r\n"
    started = time.perf_counter()
    clients: list[_KeepAliveClient] = []
    waits: list[asyncio.Future[None]] = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        client = _KeepAliveClient(request, started + seconds, done)
        await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
        clients.append(client)
        waits.append(done)
    await asyncio.gather(*waits)
    elapsed = time.perf_counter() - started
    return sum(c.ok for c in clients), sum(c.errors for c in clients), elapsed


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    *,
    connections: int = 32,
    seconds: float = 5.0,
    server_loop: LoopName = "auto",
    client_loop: LoopName = "auto",
) -> LoadResult:
    """Serve ``/anything`` from a child process and load it from this one for ``seconds``."""
    if connections < 1 or seconds <= 0:
        raise ValueError("connections must be >= 1 and seconds > 0")
    with spawn_downstream({"bench": ServiceSpec(require_auth=False)}, loop=server_loop) as ds:
        port = int(ds.url("bench").rsplit(":", 1)[1])
        cpu_before = _cpu_seconds(ds.pid)
        loop = new_event_loop(client_loop)
        try:
            ok, errors, elapsed = loop.run_until_complete(_load(port, connections, seconds))
        finally:
            loop.close()
        cpu_after = _cpu_seconds(ds.pid)
        served = ds.stats("bench").requests_total
    cpu = None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 3)
    return LoadResult(
        requests=ok,
        errors=errors,
        seconds=round(elapsed, 3),
        requests_per_second=round(ok / elapsed, 1),
        server_requests=served,
        server_cpu_seconds=cpu,
    )


def result_json(result: LoadResult) -> dict[str, Any]:
    return asdict(result)
