"""LatencyRelay: a TCP relay on loopback that behaves like a wire with a one-way delay.

Every chunk is delivered ``one_way`` seconds after it arrived, in order, in both directions
(a queue per direction drained by one timer, so chunks overlap in flight instead of
serialising behind per-chunk sleeps). Loopback connects are free, so the first client bytes of
each connection wait one extra round trip, standing in for the TCP handshake (and the server
sees the connection one way after the client opened it, when its SYN would arrive). EOF, half-close
and resets cross the relay after the same delay. Each client connection gets its own upstream
connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from types import TracebackType
from typing import Literal, cast

from toolpool.testing._loop import LoopName, LoopThread

logger = logging.getLogger("toolpool.testing")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
_LINGER_ZERO = struct.pack("ii", 1, 0)

_DATA, _EOF, _RESET = 0, 1, 2
_Event = tuple[float, int, bytes]


def listen_socket(host: str = "127.0.0.1", backlog: int = 4096) -> socket.socket:
    """A non-blocking listening socket on an ephemeral loopback port."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the test bed only listens on loopback, not {host!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def abort_with_rst(transport: asyncio.Transport) -> None:
    """Abort `transport`'s connection with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass
    transport.abort()


class _Side(asyncio.Protocol):
    """One end of a relayed connection (the accepted client end, or the upstream end)."""

    def __init__(self, relay: LatencyRelay, first_extra: float) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        #: Where what this side reads goes (set once both ends exist).
        self.outbound: _Pipe = _Pipe(relay, first_extra)
        self.peer: _Side | None = None
        self.read_closed = False  # EOF or error received from this side's socket
        self.write_closed = False  # EOF written to this side's socket
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.outbound.push(_DATA, data)

    def eof_received(self) -> bool:
        self.read_closed = True
        self.outbound.push(_EOF)
        self._maybe_close()
        return True  # keep writing the other direction: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.read_closed:
            self.read_closed = True
            self.outbound.push(_RESET if exc is not None else _EOF)
        self.relay._sides.discard(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    # -- delivery from the peer's pipe ---------------------------------------------------

    def deliver(self, kind: int, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        if kind == _DATA:
            if not self.write_closed:
                transport.write(data)
        elif kind == _EOF:
            if not self.write_closed:
                self.write_closed = True
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            self._maybe_close()
        else:
            abort_with_rst(transport)

    def _maybe_close(self) -> None:
        if self.read_closed and self.write_closed and self.transport is not None:
            self.transport.close()


class _Pipe:
    """One direction of a relayed connection: a delay queue drained by a single timer."""

    def __init__(self, relay: LatencyRelay, first_extra: float) -> None:
        self._relay = relay
        self._loop = relay._loop_or_raise()
        self._first_extra = first_extra
        self._queue: collections.deque[_Event] = collections.deque()
        self._last_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.target: _Side | None = None  # None until the upstream connection exists

    def push(self, kind: int, data: bytes = b"") -> None:
        at = self._loop.time() + self._relay.one_way + self._first_extra
        self._first_extra = 0.0
        if at < self._last_at:
            at = self._last_at  # order is preserved even behind the first, longer delay
        self._last_at = at
        self._queue.append((at, kind, data))
        if self._timer is None and self.target is not None:
            self._schedule()

    def attach(self, target: _Side) -> None:
        self.target = target
        if self._queue and self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._timer = None
        target = self.target
        assert target is not None
        now = self._loop.time()
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, kind, data = queue.popleft()
            target.deliver(kind, data)
        if queue:
            self._schedule()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class _ClientSide(_Side):
    """The accepted end; opens its own upstream connection at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay._sides.add(self)
        self.relay.connections_accepted += 1
        task = self.relay._loop_or_raise().create_task(self._connect())
        self.relay._tasks.add(task)
        task.add_done_callback(self.relay._tasks.discard)

    async def _connect(self) -> None:
        relay = self.relay
        upstream = _Side(relay, 0.0)
        # The server hears of the connection when the SYN would arrive, one way after.
        await asyncio.sleep(relay.one_way)
        try:
            await relay._loop_or_raise().create_connection(
                lambda: upstream, relay.target_host, relay.target_port
            )
        except OSError as exc:
            logger.debug("relay: upstream connect failed: %s", exc)
            # The upstream refused: the client sees a reset, one round trip later.
            upstream.read_closed = True
            upstream.lost = True
            upstream.outbound.push(_RESET)
        relay._sides.add(upstream)
        self.peer, upstream.peer = upstream, self
        self.outbound.attach(upstream)
        upstream.outbound.attach(self)


class LatencyRelay:
    """A delaying TCP relay on 127.0.0.1 in front of ``target_host:target_port`` (loopback).

    A fresh plain connection's first response costs at least ``4 * one_way`` (the simulated
    handshake round trip plus the request/response round trip), a reused connection's
    ``2 * one_way``, and TLS at least one more round trip.

    Use it as a context manager (it then runs on its own thread and loop)::

        with LatencyRelay("127.0.0.1", port, one_way=0.025) as relay:
            httpx.get(relay.url() + "/anything")

    or, from code already on an event loop that should host it, with
    ``await relay.start_in_loop()`` / ``await relay.stop_in_loop()``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        one_way: float = 0.025,
        *,
        loop: LoopName = "asyncio",
    ) -> None:
        if target_host not in LOOPBACK_HOSTS:
            raise ValueError(f"LatencyRelay only relays to loopback, not {target_host!r}")
        if not one_way >= 0:
            raise ValueError(f"one_way must be >= 0 seconds, got {one_way!r}")
        self.target_host = target_host
        self.target_port = target_port
        #: The one-way delay, in seconds, added in each direction.
        self.one_way = float(one_way)
        #: Client connections accepted so far.
        self.connections_accepted = 0
        self._loop_name: LoopName = loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._sides: set[_Side] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: LoopThread | None = None

    def __repr__(self) -> str:
        where = "stopped" if self._address is None else f"{self._address[0]}:{self._address[1]}"
        return f"<LatencyRelay {where} -> {self.target_host}:{self.target_port} +{self.one_way}s>"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the relay listens on."""
        if self._address is None:
            raise RuntimeError("the relay is not running; enter it or await start_in_loop()")
        return self._address

    def url(self, scheme: Literal["http", "https"] = "http") -> str:
        """``<scheme>://127.0.0.1:<port>`` of the relay."""
        host, port = self.address
        return f"{scheme}://{host}:{port}"

    def _loop_or_raise(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the relay is not running")
        return self._loop

    # -- running inside an existing loop -------------------------------------------------

    async def start_in_loop(self) -> None:
        """Start listening on the running event loop (which then hosts the relay)."""
        if self._server is not None:
            raise RuntimeError("the relay is already running")
        self._loop = asyncio.get_running_loop()
        sock = listen_socket()
        self._server = await self._loop.create_server(
            lambda: _ClientSide(self, 2 * self.one_way), sock=sock, backlog=4096
        )
        host, port = sock.getsockname()[:2]
        self._address = (host, port)

    async def stop_in_loop(self) -> None:
        """Stop listening and abort every relayed connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for side in list(self._sides):
            side.outbound.cancel()
            if side.transport is not None:
                side.transport.abort()
        self._sides.clear()
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop goes

    # -- running on its own thread -------------------------------------------------------

    def _own_thread(self) -> LoopThread:
        if self._thread is not None:
            raise RuntimeError("a LatencyRelay can be started once")
        self._thread = LoopThread(
            f"toolpool-relay-{self.target_port}",
            self._loop_name,
            self.start_in_loop,
            self.stop_in_loop,
        )
        return self._thread

    def __enter__(self) -> LatencyRelay:
        self._own_thread().start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._thread.stop()

    async def __aenter__(self) -> LatencyRelay:
        await self._own_thread().astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            await self._thread.astop()
