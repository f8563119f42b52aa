"""Pooling for tools written with `requests`: a transport adapter over the pool, and the
one-time patch that mounts it on every `requests.Session` a tool call creates.

Theory of operation: `requests.get(...)` builds a `Session` for the one call and
`Session()` mounts urllib3's `HTTPAdapter` (a connection pool per session, so one fresh
connection per call: the storm). `install_requests_patch()` wraps `Session.__init__` once; a
session built inside a `tool_call_scope(..., pool_httpx=True)` gets `RequestsAdapter(pool)`
mounted for ``http://`` and ``https://``, so its requests go through toolpool's thread driver
and act for the scope's auth context. Outside a scope the patch costs one context-variable
read. Closing the session does not close the pool.

What does not change hands: a request that `requests` would send through a proxy (given, or
from the environment) goes through urllib3 as before; so does one with TLS settings of its
own (a `verify=` CA or False, or a client `cert=`), because the pool's `Destination`
decides TLS and silently changing what a tool trusts or presents is worse than not pooling
it (the CA bundle `requests` takes from REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE is process
configuration, not the tool's choice, and does not count). Bodies arrive decoded
(gzip/deflate, as `requests` decodes them), also from `raw.read()`.

`requests` is optional: importing this module imports it, so `toolpool.adapters` imports
this module only when `install_requests_patch` or `RequestsAdapter` is first used.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import requests
import requests.adapters
import requests.cookies
import requests.exceptions
import requests.structures
import requests.utils

from toolpool._auth_context import current_auth
from toolpool._pool import Pool
from toolpool._transport import Transport
from toolpool.adapters._busy import BUSY_ERRORS
from toolpool.adapters._scope import current_tool_call
from toolpool.errors import ToolpoolError

__all__ = ["RequestsAdapter", "install_requests_patch"]

log = logging.getLogger("toolpool.adapters")

_CHUNK = 65536


def _timeouts(timeout: Any) -> dict[str, float | None]:
    """httpx's per-request timeouts from requests' `timeout=` (seconds, a (connect, read)
    pair, a urllib3 Timeout or None). Waiting for a connection stays bounded by the pool."""
    if timeout is None:
        return {"connect": None, "read": None, "write": None, "pool": None}
    if isinstance(timeout, tuple):
        connect, read = timeout
    elif hasattr(timeout, "connect_timeout") and hasattr(timeout, "read_timeout"):
        connect, read = timeout.connect_timeout, timeout.read_timeout
        connect = connect if isinstance(connect, int | float) else None
        read = read if isinstance(read, int | float) else None
    else:
        connect = read = float(timeout)
    return {"connect": connect, "read": read, "write": read, "pool": None}


def _default(verify: Any) -> bool:
    """Whether `verify` is requests' default: True, or the CA bundle that a session with
    `trust_env` takes from REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (process-wide configuration,
    not a choice of the tool)."""
    if verify is True:
        return True
    env = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    return bool(env) and verify == env


def _body(body: Any) -> Any:
    """A PreparedRequest body as httpx content (bytes, or an iterator of bytes)."""
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    if hasattr(body, "read"):

        def chunks() -> Iterator[bytes]:
            while True:
                data = body.read(_CHUNK)
                if not data:
                    return
                yield data.encode("utf-8") if isinstance(data, str) else data

        return chunks()
    return (part.encode("utf-8") if isinstance(part, str) else part for part in body)


class _PooledBody:
    """`Response.raw` for a pooled response: what `requests` reads the body from.

    `stream()` is what `Response.iter_content` (and so `.content` and `.text`) uses; when the
    body has been read to its end, or `close()` / `release_conn()` is called, the connection
    goes back to the pool.
    """

    def __init__(self, response: httpx.Response, headers: httpx.Headers) -> None:
        self._response = response
        self._chunks: Iterator[bytes] | None = None
        self._buffer = b""
        message = http.client.HTTPMessage()
        for name, value in headers.multi_items():
            message[name] = value
        # requests reads cookies from `raw._original_response.msg` (as urllib3 provides it).
        self._original_response = _OriginalResponse(message)
        self.status = response.status_code
        self.reason = _reason(response)

    @property
    def closed(self) -> bool:
        return self._response.is_closed

    def isclosed(self) -> bool:
        """Whether the body is done with its connection."""
        return self._response.is_closed

    def stream(
        self, chunk_size: int | None = _CHUNK, decode_content: bool = True
    ) -> Iterator[bytes]:
        """The (decoded) body in chunks; returns the connection at the end."""
        if self._buffer:
            data, self._buffer = self._buffer, b""
            yield data
        yield from self._iter(chunk_size)

    def read(self, amt: int | None = None, decode_content: bool = True, **_: Any) -> bytes:
        """Up to `amt` bytes of the (decoded) body, all of it when `amt` is None."""
        chunks = self._iter(_CHUNK)
        while amt is None or len(self._buffer) < amt:
            chunk = next(chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if amt is None:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:amt], self._buffer[amt:]
        return data

    def _iter(self, chunk_size: int | None) -> Iterator[bytes]:
        if self._chunks is None:
            self._chunks = self._decoded(chunk_size)
        return self._chunks

    def _decoded(self, chunk_size: int | None) -> Iterator[bytes]:
        try:
            yield from self._response.iter_bytes(chunk_size)
        except httpx.TimeoutException as exc:
            raise requests.exceptions.ConnectionError(f"read timed out: {exc}") from exc
        except httpx.DecodingError as exc:
            raise requests.exceptions.ContentDecodingError(str(exc)) from exc
        except httpx.TransportError as exc:
            raise requests.exceptions.ChunkedEncodingError(str(exc)) from exc
        finally:
            self._response.close()

    def close(self) -> None:
        """Stop reading; the pool closes or reuses the connection as the protocol allows."""
        self._response.close()

    def release_conn(self) -> None:
        """Called by `Response.close()`."""
        self._response.close()


class _OriginalResponse:
    __slots__ = ("msg",)

    def __init__(self, msg: http.client.HTTPMessage) -> None:
        self.msg = msg


def _reason(response: httpx.Response) -> str:
    phrase = response.extensions.get("reason_phrase", b"")
    if isinstance(phrase, bytes):
        return phrase.decode("ascii", "replace")
    return str(phrase)


class RequestsAdapter(requests.adapters.BaseAdapter):
    """A `requests` transport adapter that sends through a toolpool `Pool`.

    ```python
    session = requests.Session()
    session.mount("https://", toolpool.adapters.RequestsAdapter(pool))
    session.mount("http://", toolpool.adapters.RequestsAdapter(pool))
    ```

    Requests act for `toolpool.current_auth()`. toolpool's own errors (`PoolSaturated`,
    `PoolTimeout`, `DestinationUnavailable`, `AuthError`, ...) propagate unchanged, so an
    adapter's tool wrapper can turn busy ones into a readable result; other transport errors
    become the `requests` exceptions tool code already handles (`ConnectTimeout`,
    `ReadTimeout`, `ConnectionError`). Proxied requests and requests with TLS settings of
    their own go through a plain `HTTPAdapter` instead. Closing it does not close the pool.
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self._transport = Transport(pool)
        self._fallback: requests.adapters.HTTPAdapter | None = None
        self._fallback_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<toolpool.adapters.RequestsAdapter {self.pool!r}>"

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        """Send `request` through the pool (see the class docstring for what does not)."""
        url = request.url or ""
        if (proxies and requests.utils.select_proxy(url, proxies)) or cert or not _default(verify):
            return self._fallback_adapter().send(
                request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies
            )
        outgoing = httpx.Request(
            request.method or "GET",
            url,
            headers=list(request.headers.items()),
            content=_body(request.body),
            extensions={"timeout": _timeouts(timeout)},
        )
        call = current_tool_call()
        try:
            if call is not None and call.pool is self.pool:
                # Inside a tool call: its gates and waits apply (see tool_call_scope).
                dest = self.pool.route(outgoing.url)
                call.used(dest.name)
                response = call.send_sync(dest, outgoing, current_auth() or call.ctx)
            else:
                response = self._transport.handle_request(outgoing)
        except BUSY_ERRORS as exc:
            if call is not None:
                call.met_busy(exc)
            raise
        except ToolpoolError:
            raise
        except httpx.ConnectTimeout as exc:
            raise requests.exceptions.ConnectTimeout(str(exc), request=request) from exc
        except httpx.TimeoutException as exc:
            raise requests.exceptions.ReadTimeout(str(exc), request=request) from exc
        except httpx.UnsupportedProtocol as exc:
            raise requests.exceptions.InvalidURL(str(exc), request=request) from exc
        except httpx.TransportError as exc:
            raise requests.exceptions.ConnectionError(str(exc), request=request) from exc
        meta = response.extensions.get("toolpool")
        if call is not None and isinstance(meta, dict):
            call.used(str(meta["destination"]))
        return self._build(request, response)

    def _build(
        self, request: requests.PreparedRequest, response: httpx.Response
    ) -> requests.Response:
        result = requests.Response()
        result.status_code = response.status_code
        headers: requests.structures.CaseInsensitiveDict[str] = (
            requests.structures.CaseInsensitiveDict()
        )
        for name, value in response.headers.multi_items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        result.headers = headers
        result.encoding = requests.utils.get_encoding_from_headers(headers)
        raw = _PooledBody(response, response.headers)
        result.raw = raw
        result.reason = raw.reason
        result.url = request.url or ""
        requests.cookies.extract_cookies_to_jar(result.cookies, request, raw)  # type: ignore[no-untyped-call]
        result.request = request
        result.connection = self  # type: ignore[assignment]  # requests types it as HTTPAdapter
        return result

    def _fallback_adapter(self) -> requests.adapters.HTTPAdapter:
        with self._fallback_lock:
            if self._fallback is None:
                self._fallback = requests.adapters.HTTPAdapter()
            return self._fallback

    def close(self) -> None:
        """Close the fallback adapter, if one was used; the pool stays open."""
        with self._fallback_lock:
            fallback, self._fallback = self._fallback, None
        if fallback is not None:
            fallback.close()


# ---------------------------------------------------------------------- the Session patch

_patch_lock = threading.Lock()
_patched = False


def install_requests_patch() -> None:
    """Patch `requests.Session.__init__` once (idempotent): a session built inside a
    `tool_call_scope(..., pool_httpx=True)` gets `RequestsAdapter` on the scope's pool for
    ``http://`` and ``https://``. Outside a scope sessions are untouched."""
    global _patched
    if _patched:
        return
    with _patch_lock:
        if _patched:
            return
        original = requests.Session.__init__

        @functools.wraps(original)
        def __init__(self: requests.Session, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            call = current_tool_call()
            if call is not None and call.pool_httpx:
                adapter = RequestsAdapter(call.pool)
                self.mount("https://", adapter)
                self.mount("http://", adapter)

        __init__._toolpool_original = original  # type: ignore[attr-defined]
        requests.Session.__init__ = __init__  # type: ignore[method-assign]
        _patched = True
