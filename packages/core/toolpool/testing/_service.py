"""One named service of the test bed: its endpoints, auth, concurrency limit, faults, counters.

A :class:`Service` is the :class:`~toolpool.testing._connection.Handler` of every connection
to its port. It runs on the Downstream's loop; everything slow (service time, token latency,
streams) is a loop timer, so a request costs no Task and no thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import random
import ssl
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlsplit

from toolpool.testing._certs import peer_common_name
from toolpool.testing._connection import HttpConnection
from toolpool.testing._faults import FAULT_HEADER, Effects, FaultBoard, parse_fault_header
from toolpool.testing._h2server import AlpnSwitch, H2ServerConnection, H2Stream
from toolpool.testing._http import Request
from toolpool.testing._spec import ServiceSpec, draw_seconds
from toolpool.testing._stats import Counters
from toolpool.testing._tokens import Identity, SubjectTokens, TokenIssuer

TOKEN_PATH = "/oauth/token"
STATS_PATH = "/_testbed/stats"
GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"

_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_INVALID_TOKEN = (("www-authenticate", 'Bearer error="invalid_token"'),)
_INVALID_TOKEN_BODY = b'{"error":"invalid_token"}'
_OVER_LIMIT_BODY = b'{"error":"over_concurrency_limit"}'
_PATTERN = bytes(range(256))

#: One request's exchange: an HTTP/1.1 connection, or one stream of an HTTP/2 connection.
Exchange = HttpConnection | H2Stream
#: A server-side connection of either protocol.
ServerConnection = HttpConnection | H2ServerConnection


def _dumps(value: object) -> bytes:
    return _encode_json(value).encode()


def _error(error: str, description: str | None = None) -> bytes:
    body: dict[str, str] = {"error": error}
    if description:
        body["error_description"] = description
    return _dumps(body)


def _redirect_target_ok(target: str) -> bool:
    """Same-origin paths, and absolute URLs whose host cannot leave this machine unless a
    test maps it: loopback literals and names under the reserved .test domain (RFC 6761)."""
    if target.startswith("/"):
        return not target.startswith("//")
    parts = urlsplit(target)
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host.endswith(".test"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


class _Call:
    """An admitted API request waiting on a timer (service time, a stream, or forever)."""

    __slots__ = ("conn", "identity", "request", "service", "timer")

    def __init__(
        self, service: Service, conn: Exchange, request: Request, identity: Identity | None
    ) -> None:
        self.service = service
        self.conn = conn
        self.request = request
        self.identity = identity
        self.timer: asyncio.TimerHandle | None = None

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.service.counters.api_finished()


class _TokenCall:
    """A token request waiting out the identity provider's latency."""

    __slots__ = ("timer",)

    def __init__(self, timer: asyncio.TimerHandle) -> None:
        self.timer = timer

    def abort(self) -> None:
        self.timer.cancel()


class Service:
    """A service: endpoints + auth + limit + faults + counters, serving one listening port."""

    def __init__(
        self,
        name: str,
        spec: ServiceSpec,
        *,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        subject_tokens: SubjectTokens,
    ) -> None:
        self.name = name
        self.spec = spec
        self.counters = Counters()
        self.faults = FaultBoard(rng)
        self.tokens = TokenIssuer()
        self._loop = loop
        self._rng = rng
        self._subject_tokens = subject_tokens
        self._connections: set[ServerConnection] = set()
        #: Set by the Downstream when this service listens with TLS and offers ``h2``.
        self.offers_h2 = False
        #: The TLS context offering only ``http/1.1`` (set by the Downstream with ``offers_h2``).
        self.http1_context: ssl.SSLContext | None = None

    def protocol(self) -> asyncio.Protocol:
        """A protocol factory for ``loop.create_server``."""
        if self.offers_h2:
            return AlpnSwitch(self._http1, self._http2)
        return self._http1()

    def _http1(self) -> HttpConnection:
        return HttpConnection(self, self._loop, self.spec.keepalive_timeout)

    def _http2(self) -> H2ServerConnection:
        return H2ServerConnection(
            self, self._loop, self.spec.keepalive_timeout, self.spec.max_concurrent_streams
        )

    def alpn_callback(
        self, ssl_object: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        """The TLS server-name callback: an ``http1`` fault makes this handshake pick
        HTTP/1.1 (by switching to the HTTP/1.1-only context before ALPN is decided)."""
        if self.http1_context is not None and self.faults.on_connection("http1"):
            self.counters.fault_fired("http1")
            ssl_object.context = self.http1_context

    def abort_all(self) -> None:
        """Abort every open connection (shutdown)."""
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()

    # -- Handler -------------------------------------------------------------------------

    def connection_made(self, conn: ServerConnection) -> bool:
        conn.id = self.counters.connection_opened()
        self._connections.add(conn)
        if self.spec.mtls:
            assert conn.transport is not None
            conn.peer_common_name = peer_common_name(conn.transport.get_extra_info("peercert"))
        if self.faults.on_connection():
            self.counters.fault_fired("down")
            return False
        return True

    def connection_lost(self, conn: ServerConnection) -> None:
        self._connections.discard(conn)
        self.counters.connection_closed()

    def connection_idle_closed(self, conn: ServerConnection) -> None:
        # Counted when decided: a TLS close waits for the client's close_notify (or a
        # timeout) before the TCP connection is gone.
        self.counters.closed_for_idle()

    def handle(self, conn: Exchange, request: Request) -> None:
        path = request.path
        if path.startswith("/_testbed/"):
            self._admin(conn, request)
            return
        is_token = path == TOKEN_PATH
        fired: list[str] = []
        effects = self.faults.on_request(
            "token" if is_token else "api", fired, http2=isinstance(conn, H2Stream)
        )
        header_fault = request.headers.get(FAULT_HEADER)
        if header_fault is not None:
            try:
                fault = parse_fault_header(header_fault)
            except ValueError as exc:
                self.counters.request_received(conn.id, False, None)
                self.counters.responded(400)
                conn.respond(400, _error("bad_fault_header", str(exc)))
                return
            effects = effects or Effects()
            effects.apply(fault)
            fired.append(fault.kind)
        for kind in fired:
            self.counters.fault_fired(kind)
        if is_token:
            self._token_request(conn, request, effects)
        else:
            self._api_request(conn, request, effects)

    # -- faults that pre-empt the request ------------------------------------------------

    def _pre_empt(self, conn: Exchange, effects: Effects) -> None:
        """Apply the ``reset``, ``down``, ``status`` or HTTP/2 fault that takes this request."""
        if isinstance(conn, H2Stream) and effects.goaway:
            conn.goaway()
        elif isinstance(conn, H2Stream) and effects.rst_stream is not None:
            conn.rst(effects.rst_stream)
        elif effects.reset:
            conn.reset()
        elif effects.drop:
            conn.drop()
        elif effects.status is not None:
            headers: tuple[tuple[str, str], ...] = ()
            if effects.retry_after is not None:
                headers = (("retry-after", _format_seconds(effects.retry_after)),)
            self.counters.responded(effects.status)
            conn.respond(
                effects.status,
                _dumps({"error": "fault_injected", "status": effects.status}),
                headers,
                close_silently=effects.close_after_response,
            )

    # -- API endpoints -------------------------------------------------------------------

    def _identify(self, conn: Exchange, request: Request) -> tuple[bool, Identity | None]:
        """(authorized, identity); identity is None when the request names no tenant."""
        spec = self.spec
        if spec.require_auth:
            auth = request.headers.get("authorization")
            if auth is None or auth[:7].lower() != "bearer ":
                return False, None
            identity = self.tokens.validate(auth[7:].strip())
            if identity is None or (spec.mtls and identity.tenant != conn.peer_common_name):
                return False, None
            return True, identity
        if spec.mtls:
            return True, Identity(tenant=conn.peer_common_name)
        tenant = request.headers.get("x-tenant")
        return True, None if tenant is None else Identity(tenant=tenant)

    def _api_request(self, conn: Exchange, request: Request, effects: Effects | None) -> None:
        authorized, identity = self._identify(conn, request)
        tenant = None if identity is None else identity.tenant
        counters = self.counters
        if effects is not None and effects.pre_empts:
            counters.request_received(conn.id, authorized, tenant)
            self._pre_empt(conn, effects)
            return
        admitted = counters.api_request(conn.id, authorized, tenant, self.spec.concurrency_limit)
        if admitted is None:
            counters.responded(503)
            conn.respond(503, _OVER_LIMIT_BODY, close_silently=_closes(effects))
            return
        if not admitted:
            counters.responded(401)
            conn.respond(401, _INVALID_TOKEN_BODY, _INVALID_TOKEN, close_silently=_closes(effects))
            return
        delay = draw_seconds(self.spec.service_time, self._rng) if self.spec.service_time else 0.0
        if effects is not None:
            delay += effects.delay
        path = request.path
        if path == "/delay":
            delay += _float_arg(request.query, "s", 0.0)
        elif path == "/hang":
            conn.in_flight = _Call(self, conn, request, identity)  # answered never
            return
        if delay <= 0.0:
            self._route(conn, request, identity, effects)
            return
        call = _Call(self, conn, request, identity)
        call.timer = self._loop.call_later(delay, self._route_later, call, effects)
        conn.in_flight = call

    def _route_later(self, call: _Call, effects: Effects | None) -> None:
        call.timer = None
        self._route(call.conn, call.request, call.identity, effects, call)

    def _route(
        self,
        conn: Exchange,
        request: Request,
        identity: Identity | None,
        effects: Effects | None,
        call: _Call | None = None,
    ) -> None:
        """Answer an admitted API request by its path."""
        try:
            self._answer(conn, request, identity, effects, call)
        except ValueError as exc:  # a malformed query argument
            self.counters.responded(400, api_finished=True)
            conn.respond(400, _error("bad_request", str(exc)), close_silently=_closes(effects))

    def _answer(
        self,
        conn: Exchange,
        request: Request,
        identity: Identity | None,
        effects: Effects | None,
        call: _Call | None,
    ) -> None:
        path = request.path
        head_only = request.method == "HEAD"
        close_silently = _closes(effects)
        info: dict[str, Any] = {
            "service": self.name,
            "tenant": None if identity is None else identity.tenant,
            "subject": None if identity is None else identity.subject,
            "client_id": None if identity is None else identity.client_id,
            "connection_id": conn.id,
            "request_on_connection": conn.requests,
            "method": request.method,
            "path": path,
            "query": request.query,
        }
        headers: list[tuple[str, str]] = [("x-connection-id", str(conn.id))]
        status = 200
        content_type = "application/json"
        close = False
        if path == "/bytes":
            body = _pattern(int(_query(request.query).get("n", "0")))
            content_type = "application/octet-stream"
        elif path == "/stream":
            self._stream(conn, request, call, close_silently)
            return
        elif path == "/echo":
            info["body"] = request.body.decode("utf-8", "replace")
            info["headers"] = request.headers
            body = _dumps(info)
        elif path.startswith("/status/"):
            try:
                status = int(path[len("/status/") :])
            except ValueError:
                status = 0
            if not 200 <= status <= 599:
                status = 400
                info["error"] = "status must be an integer within 200..599"
            retry_after = _query(request.query).get("retry_after")
            if retry_after is not None:
                headers.append(("retry-after", retry_after))
            body = _dumps(info)  # dropped by respond() for 204 and 304
        elif path == "/redirect":
            target = _query(request.query).get("to", "/anything")
            if not _redirect_target_ok(target):
                status = 400  # the test bed never points off loopback
                info["error"] = (
                    "'to' must be a path starting with '/', or an http:// URL on a loopback "
                    "address or a reserved .test name (resolved only by a test's HostMap)"
                )
            else:
                status = 302
                headers.append(("location", target))
            body = _dumps(info)
        elif path == "/cookies/set":
            cookies = dict(parse_qsl(request.query, keep_blank_values=True))
            headers.extend(("set-cookie", f"{k}={v}; Path=/") for k, v in cookies.items())
            info["cookies"] = cookies
            body = _dumps(info)
        elif path == "/cookies":
            info["cookies"] = _parse_cookie(request.headers.get("cookie", ""))
            body = _dumps(info)
        elif path == "/close":
            close = True
            body = _dumps(info)
        else:  # /anything, /delay and every other path
            info["body_size"] = len(request.body)
            body = _dumps(info)
        self.counters.responded(status, api_finished=True)
        conn.respond(
            status,
            body,
            headers,
            content_type=content_type,
            close=close,
            head_only=head_only,
            close_silently=close_silently,
        )

    def _stream(
        self, conn: Exchange, request: Request, call: _Call | None, close_silently: bool
    ) -> None:
        query = _query(request.query)
        chunks = max(0, int(query.get("chunks", "10")))
        chunk = _pattern(int(query.get("size", "1024")))
        delay = max(0.0, float(query.get("delay", "0")))
        if call is None:
            call = _Call(self, conn, request, None)
        conn.in_flight = call
        conn.start_stream(
            200,
            (("content-type", "application/octet-stream"), ("x-connection-id", str(conn.id))),
            head_only=request.method == "HEAD",
        )

        def send(remaining: int) -> None:
            call.timer = None
            while remaining > 0:
                conn.send_chunk(chunk)
                remaining -= 1
                if delay > 0 and remaining > 0:
                    call.timer = self._loop.call_later(delay, send, remaining)
                    return
            self.counters.responded(200, api_finished=True)
            conn.end_stream(close_silently=close_silently)

        send(chunks)

    # -- token endpoint ------------------------------------------------------------------

    def _token_request(self, conn: Exchange, request: Request, effects: Effects | None) -> None:
        status, body, headers, identity = self._grant(conn, request)
        tenant = None if identity is None else identity.tenant
        self.counters.token_request(conn.id, identity is not None, tenant)
        if effects is not None and effects.pre_empts:
            self._pre_empt(conn, effects)
            return
        delay = draw_seconds(self.spec.token_latency, self._rng)
        if effects is not None:
            delay += effects.delay
        close_silently = _closes(effects)
        timer = self._loop.call_later(
            delay, self._token_answer, conn, status, body, headers, identity, close_silently
        )
        conn.in_flight = _TokenCall(timer)

    def _token_answer(
        self,
        conn: Exchange,
        status: int,
        body: bytes | None,
        headers: tuple[tuple[str, str], ...],
        identity: Identity | None,
        close_silently: bool,
    ) -> None:
        if body is None:  # success: the token's lifetime starts when it is handed out
            assert identity is not None
            ttl = self.spec.token_ttl
            grant: dict[str, Any] = {
                "access_token": self.tokens.issue(identity, ttl),
                "token_type": "Bearer",
                "expires_in": int(ttl) if ttl == int(ttl) else ttl,
            }
            if identity.subject is not None:
                grant["issued_token_type"] = TOKEN_TYPE_ACCESS
            body = _dumps(grant)
        self.counters.responded(status)
        conn.respond(status, body, headers, close_silently=close_silently)

    def _grant(
        self, conn: Exchange, request: Request
    ) -> tuple[int, bytes | None, tuple[tuple[str, str], ...], Identity | None]:
        """Decide a token request: (status, error body or None for success, headers, identity)."""
        no_store = (("cache-control", "no-store"),)
        if request.method != "POST":
            return 405, _error("invalid_request", "use POST"), (("allow", "POST"),), None
        form = {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace"), True).items()}
        client_id, secret, used_basic = form.get("client_id"), form.get("client_secret"), False
        auth = request.headers.get("authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(auth[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            user, _, password = decoded.partition(":")
            client_id, secret, used_basic = unquote_plus(user), unquote_plus(password), True
        unauthorized = (
            401,
            _error("invalid_client"),
            (("www-authenticate", 'Basic realm="token"'), *no_store) if used_basic else no_store,
            None,
        )
        client: Identity | None = None
        if client_id is not None and secret is not None:
            client = self.tokens.authenticate(client_id, secret)
            if client is None:
                return unauthorized
        grant_type = form.get("grant_type")
        if grant_type == GRANT_CLIENT_CREDENTIALS:
            if client is None and self.spec.mtls and conn.peer_common_name and secret is None:
                # RFC 8705 tls_client_auth: the client certificate authenticates the client.
                client = Identity(tenant=conn.peer_common_name, client_id=client_id)
            if client is None:
                return unauthorized
            return 200, None, no_store, client
        if grant_type == GRANT_TOKEN_EXCHANGE:
            if client_id is not None and client is None:
                return unauthorized
            if form.get("subject_token_type") != TOKEN_TYPE_ACCESS:
                return (
                    400,
                    _error("invalid_request", f"subject_token_type must be {TOKEN_TYPE_ACCESS}"),
                    no_store,
                    None,
                )
            subject = self._subject_tokens.lookup(form.get("subject_token", ""))
            if subject is None:
                return 400, _error("invalid_grant", "unknown subject_token"), no_store, None
            identity = Identity(
                tenant=subject.tenant,
                subject=subject.subject,
                client_id=None if client is None else client.client_id,
            )
            return 200, None, no_store, identity
        return 400, _error("unsupported_grant_type"), no_store, None

    # -- admin ---------------------------------------------------------------------------

    def _admin(self, conn: Exchange, request: Request) -> None:
        """``GET /_testbed/stats``; not counted, needs no auth."""
        if request.path == STATS_PATH:
            conn.respond(200, _dumps(self.counters.snapshot().to_json()))
        else:
            conn.respond(404, _error("not_found", f"only {STATS_PATH} lives under /_testbed/"))


def _closes(effects: Effects | None) -> bool:
    return effects is not None and effects.close_after_response


def _query(query: str) -> dict[str, str]:
    return dict(parse_qsl(query, keep_blank_values=True))


def _pattern(n: int) -> bytes:
    """``n`` bytes of a repeating 0..255 pattern (corruption shows)."""
    if n < 0:
        raise ValueError(f"a byte count must be >= 0, got {n}")
    return (_PATTERN * (n // 256 + 1))[:n]


def _float_arg(query: str, name: str, default: float) -> float:
    value = _query(query).get(name)
    try:
        return default if value is None else max(0.0, float(value))
    except ValueError:
        return default


def _parse_cookie(header: str) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            cookies[name] = value
    return cookies
