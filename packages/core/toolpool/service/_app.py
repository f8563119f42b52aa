"""The ASGI application of `toolpool serve`: the pool behind HTTP, for sidecars and central
pool services.

Routes:

    /d/<destination>/<path>   proxied to the destination through the pool (agent token, tenant
                              header, security checks; streaming bodies both ways)
    /_toolpool/destinations   the destinations this agent may use ({name, url}), for
                              `toolpool.RemoteTransport`
    /healthz                  200 while the process serves
    /readyz                   200 once warm-up finished (or `warmup_timeout` passed) and until
                              a drain starts; 503 otherwise
    /metrics                  Prometheus exposition: the pool's metrics and the service's

Errors the service itself answers carry `X-Toolpool-Error: <code>` and a JSON body
`{"error": code, "detail": ...}`; a downstream's own answers pass through unchanged (minus
hop-by-hop and X-Toolpool-* headers). Lifespan: startup builds and starts the pool (warm-up
runs in the background), shutdown closes it; uvicorn drains in-flight requests in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

import toolpool
import toolpool.metrics
from toolpool._auth_context import AuthContext, auth_context
from toolpool.errors import (
    AuthError,
    DestinationUnavailable,
    EgressDenied,
    PoolClosed,
    PoolSaturated,
    PoolTimeout,
    ToolpoolError,
    UnknownDestination,
)
from toolpool.service._config import TENANT_PATTERN, DestinationConfig, ServiceConfig
from toolpool.service._security import (
    Refusal,
    authenticate,
    check_host,
    check_path,
    request_headers,
    response_headers,
    split_target,
)

__all__ = ["PoolService", "Scope"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("toolpool.service")
access_log = logging.getLogger("toolpool.service.access")

monotonic = time.monotonic

_JSON = [(b"content-type", b"application/json")]
# Tenants seen by agents allowed "*" are cached as AuthContext objects up to this many.
_CONTEXT_CACHE = 10_000


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _RequestBody(httpx.AsyncByteStream):
    """The agent's request body, read from ASGI `receive` as the pool sends it downstream
    (never buffered whole), with the size limit applied as it flows."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.size = 0
        #: Read to its end: `receive` now only reports the agent's disconnect.
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                self.size += len(chunk)
                if self.size > self._limit:
                    raise _BodyTooLarge()
                yield chunk
            if not message.get("more_body", False):
                self.finished = True
                return


class _Counts:
    """Proxied requests by fate, for the drain report (one event loop: no lock needed)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.answered = 0
        self.aborted = 0

    @property
    def in_flight(self) -> int:
        return self.accepted - self.answered - self.aborted


class PoolService:
    """The ASGI app serving one `ServiceConfig` (see the module docstring for its routes).

    ```python
    app = toolpool.service.PoolService(toolpool.service.load_config("toolpool.toml"))
    uvicorn.run(app, http="h11")   # or: toolpool serve --config toolpool.toml
    ```

    Run it under an ASGI server that hands the raw request target to the app (uvicorn's
    `h11` protocol does; `toolpool serve` uses it) so absolute-form targets can be refused.
    """

    def __init__(self, config: ServiceConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.settings = config.service
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pool: toolpool.Pool | None = None
        self.ready = False
        self.draining = False
        self.counts = _Counts()
        self._agents = {a.token_sha256: a.name for a in config.agents.values()}
        self._tenant_header = self.settings.tenant_header.lower().encode("ascii")
        self._subject_header = self.settings.subject_token_header.lower().encode("ascii")
        self._contexts: dict[str, AuthContext] = {}
        self._transport: toolpool.AsyncTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._requests = Counter(
            "toolpool_service_requests",
            "Proxied requests answered, by destination and HTTP status (refusals included).",
            ["destination", "status"],
            registry=self.registry,
        )
        self._refusals = Counter(
            "toolpool_service_refusals",
            "Requests the service refused before sending them, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "toolpool_service_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by destination.",
            ["destination"],
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "toolpool_service_requests_in_flight",
            "Proxied requests being handled now.",
            registry=self.registry,
        )
        self._ready_gauge = Gauge(
            "toolpool_service_ready", "1 when /readyz answers 200.", registry=self.registry
        )

    def __repr__(self) -> str:
        return f"<toolpool.service.PoolService {self.config.source} ready={self.ready}>"

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """Build and start the pool; warm-up runs in the background (see `/readyz`)."""
        pool = self.config.build_pool()
        self.pool = pool
        self._transport = toolpool.AsyncTransport(pool)
        toolpool.metrics.register(pool, self.registry)
        limit = self.config.limit
        attach = getattr(limit, "attach", None)
        if attach is not None:
            attach(pool)  # the fleet's shared tokens and rate limits (toolpool.fleet)
        start = getattr(limit, "start", None)
        if start is not None:
            await start(self.registry)
        warm = asyncio.create_task(self._warm_up(pool), name="toolpool-service-warmup")
        self._tasks.add(warm)
        warm.add_done_callback(self._tasks.discard)
        log.info(
            "toolpool serve: %d destinations (%s), %d agents, limit %r",
            len(self.config.destinations),
            ", ".join(self.config.destinations),
            len(self.config.agents),
            self.config.limit,
        )

    async def _warm_up(self, pool: toolpool.Pool) -> None:
        started = monotonic()
        job = asyncio.ensure_future(pool.astart())
        try:
            done, _ = await asyncio.wait({job}, timeout=self.settings.warmup_timeout or None)
            if job in done and job.exception() is not None:
                log.warning("warm-up failed: %s", job.exception())
            elif job not in done:
                log.warning(
                    "warm-up still running after %.1f s; ready anyway", self.settings.warmup_timeout
                )
                self._tasks.add(job)
                job.add_done_callback(self._tasks.discard)
        finally:
            if not self.draining:
                self.ready = True
                self._ready_gauge.set(1)
            log.info("ready after %.3f s of warm-up", monotonic() - started)

    def begin_drain(self) -> None:
        """Stop reporting ready (the server stops accepting; in-flight requests finish)."""
        if not self.draining:
            self.draining = True
            self.ready = False
            self._ready_gauge.set(0)
            log.info("draining: %d requests in flight", self.counts.in_flight)

    async def shutdown(self) -> None:
        """Close the pool after the server drained; log what happened to every request."""
        self.begin_drain()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        pool = self.pool
        if pool is not None:
            await pool.aclose()
            toolpool.metrics.unregister(pool, self.registry)
        close = getattr(self.config.limit, "aclose", None)
        if close is not None:
            await close()  # give the fleet leases back at once
        c = self.counts
        log.info(
            "%s",
            json.dumps(
                {
                    "event": "drained",
                    "accepted": c.accepted,
                    "answered": c.answered,
                    "aborted": c.aborted,
                    "in_flight": c.in_flight,
                }
            ),
        )

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/d/") or not scope.get("raw_path", b"/").startswith(b"/"):
                await self._proxy(scope, receive, send)
            elif path == "/healthz":
                await _json(send, 200, {"status": "ok"})
            elif path == "/readyz":
                await self._readyz(send)
            elif path == "/metrics" and self.settings.metrics:
                body = generate_latest(self.registry)
                await _respond(send, 200, [(b"content-type", b"text/plain; version=0.0.4")], body)
            elif path == "/_toolpool/destinations":
                await self._destinations(scope, send)
            else:
                await _json(send, 404, {"error": "not_found", "detail": "no such route"})
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.error("startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _readyz(self, send: Send) -> None:
        if self.ready and not self.draining:
            await _json(send, 200, {"ready": True})
        else:
            state = "draining" if self.draining else "warming up"
            await _json(send, 503, {"ready": False, "state": state})

    async def _destinations(self, scope: Scope, send: Send) -> None:
        headers = scope["headers"]
        refusal = check_host(headers, self.settings.allowed_hosts)
        agent = authenticate(headers, self._agents) if refusal is None else refusal
        if isinstance(agent, Refusal):
            await self._refuse(send, agent, "-")
            return
        listing = [{"name": d.name, "url": _origin(d)} for d in self.config.destinations.values()]
        await _json(send, 200, {"destinations": listing})

    # ------------------------------------------------------------------ proxy

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = monotonic()
        self.counts.accepted += 1
        self._in_flight.inc()
        record: dict[str, Any] = {
            "agent": None,
            "tenant": None,
            "method": scope.get("method"),
            "destination": None,
            "path": None,
            "status": None,
            "error": None,
            "bytes_in": 0,
            "bytes_out": 0,
        }
        completed = False
        try:
            completed = await self._handle(scope, receive, send, record)
        finally:
            self._in_flight.dec()
            if completed:
                self.counts.answered += 1
            else:
                self.counts.aborted += 1
            elapsed = monotonic() - started
            dest_label = record["destination"] or "-"
            self._duration.labels(dest_label).observe(elapsed)
            self._requests.labels(dest_label, str(record["status"] or "aborted")).inc()
            if self.settings.access_log and access_log.isEnabledFor(logging.INFO):
                record["duration_ms"] = round(elapsed * 1000, 3)
                record["completed"] = completed
                access_log.info("%s", json.dumps(record, separators=(",", ":")))

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, record: dict[str, Any]
    ) -> bool:
        """Check, forward and stream one request; True if a complete response was sent."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        refusal = check_host(headers, self.settings.allowed_hosts)
        if refusal is not None:
            return await self._refuse(send, refusal, "-", record)
        target = split_target(scope.get("raw_path") or scope["path"].encode("ascii"))
        if isinstance(target, Refusal):
            return await self._refuse(send, target, "-", record)
        agent = authenticate(headers, self._agents)
        if isinstance(agent, Refusal):
            return await self._refuse(send, agent, "-", record)
        record["agent"] = agent
        name, rest = target
        dest = self.config.destinations.get(name)
        if dest is None:
            refusal = Refusal(
                404,
                "unknown_destination",
                "no such destination; GET /_toolpool/destinations lists the configured ones",
            )
            return await self._refuse(send, refusal, "-", record)
        record["destination"] = name
        record["path"] = rest[:256].decode("ascii", "replace") or "/"
        refusal = check_path(rest)
        if refusal is not None:
            return await self._refuse(send, refusal, name, record)
        method: str = scope["method"]
        if method in ("CONNECT", "TRACE"):
            refusal = Refusal(405, "method_not_allowed", f"{method} is not proxied")
            return await self._refuse(send, refusal, name, record)
        tenant = self._tenant(headers, agent)
        if isinstance(tenant, Refusal):
            return await self._refuse(send, tenant, name, record)
        record["tenant"] = tenant
        if dest.auth is not None and not dest.auth.serves(tenant):
            refusal = Refusal(
                403,
                "forbidden_tenant",
                f"destination {name!r} has no downstream credentials for this tenant; add "
                f"[destinations.{name}.auth.tenants.<tenant>] to the service config",
            )
            return await self._refuse(send, refusal, name, record)
        framing = _framing(headers, self.settings.max_request_body)
        if isinstance(framing, Refusal):
            return await self._refuse(send, framing, name, record)
        ctx = self._request_context(headers, dest, tenant)
        if isinstance(ctx, Refusal):
            return await self._refuse(send, ctx, name, record)
        return await self._forward(scope, receive, send, dest, rest, ctx, framing, record)

    def _tenant(self, headers: list[tuple[bytes, bytes]], agent_name: str) -> str | Refusal:
        agent = self.config.agents[agent_name]
        values = [v for k, v in headers if k.lower() == self._tenant_header]
        header = self.settings.tenant_header
        if len(values) > 1:
            return Refusal(400, "bad_tenant", f"send one {header} header, not {len(values)}")
        if not values:
            default = agent.default_tenant
            if default is None:
                return Refusal(
                    400,
                    "missing_tenant",
                    f"name the tenant this request acts for in the {header} header",
                )
            return default
        tenant = values[0].decode("latin-1").strip()
        if not TENANT_PATTERN.match(tenant):
            return Refusal(400, "bad_tenant", f"the {header} header is not a valid tenant name")
        if not agent.may_act_for(tenant):
            return Refusal(
                403,
                "forbidden_tenant",
                f"agent {agent_name!r} may not act for this tenant; list it under "
                f"[agents.{agent_name}] tenants in the service config",
            )
        return tenant

    def _request_context(
        self, headers: list[tuple[bytes, bytes]], dest: DestinationConfig, tenant: str
    ) -> AuthContext | Refusal:
        """The request's auth context: the tenant's, plus the user's subject token for a
        token-exchange destination (each subject token is its own context: its own
        connections and its own exchanged token)."""
        if dest.auth is None or dest.auth.kind != "token_exchange":
            return self._context(tenant)
        header = self.settings.subject_token_header
        values = [v for k, v in headers if k.lower() == self._subject_header]
        if len(values) != 1 or not values[0].strip():
            return Refusal(
                401,
                "missing_subject_token",
                f"destination {dest.name!r} exchanges the user's token (RFC 8693); send it, "
                f"once, in the {header} header",
            )
        subject = values[0].decode("latin-1").strip()
        return AuthContext(tenant=tenant, credentials={"subject_token": subject})

    def _context(self, tenant: str) -> AuthContext:
        ctx = self._contexts.get(tenant)
        if ctx is None:
            if len(self._contexts) >= _CONTEXT_CACHE:
                self._contexts.clear()
            ctx = self._contexts[tenant] = AuthContext(tenant=tenant)
        return ctx

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        dest: DestinationConfig,
        rest: bytes,
        ctx: AuthContext,
        framing: tuple[int | None, bool],
        record: dict[str, Any],
    ) -> bool:
        length, chunked = framing
        tenant = ctx.tenant
        assert tenant is not None
        query: bytes = scope.get("query_string", b"")
        raw = (rest or b"/") + (b"?" + query if query else b"")
        url = httpx.URL(_origin(dest)).copy_with(raw_path=raw)
        if url.raw_path != raw:
            refusal = Refusal(
                400, "bad_path", "the path or query needs normalizing; send it encoded"
            )
            return await self._refuse(send, refusal, dest.name, record)
        # The subject token is a credential for the service, never for the downstream.
        drop = [self._tenant_header, self._subject_header]
        if dest.forward_tenant_as:
            drop.append(dest.forward_tenant_as.lower().encode("ascii"))
        # The destination's own Host (httpx adds none to a request built on a stream).
        out = [(b"host", url.netloc), *request_headers(scope["headers"], drop)]
        if dest.forward_tenant_as:
            out.append((dest.forward_tenant_as.encode("ascii"), tenant.encode("ascii")))
        body: _RequestBody | None = None
        stream: httpx.AsyncByteStream | httpx.ByteStream
        if length is not None:
            out.append((b"content-length", str(length).encode("ascii")))
            body = _RequestBody(receive, length)
            stream = body
        elif chunked:
            out.append((b"transfer-encoding", b"chunked"))
            body = _RequestBody(receive, self.settings.max_request_body)
            stream = body
        else:
            stream = httpx.ByteStream(b"")
        request = httpx.Request(
            scope["method"],
            url,
            headers=out,
            stream=stream,
            extensions={
                "timeout": {
                    "connect": None,
                    "read": dest.read_timeout,
                    "write": dest.write_timeout,
                    "pool": None,
                }
            },
        )
        transport = self._transport
        if transport is None:
            refusal = Refusal(503, "not_ready", "the service is starting; retry shortly")
            return await self._refuse(send, refusal, dest.name, record)
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.config.limit.hold(dest.name, tenant))
                with auth_context(ctx):
                    response = await transport.handle_async_request(request)
            except _ClientGone:
                record["error"] = "client_gone"
                return False
            except Exception as exc:
                record["bytes_in"] = body.size if body is not None else 0
                return await self._refuse(send, _failure(exc, dest.name), dest.name, record)
            record["bytes_in"] = body.size if body is not None else 0
            # Once the agent's body is read, `receive` reports only its disconnect: watch
            # for it, so an abandoned answer frees its downstream stream or connection now,
            # not when the downstream ends it (uvicorn's `send` ignores a gone agent). Only
            # for answers that can last (streamed, or large): a task per small answer would
            # cost the hot path more than it saves.
            long = _may_last(response.headers.get("content-length"))
            watch = receive if long and (body is None or body.finished) else None
            return await self._stream_back(send, response, dest, record, watch)
        return False  # pragma: no cover - the exit stack does not swallow exceptions

    async def _stream_back(
        self,
        send: Send,
        response: httpx.Response,
        dest: DestinationConfig,
        record: dict[str, Any],
        receive: Receive | None = None,
    ) -> bool:
        limit = self.settings.max_response_body
        gone: list[bool] = []
        watcher = None
        if receive is not None:
            watcher = asyncio.ensure_future(_agent_gone(receive, asyncio.current_task(), gone))
        try:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                refusal = Refusal(
                    502,
                    "response_too_large",
                    f"the downstream answer is larger than the service's max_response_body "
                    f"({limit} bytes)",
                )
                return await self._refuse(send, refusal, dest.name, record)
            info = response.extensions.get("toolpool", {})
            extra = [
                (b"x-toolpool-wait-seconds", f"{info.get('wait_seconds', 0.0):.6f}".encode()),
                (b"x-toolpool-reused", b"1" if info.get("reused") else b"0"),
            ]
            record["status"] = response.status_code
            record["reused"] = bool(info.get("reused"))
            record["wait_ms"] = round(float(info.get("wait_seconds", 0.0)) * 1000, 3)
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": response_headers(response.headers.raw) + extra,
                }
            )
            sent = 0
            async for chunk in response.aiter_raw():
                sent += len(chunk)
                record["bytes_out"] = sent
                if sent > limit:
                    # Too late for a status: end the connection so the agent sees a cut body.
                    record["error"] = "response_too_large"
                    return False
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        except httpx.HTTPError as exc:
            record["error"] = f"downstream: {type(exc).__name__}"
            return False
        except OSError:  # the agent went away mid-answer (uvicorn's ClientDisconnected)
            record["error"] = "client_gone"
            return False
        except asyncio.CancelledError:
            if not gone:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            record["error"] = "client_gone"
            return False
        finally:
            if watcher is not None:
                watcher.cancel()
            # An unfinished HTTP/2 answer is reset (RST_STREAM), an HTTP/1.1 one closed.
            await response.aclose()

    async def _refuse(
        self, send: Send, refusal: Refusal, dest: str, record: dict[str, Any] | None = None
    ) -> bool:
        self._refusals.labels(refusal.code).inc()
        if record is not None:
            record["status"] = refusal.status
            record["error"] = refusal.code
        headers = [(b"x-toolpool-error", refusal.code.encode("ascii"))]
        body: dict[str, Any] = {"error": refusal.code, "detail": refusal.detail}
        extra = refusal.extra
        if extra:
            body.update(extra)
            if "retry_after" in extra:
                headers.append((b"retry-after", str(max(1, round(extra["retry_after"]))).encode()))
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="toolpool"'))
        await _json(send, refusal.status, body, headers)
        return True


def _failure(exc: Exception, dest: str) -> Refusal:
    """The answer for an error on the way to the downstream (no secret in any of them)."""
    if isinstance(exc, _BodyTooLarge):
        return Refusal(413, "request_too_large", "the request body exceeds max_request_body")
    if isinstance(exc, PoolSaturated):
        return Refusal(
            503,
            "saturated",
            str(exc),
            {
                "destination": dest,
                "in_use": exc.in_use,
                "opening": exc.opening,
                "closing": exc.closing,
                "waiting": exc.waiting,
                "max_connections": exc.max_connections,
                "queue_limit": exc.queue_limit,
                "retry_after": exc.retry_after,
                "reason": exc.reason,
            },
        )
    if isinstance(exc, PoolTimeout):
        return Refusal(
            503,
            "pool_timeout",
            str(exc),
            {"destination": dest, "timeout": exc.timeout, "retry_after": 1.0},
        )
    if isinstance(exc, DestinationUnavailable):
        return Refusal(
            503,
            "unavailable",
            str(exc),
            {"destination": dest, "retry_after": exc.retry_after, "reason": exc.reason},
        )
    if isinstance(exc, AuthError):
        return Refusal(502, "downstream_auth", str(exc))
    if isinstance(exc, PoolClosed):
        return Refusal(503, "shutting_down", "the service is shutting down", {"retry_after": 1.0})
    if isinstance(exc, EgressDenied):
        return Refusal(
            403,
            "egress_denied",
            f"destination {dest!r}: {exc.reason}; the service never connects there (change "
            f"[service.egress] or the destination's DNS)",
            {"destination": dest, "rule": exc.rule},
        )
    if isinstance(exc, UnknownDestination):
        return Refusal(404, "unknown_destination", "no such destination")
    if isinstance(exc, ToolpoolError):
        return Refusal(502, "upstream_error", str(exc))
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Refusal(502, "upstream_connect", f"cannot connect to destination {dest!r}")
    if isinstance(exc, httpx.TimeoutException):
        return Refusal(504, "upstream_timeout", f"destination {dest!r} did not answer in time")
    if isinstance(exc, httpx.HTTPError):
        return Refusal(502, "upstream_error", f"destination {dest!r}: {type(exc).__name__}")
    log.exception("unexpected error proxying to %s", dest, exc_info=exc)
    return Refusal(500, "internal_error", "the service failed; see its log")


#: Answers with a declared length up to this are sent back without watching for the agent.
_WATCH_ABOVE = 64 * 1024


def _may_last(length: str | None) -> bool:
    """Whether an answer of this Content-Length may stream for long: none declared (chunked,
    an event stream) or more than `_WATCH_ABOVE` bytes."""
    return length is None or not length.isdigit() or int(length) > _WATCH_ABOVE


async def _agent_gone(receive: Receive, task: asyncio.Task[Any] | None, gone: list[bool]) -> None:
    """Wait for the agent's disconnect (its body already read), then cancel `task`, which
    is streaming the answer back; cancelled itself when the answer is complete."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if task is not None:
        gone.append(True)
        task.cancel()


def _framing(headers: list[tuple[bytes, bytes]], limit: int) -> tuple[int | None, bool] | Refusal:
    """(content length or None, chunked) of the agent's request body."""
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    chunked = any(k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in headers)
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            return Refusal(400, "bad_request", "the Content-Length header is not one number")
        length = int(lengths[0])
        if length > limit:
            return Refusal(
                413,
                "request_too_large",
                f"the request body ({length} bytes) exceeds max_request_body ({limit} bytes)",
            )
        return length, False
    return None, chunked


def _origin(dest: DestinationConfig) -> str:
    from toolpool._config import origin_of, origin_text

    return origin_text(origin_of(dest.url))


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    sized = [*headers, (b"content-length", str(len(body)).encode("ascii"))]
    await send({"type": "http.response.start", "status": status, "headers": sized})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await _respond(send, status, _JSON + (headers or []), json.dumps(payload).encode())
