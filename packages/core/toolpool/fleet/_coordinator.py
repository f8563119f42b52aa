"""The connection to Redis shared by the fleet's parts (leases, rate limits, tokens): one
client per event loop (plus one for threads), every command bounded by `op_timeout`, and the
coordinator's health: up or down, logged once per transition, exposed as
`toolpool_fleet_coordinator_up`.

Nothing here waits for Redis longer than `op_timeout`: a slow or unreachable Redis is a
failed call (`CoordinatorDown`), and each part has its own fallback (leases: the last lease,
then the static share; rate limits: a local bucket at rate / replicas; tokens: a local fetch).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from toolpool.errors import ConfigError

__all__ = ["Coordinator", "CoordinatorDown"]

log = logging.getLogger("toolpool.fleet")

monotonic = time.monotonic

T = TypeVar("T")


class CoordinatorDown(Exception):
    """Redis did not answer within `op_timeout` (or refused): the caller falls back."""


def _redis_module() -> Any:
    try:
        import redis
        import redis.asyncio
        import redis.asyncio.retry
        import redis.backoff
        import redis.retry
    except ImportError:  # pragma: no cover - the fleet extra is missing
        raise ConfigError(
            "fleet-wide limits need the redis package: pip install 'toolpool[fleet]'"
        ) from None
    return redis


class Coordinator:
    """A Redis URL, its clients and its health (see the module docstring)."""

    def __init__(
        self, url: str, *, namespace: str, op_timeout: float, probe_interval: float
    ) -> None:
        self._redis = _redis_module()
        self.url = url
        self.namespace = namespace
        self.op_timeout = op_timeout
        self.probe_interval = probe_interval
        self._next_probe = 0.0
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}
        self._sync_client: Any = None
        self._lock = threading.Lock()
        self.up = True
        self.down_since: float | None = None
        self.failures_total = 0
        self._listeners: list[Callable[[bool], None]] = []
        # A key derived from the namespace names keys only; secrets are keyed elsewhere.
        self._prefix = f"toolpool:{namespace}"

    def __repr__(self) -> str:
        return f"<toolpool.fleet.Coordinator {_redacted(self.url)} up={self.up}>"

    def key(self, *parts: str) -> str:
        """A Redis key in this fleet's namespace."""
        return ":".join((self._prefix, *parts))

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(up)` on every transition (from whichever thread saw it)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ clients

    def _options(self, asyncio_client: bool) -> dict[str, Any]:
        retry_mod = self._redis.asyncio.retry if asyncio_client else self._redis.retry
        backoff = self._redis.backoff
        return {
            "socket_timeout": self.op_timeout,
            "socket_connect_timeout": self.op_timeout,
            # One attempt per call: a retry loop inside the client would outlast op_timeout.
            "retry": retry_mod.Retry(backoff.NoBackoff(), 0),
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }

    def async_client(self) -> Any:
        """The asyncio client of the running loop (created on first use)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            with self._lock:
                for old in [lp for lp in self._clients if lp.is_closed()]:
                    del self._clients[old]
                client = self._clients.get(loop)
                if client is None:
                    client = self._redis.asyncio.Redis.from_url(self.url, **self._options(True))
                    self._clients[loop] = client
        return client

    def sync_client(self) -> Any:
        """The thread-safe blocking client (its own connection pool)."""
        client = self._sync_client
        if client is None:
            with self._lock:
                if self._sync_client is None:
                    self._sync_client = self._redis.Redis.from_url(self.url, **self._options(False))
                client = self._sync_client
        return client

    def _skip(self) -> bool:
        """While down, only one call per `probe_interval` tries Redis (the others fall back
        at once instead of each waiting out `op_timeout` on a Redis that does not answer)."""
        if self.up:
            return False
        now = monotonic()
        with self._lock:
            if now < self._next_probe:
                return True
            self._next_probe = now + self.probe_interval
        return False

    async def run(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """`await call(client)` bounded by `op_timeout`; `CoordinatorDown` on any failure."""
        if self._skip():
            raise CoordinatorDown("down")
        try:
            client = self.async_client()
            result = await asyncio.wait_for(call(client), self.op_timeout)
        except (TimeoutError, OSError, self._redis.RedisError) as exc:
            self._failed(exc)
            raise CoordinatorDown(type(exc).__name__) from None
        self._succeeded()
        return result

    def run_sync(self, call: Callable[[Any], T]) -> T:
        """`call(client)` on the blocking client (bounded by the socket timeouts)."""
        if self._skip():
            raise CoordinatorDown("down")
        try:
            result = call(self.sync_client())
        except (TimeoutError, OSError, self._redis.RedisError) as exc:
            self._failed(exc)
            raise CoordinatorDown(type(exc).__name__) from None
        self._succeeded()
        return result

    async def aclose(self) -> None:
        """Close the client of the running loop (others close with their loops)."""
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            try:
                await asyncio.wait_for(client.aclose(), self.op_timeout)
            except Exception:  # closing a broken connection: nothing left to do
                pass
        sync = self._sync_client
        self._sync_client = None
        if sync is not None:
            sync.close()

    # ------------------------------------------------------------------ health

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures_total += 1
            if not self.up:
                return
            self.up = False
            self.down_since = monotonic()
        log.warning(
            "fleet coordinator %s unreachable (%s within %.2f s): replicas keep their leases "
            "until they expire, then use the static share; rate limits and tokens fall back "
            "to this replica. Retrying in the background.",
            _redacted(self.url),
            type(exc).__name__,
            self.op_timeout,
        )
        self._notify(False)

    def _succeeded(self) -> None:
        if self.up:
            return
        with self._lock:
            if self.up:
                return
            self.up = True
            down_for = monotonic() - (self.down_since or monotonic())
            self.down_since = None
        log.warning(
            "fleet coordinator %s reachable again after %.1f s", _redacted(self.url), down_for
        )
        self._notify(True)

    def _notify(self, up: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(up)
            except Exception:  # a listener's bug must not break the request path
                log.exception("fleet listener failed")


def _redacted(url: str) -> str:
    """The URL without its password (for logs and reprs)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


def derive(secret: bytes, purpose: str) -> bytes:
    """A 32-byte subkey of the fleet key for one purpose (HKDF-style, one block)."""
    return hmac.new(secret, b"toolpool-fleet:" + purpose.encode(), hashlib.sha256).digest()


def secret_from_env(name: str, env: Any = None) -> bytes | None:
    """The fleet key from environment variable `name` (None when unset); at least 32 bytes of
    text, so it cannot be a guessable word."""
    value = (os.environ if env is None else env).get(name)
    if value is None:
        return None
    raw = value.strip().encode()
    if len(raw) < 32:
        raise ConfigError(
            f"the fleet key in ${name} is shorter than 32 characters; use a random one "
            f"(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return raw
