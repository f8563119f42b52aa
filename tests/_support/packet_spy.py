"""Helpers for the egress tests: a spy on every way this process could send a packet to an
address (connects, and DNS lookups), which refuses any non-loopback one *before* it happens,
so a forbidden-address test can never reach the network even when the code under test is
wrong; and the resolver hook names the tests use."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import Any

from toolpool.testing import HostMap

#: Names the system resolver may answer in tests (no DNS query leaves for them).
LOCAL_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    text = host.strip("[]").split("%", 1)[0]
    if text.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


class PacketSpy:
    """Records every outgoing connect (asyncio and socket level) and every system resolver
    lookup of this process; refuses non-loopback ones before they happen (the attempt is
    recorded in `refused`, so a test that trips it fails on it)."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []
        self.lookups: list[str] = []
        self.refused: list[str] = []
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return len(self.connects), len(self.lookups)

    def connects_since(self, mark: tuple[int, int]) -> list[tuple[str, int]]:
        with self._lock:
            return self.connects[mark[0] :]

    def lookups_since(self, mark: tuple[int, int]) -> list[str]:
        with self._lock:
            return self.lookups[mark[1] :]

    @contextlib.contextmanager
    def installed(self) -> Iterator[PacketSpy]:
        spy = self
        create_connection = asyncio.BaseEventLoop.create_connection
        sock_connect = socket.socket.connect
        sock_connect_ex = socket.socket.connect_ex
        getaddrinfo = socket.getaddrinfo

        async def spied_create_connection(
            self: Any, protocol_factory: Any, host: Any = None, port: Any = None, *a: Any, **kw: Any
        ) -> Any:
            # With sock=, its connect went through socket.connect (recorded there).
            if kw.get("sock") is None:
                spy._connect(str(host), int(port or 0))
            return await create_connection(self, protocol_factory, host, port, *a, **kw)

        def spied_connect(self: socket.socket, address: Any) -> Any:
            if isinstance(address, tuple):
                spy._connect(str(address[0]), int(address[1]))
            return sock_connect(self, address)

        def spied_connect_ex(self: socket.socket, address: Any) -> Any:
            if isinstance(address, tuple):
                spy._connect(str(address[0]), int(address[1]))
            return sock_connect_ex(self, address)

        def spied_getaddrinfo(host: Any, *a: Any, **kw: Any) -> Any:
            name = host.decode() if isinstance(host, bytes) else str(host)
            with spy._lock:
                spy.lookups.append(name)
            # A literal address is converted without any packet; a name could query DNS.
            if host is not None and not is_loopback(name) and not is_address(name):
                with spy._lock:
                    spy.refused.append(f"lookup {name}")
                raise socket.gaierror(socket.EAI_NONAME, f"test guard: no DNS for {name!r}")
            return getaddrinfo(host, *a, **kw)

        asyncio.BaseEventLoop.create_connection = spied_create_connection  # type: ignore[method-assign]
        socket.socket.connect = spied_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = spied_connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = spied_getaddrinfo
        try:
            yield self
        finally:
            asyncio.BaseEventLoop.create_connection = create_connection  # type: ignore[method-assign]
            socket.socket.connect = sock_connect  # type: ignore[method-assign]
            socket.socket.connect_ex = sock_connect_ex  # type: ignore[method-assign]
            socket.getaddrinfo = getaddrinfo

    def _connect(self, host: str, port: int) -> None:
        with self._lock:
            self.connects.append((host, port))
        if not is_loopback(host):
            with self._lock:
                self.refused.append(f"connect {host}:{port}")
            raise OSError(f"test guard: refused a connect to non-loopback {host}:{port}")


def hostmap() -> HostMap:
    """The test-only names: `ok.test` (the loopback address the test bed listens on),
    `evil.test` (127.0.0.2: loopback, but denied by the tests' policy), `imds.test` (the
    metadata address: never connectable, the spy stops it if the policy did not)."""
    return HostMap(
        {
            "ok.test": "127.0.0.1",
            "evil.test": "127.0.0.2",
            "imds.test": "169.254.169.254",
            "imds6.test": "fd00:ec2::254",
        }
    )
