"""The pool's own thread: timers (idle TTL, lifetime, health checks), graceful closes of
blocking sockets, and cleanup of responses dropped without being closed.

One thread per pool, owned by it: started on first use or on enter, stopped and joined on
close. It never runs request work, so a slow peer cannot stall it for long: every close it
waits on has a deadline.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Maintenance"]

log = logging.getLogger("toolpool.pool")

monotonic = time.monotonic
# How long a graceful close waits for the peer's side before the socket is just closed.
CLOSE_GRACE = 2.0


class _Closing:
    __slots__ = ("deadline", "done", "sock")

    def __init__(self, sock: socket.socket, done: Callable[[], None], deadline: float) -> None:
        self.sock = sock
        self.done = done
        self.deadline = deadline


class Maintenance:
    """Runs `tick(now) -> seconds until next tick` periodically, plus queued calls."""

    def __init__(self, tick: Callable[[float], float], name: str = "toolpool-maintenance") -> None:
        self._tick = tick
        self._selector = selectors.DefaultSelector()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._selector.register(self._rsock, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._closing: dict[int, _Closing] = {}
        self._stopping = False
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = CLOSE_GRACE + 3.0) -> None:
        """Finish pending closes (each within its deadline), then end the thread."""
        self._stopping = True
        self.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def wake(self) -> None:
        try:
            self._wsock.send(b"\0")
        except OSError:  # buffer full (already woken) or closed (stopped)
            pass

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the maintenance thread (thread-safe)."""
        if self.stopped:
            fn()
            return
        self._calls.append(fn)
        self.wake()

    def close_gracefully(self, sock: socket.socket, done: Callable[[], None]) -> None:
        """Half-close `sock`, wait for the peer's close (bounded), close it, call `done`."""
        if self.stopped:
            _close_now(sock)
            done()
            return
        self.call_soon(lambda: self._begin_close(sock, done))

    # ------------------------------------------------------------------ thread body

    def _run(self) -> None:
        next_tick = monotonic()
        try:
            while True:
                now = monotonic()
                if now >= next_tick and not self._stopping:
                    try:
                        next_tick = now + self._tick(now)
                    except Exception:
                        log.exception("toolpool maintenance tick failed")
                        next_tick = now + 1.0
                timeout = max(0.0, next_tick - now)
                for closing in self._closing.values():
                    timeout = min(timeout, max(0.0, closing.deadline - now))
                if self._stopping:
                    timeout = min(timeout, 0.05)
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        try:
                            while self._rsock.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._progress(key.data)
                while self._calls:
                    try:
                        self._calls.popleft()()
                    except Exception:
                        log.exception("toolpool maintenance call failed")
                now = monotonic()
                for closing in [c for c in self._closing.values() if c.deadline <= now]:
                    self._finish(closing)
                if self._stopping and not self._closing and not self._calls:
                    break
        finally:
            self.stopped = True
            for closing in list(self._closing.values()):
                self._finish(closing)
            while self._calls:
                try:
                    self._calls.popleft()()
                except Exception:
                    log.exception("toolpool maintenance call failed")
            self._selector.close()
            self._rsock.close()
            self._wsock.close()

    def _begin_close(self, sock: socket.socket, done: Callable[[], None]) -> None:
        closing = _Closing(sock, done, monotonic() + CLOSE_GRACE)
        try:
            sock.setblocking(False)
            if isinstance(sock, ssl.SSLSocket):
                sock.unwrap()  # our close_notify; finishing needs the peer's
                self._finish(closing)
                return
            sock.shutdown(socket.SHUT_WR)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (OSError, ValueError):
            self._finish(closing)
            return
        try:
            self._selector.register(sock, selectors.EVENT_READ, closing)
        except (OSError, ValueError):
            self._finish(closing)
            return
        self._closing[sock.fileno()] = closing

    def _progress(self, closing: _Closing) -> None:
        """The closing socket is readable: the peer's close arrived, or leftover bytes."""
        sock = closing.sock
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.unwrap()
            elif sock.recv(65536):
                return  # leftover response bytes; keep draining until EOF
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except (OSError, ValueError):
            pass
        self._finish(closing)

    def _finish(self, closing: _Closing) -> None:
        sock = closing.sock
        try:
            fd = sock.fileno()
        except (OSError, ValueError):
            fd = -1
        if self._closing.get(fd) is closing:
            del self._closing[fd]
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
        _close_now(sock)
        try:
            closing.done()
        except Exception:
            log.exception("toolpool close callback failed")


def _close_now(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
