"""One token per (destination, auth context) for the whole fleet.

A replica that needs a credential (its local cache, `toolpool.auth`, decided to fetch) asks
here first:

    1. GET the fleet's copy: found → use it (its remaining lifetime comes along)
    2. else take the fleet-wide lock (SET NX PX), look again (a copy may have been stored
       since), and fetch, store, unlock: the only fetch
    3. else another replica is fetching: poll for its copy (every 50 ms, bounded by the
       provider's token timeout); if the lock goes away without a copy, start over

Copies are AES-GCM encrypted with a key derived from the fleet key (an environment variable,
never in the config file), bound to their Redis key (associated data), and expire at the
provider's refresh point, before the credential does. Redis keys carry an HMAC of the context
(tenant, subject, credentials) under another derived key: no tenant name or secret is
readable in Redis. A 401 deletes the fleet's copy if it is still the rejected one
(compare-and-delete), so the next fetch anywhere replaces it for everyone.

Redis unreachable: the replica fetches on its own, as without a fleet.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from toolpool._auth_context import AuthContext
from toolpool.auth._credential import Credential, TokenPolicy
from toolpool.fleet._coordinator import Coordinator, CoordinatorDown

__all__ = ["FleetTokens"]

log = logging.getLogger("toolpool.fleet")

_POLL = 0.05
# Credentials without an expiry are shared for a day at most (until a 401 drops them sooner).
_NO_EXPIRY_TTL = 86_400.0
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_DROP_IF = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class FleetTokens:
    """The fleet's token store (see the module docstring); `HeaderAuth.share_tokens` uses it."""

    def __init__(self, coordinator: Coordinator, encrypt_key: bytes, name_key: bytes) -> None:
        self.coordinator = coordinator
        self._aead = AESGCM(encrypt_key)
        self._name_key = name_key
        self._warned_key = False
        self._lock = threading.Lock()
        self.fetched_total = 0
        self.shared_total = 0

    def __repr__(self) -> str:
        return "<toolpool.fleet.FleetTokens key=<redacted>>"

    # ------------------------------------------------------------------ names, sealing

    def _ident(self, destination: str, ctx: AuthContext | None) -> str:
        mac = hmac.new(self._name_key, destination.encode() + b"\x00", hashlib.sha256)
        if ctx is not None:
            for part in (ctx.tenant, ctx.subject):
                mac.update(b"\x00" if part is None else b"\x01" + part.encode())
            for name in sorted(ctx.credentials):
                mac.update(b"\x02" + name.encode() + b"\x03" + repr(ctx.credentials[name]).encode())
        digest = mac.hexdigest()[:32]
        return digest

    def _keys(self, destination: str, ctx: AuthContext | None) -> tuple[str, str]:
        ident = self._ident(destination, ctx)
        return (
            self.coordinator.key("token", destination, ident),
            self.coordinator.key("token-lock", destination, ident),
        )

    def _fingerprint(self, value: str) -> str:
        return hmac.new(self._name_key, b"value\x00" + value.encode(), hashlib.sha256).hexdigest()

    def _seal(self, key: str, credential: Credential, expires_at: float | None) -> bytes:
        plain = json.dumps(
            {
                "v": credential.value,
                "h": credential.header,
                "s": credential.scheme,
                "e": expires_at,
            }
        ).encode()
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, key.encode())

    def _open(self, key: str, sealed: bytes) -> Credential | None:
        try:
            plain = self._aead.decrypt(sealed[:12], sealed[12:], key.encode())
        except (InvalidTag, ValueError):
            if not self._warned_key:
                self._warned_key = True
                log.error(
                    "a fleet token copy could not be decrypted: the fleet key differs between "
                    "replicas; give every replica the same key"
                )
            return None
        data = json.loads(plain)
        expires_at = data["e"]
        expires_in = None
        if expires_at is not None:
            expires_in = expires_at - time.time()
            if expires_in <= 1.0:
                return None
        return Credential(data["v"], expires_in=expires_in, header=data["h"], scheme=data["s"])

    def _ttl_ms(self, credential: Credential, policy: TokenPolicy) -> int:
        lifetime = credential.expires_in
        if lifetime is None:
            return int(_NO_EXPIRY_TTL * 1000)
        return max(1, int(policy.refresh_after(lifetime) * 1000))

    def _shared(self, key: str, sealed: bytes | None) -> Credential | None:
        """The fleet's copy read under `key` (`sealed`, None if there was none), if it opens
        and is still good; counted as shared."""
        found = self._open(key, sealed) if sealed is not None else None
        if found is not None:
            self._count(shared=True)
        return found

    def _fetched(
        self, key: str, credential: Credential, requested: float, policy: TokenPolicy
    ) -> tuple[bytes, str, int]:
        """Count the fetch of `credential` (requested at wall time `requested`) and say what
        to store under `key`: (sealed copy, fingerprint, time to live in ms)."""
        self._count(shared=False)
        expires_at = (
            requested + credential.expires_in if credential.expires_in is not None else None
        )
        return (
            self._seal(key, credential, expires_at),
            self._fingerprint(credential.value),
            self._ttl_ms(credential, policy),
        )

    # ------------------------------------------------------------------ async

    async def obtain(
        self,
        destination: str,
        ctx: AuthContext | None,
        fetch: Callable[[], Awaitable[Credential]],
        policy: TokenPolicy,
    ) -> Credential:
        """The fleet's credential for (destination, ctx), fetched by `fetch` at most once in
        the fleet at a time (see the module docstring)."""
        key, lock = self._keys(destination, ctx)
        token = secrets.token_hex(8)
        deadline = time.monotonic() + policy.timeout + 1.0
        coordinator = self.coordinator
        lock_ms = int(policy.timeout * 2000) + 1000
        while True:
            try:
                sealed = await coordinator.run(lambda c: c.hget(key, "ct"))
                found = self._shared(key, sealed)
                if found is not None:
                    return found
                got = await coordinator.run(lambda c: c.set(lock, token, nx=True, px=lock_ms))
            except CoordinatorDown:
                return await self._fetch_alone(fetch)
            if got:
                return await self._lead(key, lock, token, fetch, policy)
            if time.monotonic() > deadline:
                return await self._fetch_alone(fetch)
            await asyncio.sleep(_POLL)

    async def _lead(
        self,
        key: str,
        lock: str,
        token: str,
        fetch: Callable[[], Awaitable[Credential]],
        policy: TokenPolicy,
    ) -> Credential:
        try:
            # Another replica may have stored a copy between our GET and our lock.
            try:
                sealed = await self.coordinator.run(lambda c: c.hget(key, "ct"))
            except CoordinatorDown:
                sealed = None
            found = self._shared(key, sealed)
            if found is not None:
                return found
            requested = time.time()
            credential = await fetch()
            sealed, fp, ttl = self._fetched(key, credential, requested, policy)

            async def store(c: Any) -> None:
                pipe = c.pipeline(transaction=True)
                pipe.hset(key, mapping={"ct": sealed, "fp": fp})
                pipe.pexpire(key, ttl)
                await pipe.execute()

            try:
                await self.coordinator.run(store)
            except CoordinatorDown:
                pass  # the others fetch their own after the lock expires
            return credential
        finally:
            try:
                await self.coordinator.run(
                    lambda c: c.register_script(_UNLOCK)(keys=[lock], args=[token])
                )
            except CoordinatorDown:
                pass  # it expires by itself

    async def _fetch_alone(self, fetch: Callable[[], Awaitable[Credential]]) -> Credential:
        credential = await fetch()
        self._count(shared=False)
        return credential

    async def invalidate(self, destination: str, ctx: AuthContext | None, value: str) -> None:
        """The destination answered 401 to `value`: drop the fleet's copy if it is that one."""
        key, _ = self._keys(destination, ctx)
        fp = self._fingerprint(value)
        try:
            await self.coordinator.run(lambda c: c.register_script(_DROP_IF)(keys=[key], args=[fp]))
        except CoordinatorDown:
            pass

    # ------------------------------------------------------------------ sync

    def obtain_sync(
        self,
        destination: str,
        ctx: AuthContext | None,
        fetch: Callable[[], Credential],
        policy: TokenPolicy,
    ) -> Credential:
        """`obtain` for the thread driver."""
        key, lock = self._keys(destination, ctx)
        token = secrets.token_hex(8)
        deadline = time.monotonic() + policy.timeout + 1.0
        run = self.coordinator.run_sync
        lock_ms = int(policy.timeout * 2000) + 1000
        while True:
            try:
                sealed = run(lambda c: c.hget(key, "ct"))
                found = self._shared(key, sealed)
                if found is not None:
                    return found
                got = run(lambda c: c.set(lock, token, nx=True, px=lock_ms))
            except CoordinatorDown:
                return self._fetch_alone_sync(fetch)
            if got:
                return self._lead_sync(key, lock, token, fetch, policy)
            if time.monotonic() > deadline:
                return self._fetch_alone_sync(fetch)
            time.sleep(_POLL)

    def _lead_sync(
        self,
        key: str,
        lock: str,
        token: str,
        fetch: Callable[[], Credential],
        policy: TokenPolicy,
    ) -> Credential:
        run = self.coordinator.run_sync
        try:
            # Another replica may have stored a copy between our GET and our lock.
            try:
                sealed = run(lambda c: c.hget(key, "ct"))
            except CoordinatorDown:
                sealed = None
            found = self._shared(key, sealed)
            if found is not None:
                return found
            requested = time.time()
            credential = fetch()
            sealed, fp, ttl = self._fetched(key, credential, requested, policy)

            def store(c: Any) -> None:
                pipe = c.pipeline(transaction=True)
                pipe.hset(key, mapping={"ct": sealed, "fp": fp})
                pipe.pexpire(key, ttl)
                pipe.execute()

            try:
                run(store)
            except CoordinatorDown:
                pass  # the others fetch their own after the lock expires
            return credential
        finally:
            try:
                run(lambda c: c.register_script(_UNLOCK)(keys=[lock], args=[token]))
            except CoordinatorDown:
                pass  # it expires by itself

    def _fetch_alone_sync(self, fetch: Callable[[], Credential]) -> Credential:
        credential = fetch()
        self._count(shared=False)
        return credential

    def invalidate_sync(self, destination: str, ctx: AuthContext | None, value: str) -> None:
        """`invalidate` for the thread driver."""
        key, _ = self._keys(destination, ctx)
        fp = self._fingerprint(value)
        try:
            self.coordinator.run_sync(lambda c: c.register_script(_DROP_IF)(keys=[key], args=[fp]))
        except CoordinatorDown:
            pass

    def _count(self, *, shared: bool) -> None:
        with self._lock:
            if shared:
                self.shared_total += 1
            else:
                self.fetched_total += 1
