"""vcrpy support: cassettes that record and replay requests sent through toolpool's transports.

vcrpy 8+ hooks httpx's own transports (`httpx.HTTPTransport`, ...), so a pooled client, whose
transport is `toolpool.AsyncTransport` / `toolpool.Transport`, goes unrecorded. `vcr_patches()`
gives vcrpy the same hook on toolpool's transports. It sits *above* the auth registry, which
sets credentials on a copy of each request inside the transport and sends token requests
without going through any transport, so no credential toolpool injects reaches a cassette.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import httpx

from toolpool._transport import AsyncTransport, Transport

__all__ = ["vcr_patches"]

# The transports' own methods, captured before vcrpy patches them.
_REAL_ASYNC = AsyncTransport.handle_async_request
_REAL_SYNC = Transport.handle_request


class _BindsLikeAMethod(type):
    """vcrpy patches an attribute with a *class* (a subclass per cassette, carrying
    `cassette`); this metaclass makes that class bind to the transport like a method."""

    def __get__(cls, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return cls
        return functools.partial(cls.handle, instance)  # type: ignore[attr-defined]


class _AsyncRecorder(metaclass=_BindsLikeAMethod):
    cassette: Any = None

    @classmethod
    async def handle(cls, transport: AsyncTransport, request: httpx.Request) -> httpx.Response:
        from vcr.stubs.httpx_stubs import vcr_handle_async_request  # type: ignore[import-untyped]

        handler = vcr_handle_async_request(cls.cassette, _REAL_ASYNC, httpx)
        response: httpx.Response = await handler(transport, request)
        return response


class _SyncRecorder(metaclass=_BindsLikeAMethod):
    cassette: Any = None

    @classmethod
    def handle(cls, transport: Transport, request: httpx.Request) -> httpx.Response:
        from vcr.stubs.httpx_stubs import vcr_handle_request

        handler = vcr_handle_request(cls.cassette, _REAL_SYNC, httpx)
        response: httpx.Response = handler(transport, request)
        return response


def vcr_patches() -> tuple[tuple[Any, str, Any], ...]:
    """`custom_patches` for vcrpy so that cassettes record pooled clients.

    ```python
    my_vcr = vcr.VCR(custom_patches=toolpool.auth.vcr_patches(),
                     filter_headers=["authorization", "x-api-key"])
    with my_vcr.use_cassette("tools.yaml"):
        ...  # requests through pool.client() / toolpool.AsyncTransport are recorded
    ```

    Returns no patches with a vcrpy that hooks httpx above the transport (vcrpy < 8 patched
    `httpx.AsyncClient._send_single_request`), where pooled clients are recorded anyway.
    """
    try:
        from vcr.stubs import httpx_stubs  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError("toolpool.auth.vcr_patches() needs vcrpy: pip install vcrpy") from exc
    hook = getattr(httpx_stubs, "vcr_handle_async_request", None)
    if hook is None or len(inspect.signature(hook).parameters) != 3:
        return ()
    return (
        (AsyncTransport, "handle_async_request", _AsyncRecorder),
        (Transport, "handle_request", _SyncRecorder),
    )
