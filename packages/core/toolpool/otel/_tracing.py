"""Client spans per request, and the pool's own time inside them as child spans.

Two pieces, both installed per destination by `toolpool.otel.instrument`:

- the *client layer*, the outermost layer of the destination's send chain: one span of kind
  CLIENT per request (HTTP client semantic conventions), started as the current span so
  that the layers inside it (resilience, auth) and the drivers nest under it, ended when
  the response head arrives (like the HTTP client duration metric);
- the *probe* (`dest.probe`, see `toolpool._destination.Probe`), which the drivers and the
  auth layer tell about waits, connects, exchanges and token requests; it turns each into a
  child span after the fact, with the start and end times the pool measured (so a wait span
  lasts exactly the wait that `pool.stats()` recorded).

One request's spans:

    GET                        CLIENT  http.*, url.full (query values redacted), toolpool.*
    ├─ toolpool.auth.token     a token request of the auth provider (its own wait/connect/
    │                          TLS/response below it)
    ├─ toolpool.auth.wait      waiting for a token another request of the context is fetching
    ├─ toolpool.retry          from the end of a failed attempt to the next attempt (backoff,
    │                          Retry-After pause, a 401's fresh token)
    ├─ toolpool.pool.wait      queued for a connection (HTTP/2: for a stream permit; only
    │                          when the request queued)
    ├─ toolpool.connect        TCP connect of a new connection (HTTP/2: up to the preface,
    │  │                       when the stream goes out; `toolpool.http2.settings_ms`:
    │  │                       when the server's SETTINGS arrived, after the handshake)
    │  └─ toolpool.tls         its TLS handshake (`tls.next_protocol`: what ALPN chose)
    ├─ toolpool.connect.wait   HTTP/2: waiting for the connection another request of the
    │                          same context is opening, until its SETTINGS arrived
    ├─ toolpool.ping           HTTP/2: the PING of a connection idle > 10 s before it
    │                          carries the stream
    └─ toolpool.response       request written → response head received (network + server);
                               left out when it would be the request's only child (a warm
                               request's span is its exchange: no second span for it)

Events: `toolpool.resend` on the request span (sent again on another connection: the server
did not process it; `toolpool.resend.reason` refused_stream, goaway, no_new_stream,
connection_closed);
`toolpool.request.sent` (HTTP/2, a request with a body: its last byte went out, after flow
control) and `toolpool.stream.reset` (HTTP/2: the failed or cancelled stream was reset with
RST_STREAM, its connection stays) on the exchange.

Beside the request spans, under the current span (the tool call's, or the run's when the
framework opens its tool span after admission, as AutoGen does): `toolpool.admission.wait`,
a call waiting at the destination's admission gate (a wrapped agent's tool call while every
connection is taken) before any of its requests starts.

No span carries a credential, a header or a query value; a tenant id appears only as the
keyed hash of `toolpool.metrics.TenantLabels`, and only when one is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Histogram
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, SyncSend

if TYPE_CHECKING:
    from contextvars import Token

    from toolpool._destination import DestinationPool
    from toolpool._state import Waiter
    from toolpool.metrics import TenantLabels

__all__ = ["SPAN_NAMES", "Tracing", "TracingLayer", "redacted_url"]

monotonic = time.monotonic

#: Every span name toolpool emits, with what its duration measures.
SPAN_NAMES: dict[str, str] = {
    "{method}": "one request (kind CLIENT): from entering the pool to its response head",
    "toolpool.auth.token": "a token request of the destination's auth provider",
    "toolpool.auth.wait": "waiting for the token another request of the context is fetching",
    "toolpool.retry": "between a failed attempt and the next one (backoff, pause, new token)",
    "toolpool.pool.wait": "queued for a connection, on HTTP/2 for a stream permit (the wait "
    "pool.stats() records)",
    "toolpool.admission.wait": "a tool call (or pool.admit) waiting at the destination's "
    "admission gate, before its requests (a sibling of their spans)",
    "toolpool.connect": "opening a new connection: TCP connect (DNS included), TLS below it; "
    "HTTP/2: up to the connection preface (the request's stream does not wait for the "
    "server's SETTINGS; toolpool.http2.settings_ms says when they arrived)",
    "toolpool.tls": "the TLS handshake of a new connection (ALPN: tls.next_protocol)",
    "toolpool.connect.wait": "HTTP/2: waiting for the connection another request of the same "
    "auth context is opening, until the server's SETTINGS arrived on it",
    "toolpool.ping": "HTTP/2: the PING round trip of a connection idle > 10 s, before it "
    "carries the stream",
    "toolpool.response": "request written until the response head arrived (only beside "
    "other children)",
    "execute_tool {name}": "a tool call, opened by adapters of frameworks without their own",
}

# The method names of the HTTP semantic conventions; others are reported as "_OTHER".
_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The per-call record in the OpenTelemetry context (see `_Call`).
_CALL = otel_context.create_key("toolpool.call")
# Hashed tenant labels remembered per tracing (one per auth context fingerprint).
_MAX_TENANTS_CACHED = 10_000


def redacted_url(url: httpx.URL) -> str:
    """`url` for `url.full`: no user info, and every query value replaced by REDACTED
    (query strings carry API keys and signatures; the keys alone say what was asked)."""
    port = url.port
    netloc = url.host if port is None else f"{url.host}:{port}"
    if ":" in url.host:
        netloc = f"[{url.host}]" if port is None else f"[{url.host}]:{port}"
    path = url.raw_path.partition(b"?")[0].decode("ascii", "replace")
    text = f"{url.scheme}://{netloc}{path}"
    query = url.query
    if query:
        parts = []
        for pair in query.decode("ascii", "replace").split("&"):
            key, eq, _ = pair.partition("=")
            parts.append(f"{key}=REDACTED" if eq else key)
        text += "?" + "&".join(parts)
    return text


class _Call:
    """What the spans of one request (or one token request) share: the offset from the
    monotonic clock the pool measures with to the wall clock spans are stamped with, and
    the attempts seen so far."""

    __slots__ = ("attempts", "eventful", "last_end", "offset", "quiet_exchange", "resends", "wait")

    def __init__(self) -> None:
        self.offset = time.time_ns() - time.monotonic_ns()
        self.attempts = 0
        # Sends again on another connection within an attempt (the server did not process it).
        self.resends = 0
        self.last_end: float | None = None
        self.wait = 0.0  # seconds queued for a connection, over all attempts
        # Something besides the exchange happened (wait, connect, token, retry, error).
        self.eventful = False
        # An exchange not drawn yet, (destination, sent, ended, status, body sent at): a
        # request that was only an exchange needs no child span (its span is the exchange),
        # unless a retry follows, which draws it after all.
        self.quiet_exchange: tuple[str, float, float, int | None, float | None] | None = None

    def ns(self, t: float) -> int:
        return self.offset + int(t * 1e9)


# In the context of a request whose span is not recorded: the probe does nothing for it.
_SKIP = object()


def _current_call() -> _Call | None:
    call = otel_context.get_value(_CALL)
    return call if isinstance(call, _Call) else None


def _fail(span: Span, exc: BaseException) -> None:
    span.set_attribute("error.type", _error_type(exc))
    if isinstance(exc, Exception):
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class Tracing:
    """A pool's tracing: the client layer and probe of each of its destinations.

    `tracer` None: no spans, only the request duration histogram (metrics without traces).
    """

    def __init__(
        self,
        tracer: Tracer | None,
        duration: Histogram | None,
        tenants: TenantLabels | None,
    ) -> None:
        self.tracer = tracer
        self.duration = duration
        self.tenants = tenants
        self._tenant_labels: dict[str, str] = {}
        # False once uninstrumented: requests already inside the layer finish untraced.
        self.active = True
        # destination name -> its tracing layer
        self._installed: dict[str, TracingLayer] = {}

    # ------------------------------------------------------------------ install

    def install(self, dest: DestinationPool) -> None:
        """Add the tracing layer to `dest`'s send chain (outermost, see `toolpool._chain`)
        and become its probe, when tracing."""
        if dest.name in self._installed:
            return
        layer = TracingLayer(self, dest)
        self._installed[dest.name] = layer
        dest.add_layer(layer)
        if self.tracer is not None:
            dest.probe = self

    def uninstall(self, dest: DestinationPool) -> None:
        """Undo `install`."""
        layer = self._installed.pop(dest.name, None)
        if layer is None:
            return
        dest.remove_layer(layer)
        if dest.probe is self:
            dest.probe = None

    def _begin(
        self, dest: DestinationPool, request: httpx.Request, ctx: AuthContext | None, started: float
    ) -> tuple[Span | None, _Call | None, Token[Context] | None]:
        tracer = self.tracer
        if tracer is None:
            return None, None, None
        call = _Call()
        method = request.method
        url = request.url
        # What a sampler may look at; the rest is added only to spans that are recorded.
        attributes: dict[str, Any] = {
            "http.request.method": method if method in _METHODS else "_OTHER",
            "server.address": url.host,
            "server.port": url.port or _DEFAULT_PORTS.get(url.scheme, 0),
            "toolpool.destination": dest.name,
        }
        span = tracer.start_span(
            method if method in _METHODS else "HTTP",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=call.ns(started),
        )
        if not span.is_recording():
            # No SDK configured, or sampled out: nothing below it would be kept. The context
            # still carries the span (its trace), and tells the probe to skip its work.
            token = otel_context.attach(
                otel_context.set_value(_CALL, _SKIP, trace.set_span_in_context(span))
            )
            return span, None, token
        more: dict[str, Any] = {"url.full": redacted_url(url)}
        if method not in _METHODS:
            more["http.request.method_original"] = method
        if self.tenants is not None:
            more["toolpool.tenant"] = self._tenant(ctx)
        span.set_attributes(more)
        token = otel_context.attach(
            otel_context.set_value(_CALL, call, trace.set_span_in_context(span))
        )
        return span, call, token

    def _end(
        self,
        dest: DestinationPool,
        request: httpx.Request,
        span: Span | None,
        call: _Call | None,
        started: float,
        response: httpx.Response | None,
        error: BaseException | None,
    ) -> None:
        ended = monotonic()
        status = response.status_code if response is not None else None
        version = _protocol_version(response) if response is not None else _dest_version(dest)
        error_type: str | None = None
        if error is not None:
            error_type = _error_type(error)
        elif status is not None and status >= 400:
            error_type = str(status)
        if span is not None and call is not None:
            if response is not None:
                span.set_attribute("http.response.status_code", status)
                if version is not None:
                    span.set_attribute("network.protocol.version", version)
                pooled = response.extensions.get("toolpool")
                if pooled is not None:
                    span.set_attribute("toolpool.connection.reused", bool(pooled["reused"]))
                    stream_id = pooled.get("stream_id")
                    if stream_id is not None:
                        span.set_attribute("toolpool.http2.stream_id", stream_id)
                        span.set_attribute("toolpool.http2.streams", pooled.get("streams") or 1)
                if error_type is not None:
                    span.set_attribute("error.type", error_type)
                    span.set_status(Status(StatusCode.ERROR))
            else:
                assert error is not None
                if version is not None:
                    span.set_attribute("network.protocol.version", version)
                _fail(span, error)
            quiet = call.quiet_exchange
            if quiet is not None and quiet[4] is not None:
                # Only an exchange, so no child span for it: its body's end goes here.
                span.add_event("toolpool.request.sent", timestamp=call.ns(quiet[4]))
            span.set_attribute("toolpool.wait_ms", round(call.wait * 1000.0, 3))
            resends = call.attempts - 1 + call.resends
            if resends > 0:
                span.set_attribute("http.request.resend_count", resends)
            span.end(end_time=call.ns(ended))
        elif span is not None:
            span.end()
        duration = self.duration
        if duration is not None:
            url = request.url
            attributes: dict[str, Any] = {
                "http.request.method": request.method if request.method in _METHODS else "_OTHER",
                "server.address": url.host,
                "server.port": url.port or _DEFAULT_PORTS.get(url.scheme, 0),
                "toolpool.destination": dest.name,
            }
            if status is not None:
                attributes["http.response.status_code"] = status
            if version is not None:
                attributes["network.protocol.version"] = version
            if error_type is not None:
                attributes["error.type"] = error_type
            duration.record(ended - started, attributes)

    def _tenant(self, ctx: AuthContext | None) -> str:
        assert self.tenants is not None
        fingerprint = ctx._fingerprint if ctx is not None else ""
        label = self._tenant_labels.get(fingerprint)
        if label is None:
            label = self.tenants.label(ctx.tenant if ctx is not None else None)
            if len(self._tenant_labels) >= _MAX_TENANTS_CACHED:
                self._tenant_labels.clear()
            self._tenant_labels[fingerprint] = label
        return label

    # ------------------------------------------------------------------ the probe

    def _leaf(
        self,
        name: str,
        start: float,
        end: float,
        call: _Call | None,
        attributes: dict[str, Any],
        error: BaseException | None = None,
        parent: Span | None = None,
    ) -> Span:
        assert self.tracer is not None
        clock = call if call is not None else _Call()
        span = self.tracer.start_span(
            name,
            context=trace.set_span_in_context(parent) if parent is not None else None,
            attributes=attributes,
            start_time=clock.ns(start),
        )
        if error is not None:
            _fail(span, error)
        span.end(end_time=clock.ns(end))
        return span

    def attempt(self, dest: DestinationPool, asked: float) -> None:
        call = _current_call()
        if call is None:
            return
        if call.attempts:
            call.eventful = True
            quiet = call.quiet_exchange
            if quiet is not None:
                call.quiet_exchange = None
                self._response(quiet[0], quiet[1], quiet[2], quiet[3], call, None, quiet[4])
        if call.attempts and call.last_end is not None and asked > call.last_end:
            self._leaf(
                "toolpool.retry",
                call.last_end,
                asked,
                call,
                {"toolpool.destination": dest.name, "http.request.resend_count": call.attempts},
            )
        call.attempts += 1

    def admission_waited(
        self,
        dest: DestinationPool,
        since: float,
        end: float,
        outcome: str,
        error: BaseException | None,
    ) -> None:
        """A call waited at `dest`'s admission gate (a wrapped agent's tool call
        beyond the connections, a `pool.admit` beyond the queue): one span under the
        current one, with the wait the gate measured and its `outcome`
        ("admitted", or the refusal's reason: "timeout", "breaker_open", ...)."""
        if self.tracer is None or not self.active:
            return
        self._leaf(
            "toolpool.admission.wait",
            since,
            end,
            None,
            {
                "toolpool.destination": dest.name,
                "toolpool.wait_ms": round(max(0.0, end - since) * 1000.0, 3),
                "toolpool.admission.outcome": outcome,
            },
            error,
        )

    def waited(self, dest: DestinationPool, waiter: Waiter, error: BaseException | None) -> None:
        if otel_context.get_value(_CALL) is _SKIP:
            return
        end = waiter.granted_at if error is None else monotonic()
        seconds = max(0.0, end - waiter.since)
        call = _current_call()
        if call is not None:
            call.wait += seconds
            call.last_end = end
            call.eventful = True
        self._leaf(
            "toolpool.pool.wait",
            waiter.since,
            end,
            call,
            {"toolpool.destination": dest.name, "toolpool.wait_ms": round(seconds * 1000.0, 3)},
            error,
        )

    def connected(
        self,
        dest: DestinationPool,
        started: float,
        tcp_done: float | None,
        done: float,
        error: BaseException | None,
        protocol: str | None = None,
        tls_done: float | None = None,
        settings_at: float | None = None,
    ) -> None:
        assert self.tracer is not None
        if otel_context.get_value(_CALL) is _SKIP:
            return
        call = _current_call()
        clock = call if call is not None else _Call()
        if call is not None:
            call.last_end = done
            call.eventful = True
        attributes: dict[str, Any] = {
            "toolpool.destination": dest.name,
            "server.address": dest.host,
            "server.port": dest.port,
            "network.transport": "tcp",
        }
        if error is None:
            attributes["network.protocol.name"] = "http"
            attributes["network.protocol.version"] = "2" if protocol == "h2" else "1.1"
        span = self.tracer.start_span(
            "toolpool.connect", attributes=attributes, start_time=clock.ns(started)
        )
        tcp_end = done
        if dest.tls and tcp_done is not None:
            tcp_end = tcp_done
            tls_end = done if tls_done is None else tls_done
            tls_attributes: dict[str, Any] = {"toolpool.destination": dest.name}
            if protocol is not None:
                tls_attributes["tls.next_protocol"] = protocol
            self._leaf(
                "toolpool.tls",
                tcp_done,
                tls_end,
                clock,
                tls_attributes,
                error if tls_done is None else None,
                parent=span,
            )
            if tls_done is not None and settings_at is not None:
                # HTTP/2: from the handshake to the server's SETTINGS (its stream limit); the
                # first stream did not wait for them, the key's other requests did.
                span.set_attribute(
                    "toolpool.http2.settings_ms",
                    round(max(0.0, settings_at - tls_end) * 1000.0, 3),
                )
        span.set_attribute("toolpool.tcp_ms", round((tcp_end - started) * 1000.0, 3))
        if error is not None:
            _fail(span, error)
        span.end(end_time=clock.ns(done))

    def connect_waited(self, dest: DestinationPool, since: float, end: float) -> None:
        if otel_context.get_value(_CALL) is _SKIP:
            return
        call = _current_call()
        if call is not None:
            call.last_end = end
            call.eventful = True
        self._leaf(
            "toolpool.connect.wait",
            since,
            end,
            call,
            {
                "toolpool.destination": dest.name,
                "toolpool.wait_ms": round(max(0.0, end - since) * 1000.0, 3),
            },
        )

    def pinged(self, dest: DestinationPool, since: float, end: float, answered: bool) -> None:
        if otel_context.get_value(_CALL) is _SKIP:
            return
        call = _current_call()
        if call is not None:
            call.last_end = end
            call.eventful = True
        assert self.tracer is not None
        clock = call if call is not None else _Call()
        span = self.tracer.start_span(
            "toolpool.ping",
            attributes={"toolpool.destination": dest.name, "toolpool.ping.answered": answered},
            start_time=clock.ns(since),
        )
        if not answered:
            span.set_status(Status(StatusCode.ERROR, "no PING answer: connection closed"))
        span.end(end_time=clock.ns(end))

    def resent(self, dest: DestinationPool, reason: str) -> None:
        if otel_context.get_value(_CALL) is _SKIP:
            return
        call = _current_call()
        if call is not None:
            call.resends += 1
            call.eventful = True
        trace.get_current_span().add_event(
            "toolpool.resend",
            {"toolpool.destination": dest.name, "toolpool.resend.reason": reason},
        )

    def fell_back(self, dest: DestinationPool) -> None:
        call = _current_call()
        if call is not None and call.attempts > 0:
            call.attempts -= 1  # the HTTP/1.1 driver counts the same attempt again

    def exchanged(
        self,
        dest: DestinationPool,
        sent: float,
        status: int | None,
        error: BaseException | None,
        sent_at: float | None = None,
        reset: bool = False,
    ) -> None:
        value = otel_context.get_value(_CALL)
        if value is _SKIP:
            return
        now = monotonic()
        call = value if isinstance(value, _Call) else None
        if call is not None:
            call.last_end = now
            if not call.eventful and error is None:
                # Nothing but the exchange so far: the request's own span says it all.
                call.quiet_exchange = (dest.name, sent, now, status, sent_at)
                return
        self._response(dest.name, sent, now, status, call, error, sent_at, reset)

    def _response(
        self,
        name: str,
        sent: float,
        ended: float,
        status: int | None,
        call: _Call | None,
        error: BaseException | None,
        sent_at: float | None = None,
        reset: bool = False,
    ) -> None:
        assert self.tracer is not None
        attributes: dict[str, Any] = {"toolpool.destination": name}
        if status is not None:
            attributes["http.response.status_code"] = status
        clock = call if call is not None else _Call()
        span = self.tracer.start_span(
            "toolpool.response", attributes=attributes, start_time=clock.ns(sent)
        )
        if sent_at is not None:
            span.add_event("toolpool.request.sent", timestamp=clock.ns(sent_at))
        if reset:
            span.add_event(
                "toolpool.stream.reset",
                {"toolpool.http2.error_code": "CANCEL"},
                timestamp=clock.ns(ended),
            )
        if error is not None:
            _fail(span, error)
        span.end(end_time=clock.ns(ended))

    @contextmanager
    def token_fetch(self, dest: DestinationPool, reason: str) -> Iterator[object]:
        assert self.tracer is not None
        if otel_context.get_value(_CALL) is _SKIP:
            yield None
            return
        outer = _current_call()
        if outer is not None:
            outer.eventful = True
        call = _Call()
        if reason == "wait":
            name, attributes = "toolpool.auth.wait", {"toolpool.destination": dest.name}
        else:
            name = "toolpool.auth.token"
            attributes = {"toolpool.destination": dest.name, "toolpool.auth.reason": reason}
        span = self.tracer.start_span(name, attributes=attributes, start_time=call.ns(monotonic()))
        # The token request's own attempts are counted apart from the API request's.
        token = otel_context.attach(
            otel_context.set_value(_CALL, call, trace.set_span_in_context(span))
        )
        try:
            yield span
        except BaseException as exc:
            _fail(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end(end_time=call.ns(monotonic()))

    # ------------------------------------------------------------------ adapters

    @contextmanager
    def tool_span(
        self, tool_name: str, call_id: str | None = None, system: str | None = None
    ) -> Iterator[Span | None]:
        """A GenAI `execute_tool` span as the current span around one tool call, for
        frameworks that open none of their own (LangChain)."""
        tracer = self.tracer
        if tracer is None:
            yield None
            return
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool_name,
        }
        if call_id:
            attributes["gen_ai.tool.call.id"] = call_id
        if system:
            attributes["gen_ai.system"] = system
        with tracer.start_as_current_span(
            f"execute_tool {tool_name}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=True,
            set_status_on_exception=True,
        ) as span:
            yield span


def _dest_version(dest: DestinationPool) -> str | None:
    """The protocol version a destination speaks, for a request that got no response."""
    h2 = dest.h2
    if h2 is None or h2.protocol == "http/1.1":
        return "1.1"
    return "2" if h2.protocol == "h2" else None


def _protocol_version(response: httpx.Response) -> str | None:
    version = response.extensions.get("http_version")
    if isinstance(version, bytes):
        version = version.decode("ascii", "replace")
    if not isinstance(version, str):
        return None
    return version.removeprefix("HTTP/")


class TracingLayer:
    """The "tracing" layer of one destination's send chain (outermost, see
    `toolpool._chain`): the client span and the request duration around everything else."""

    role = "tracing"

    def __init__(self, tracing: Tracing, dest: DestinationPool) -> None:
        self.tracing = tracing
        self.dest = dest

    def wrap_async(self, inner: AsyncSend) -> AsyncSend:
        """The traced async send around `inner`."""
        tracing = self.tracing
        dest = self.dest
        begin = tracing._begin
        end = tracing._end

        async def async_send(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            if not tracing.active:
                return await inner(request, ctx)
            started = monotonic()
            span, call, token = begin(dest, request, ctx, started)
            try:
                response = await inner(request, ctx)
            except BaseException as exc:
                end(dest, request, span, call, started, None, exc)
                raise
            finally:
                if token is not None:
                    otel_context.detach(token)
            end(dest, request, span, call, started, response, None)
            return response

        return async_send

    def wrap_sync(self, inner: SyncSend) -> SyncSend:
        """The traced sync send around `inner`."""
        tracing = self.tracing
        dest = self.dest
        begin = tracing._begin
        end = tracing._end

        def sync_send(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            if not tracing.active:
                return inner(request, ctx)
            started = monotonic()
            span, call, token = begin(dest, request, ctx, started)
            try:
                response = inner(request, ctx)
            except BaseException as exc:
                end(dest, request, span, call, started, None, exc)
                raise
            finally:
                if token is not None:
                    otel_context.detach(token)
            end(dest, request, span, call, started, response, None)
            return response

        return sync_send
