"""WatchedStream reports the end of a call once: read, closed, or dropped unread."""

from __future__ import annotations

import gc
import threading

import httpx

import toolpool
from toolpool._watched import WatchedStream


def test_reports_once_when_read_closed_or_dropped() -> None:
    calls: list[str] = []
    dropped = threading.Event()
    with toolpool.Pool() as pool:
        read = WatchedStream(httpx.ByteStream(b"body"), lambda: calls.append("read"), pool)
        assert b"".join(read) == b"body"
        read.close()  # a second end of the same call: not reported again
        closed = WatchedStream(httpx.ByteStream(b"x"), lambda: calls.append("closed"), pool)
        closed.close()
        WatchedStream(httpx.ByteStream(b"never read"), dropped.set, pool)
        gc.collect()
        # Reported from the pool's maintenance thread, not from the finalizer itself.
        assert dropped.wait(10)
    assert calls == ["read", "closed"]
