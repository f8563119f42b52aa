"""Downstream lifecycle: sync and async use, its own thread, nothing left behind."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from toolpool.testing import Downstream, ServiceSpec

OPEN = ServiceSpec(require_auth=False)


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "auto"])
def test_sync_use_serves_then_closes_every_port_and_joins_its_thread(loop: str) -> None:
    threads_before = threading.active_count()
    ds = Downstream({"a": OPEN, "b": OPEN}, tls=True, latency=0.01, loop=loop)  # type: ignore[arg-type]
    with ds:
        assert threading.active_count() == threads_before + 1
        addresses = [ds.address(n) for n in "ab"] + [ds.address(n, direct=True) for n in "ab"]
        assert len(set(addresses)) == 4  # one port per service, one per relay
        assert all(host == "127.0.0.1" for host, _ in addresses)
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            assert client.get(ds.url("a") + "/anything").json()["service"] == "a"
            assert client.get(ds.url("b") + "/anything").json()["service"] == "b"
            # Closing the Downstream under a client's open connection is fine.
    assert threading.active_count() == threads_before
    assert all(_refused(address) for address in addresses)
    assert ds.stats("a").connections_open == 0  # the last snapshot stays readable


async def test_async_start_and_stop_yield_to_the_callers_loop() -> None:
    ds = Downstream({"api": OPEN}, tls=True)
    ticked = asyncio.Event()
    asyncio.get_running_loop().call_soon(ticked.set)
    await ds.astart()
    assert ticked.is_set()  # astart awaited the server thread instead of blocking
    try:
        async with httpx.AsyncClient(verify=ds.client_ssl_context()) as client:
            assert (await client.get(ds.url("api") + "/anything")).status_code == 200
    finally:
        ticked.clear()
        asyncio.get_running_loop().call_soon(ticked.set)
        await ds.aclose()
        assert ticked.is_set()
    assert _refused(ds.address("api", direct=True))


async def test_async_context_manager() -> None:
    async with Downstream({"api": OPEN}) as ds, httpx.AsyncClient() as client:
        assert (await client.get(ds.url("api") + "/anything")).status_code == 200


def test_a_downstream_starts_once_and_needs_to_be_running() -> None:
    ds = Downstream({"api": OPEN})
    with pytest.raises(RuntimeError, match="not running"):
        ds.url("api")
    with ds:
        with pytest.raises(RuntimeError, match="already started"):
            ds.start()
        with pytest.raises(KeyError, match="nope"):
            ds.url("nope")


@pytest.mark.parametrize(
    ("services", "kwargs", "error"),
    [
        ({}, {}, ValueError),
        ({"bad name": OPEN}, {}, ValueError),
        ({"api": {"require_auth": False}}, {}, TypeError),
        ({"api": OPEN}, {"latency": -1.0}, ValueError),
        ({"api": OPEN}, {"loop": "trio"}, ValueError),
    ],
)
def test_invalid_configuration_fails_early(
    services: dict[str, object], kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Downstream(services, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"service_time": -1.0},
        {"service_time": (0.3, 0.1)},
        {"concurrency_limit": 0},
        {"keepalive_timeout": 0.0},
        {"token_latency": float("nan")},
    ],
)
def test_invalid_service_specs_fail_early(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its field
        ServiceSpec(**kwargs)  # type: ignore[arg-type]


def test_service_time_is_applied_per_request() -> None:
    spec = ServiceSpec(require_auth=False, service_time=(0.1, 0.2))
    with Downstream({"api": spec}) as ds, httpx.Client() as client:
        for _ in range(3):
            response = client.get(ds.url("api") + "/anything")
            assert response.elapsed.total_seconds() >= 0.1


def test_importing_toolpool_stays_light() -> None:
    code = (
        "import sys, toolpool; assert 'toolpool.testing' not in sys.modules; "
        "import toolpool.testing; assert 'trustme' not in sys.modules, 'trustme imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_package_docstring_example_runs() -> None:
    import textwrap

    import toolpool.testing

    doc = toolpool.testing.__doc__ or ""
    example = doc.split("::\n\n", 1)[1].split("\n\nWhat is here", 1)[0]
    exec(compile(textwrap.dedent(example), "toolpool.testing docstring", "exec"), {})
