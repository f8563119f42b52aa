"""Graceful drain: SIGTERM to a `toolpool serve` process under load loses no accepted request.

Twenty slow requests are in flight at the downstream when the signal arrives and five
workers keep sending; afterwards every request the service accepted was answered (its drain
report), every answer was a 200, the downstream served exactly those, and requests the
service never accepted failed at the connection level only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests._support.pool_service import AGENT_B_TOKEN, ServiceProcess, service_config, write_config
from toolpool.testing import Downstream

HEADERS = {"Authorization": f"Bearer {AGENT_B_TOKEN}", "X-Toolpool-Tenant": "acme"}
NOT_ACCEPTED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


async def test_sigterm_under_load_loses_no_accepted_request(ds: Downstream, tmp_path: Path) -> None:
    text = service_config(ds, search_cap=32, service="drain_timeout = 20.0")
    with ServiceProcess(write_config(tmp_path, text)) as svc:
        slow_client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40))
        slow = [
            asyncio.ensure_future(
                slow_client.get(svc.url + "/d/search/delay?s=1.0", headers=HEADERS)
            )
            for _ in range(20)
        ]
        stop = asyncio.Event()
        outcomes: list[object] = []

        async def worker() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                while True:
                    try:
                        r = await client.get(svc.url + "/d/search/delay?s=0.02", headers=HEADERS)
                    except NOT_ACCEPTED as exc:
                        outcomes.append(type(exc))
                        return
                    outcomes.append(r.status_code)
                    if stop.is_set() and len(outcomes) > 10_000:
                        return

        workers = [asyncio.ensure_future(worker()) for _ in range(5)]
        # Every slow request is inside the downstream: in flight end to end.
        await ds.wait_stats_async("search", lambda s: s.requests_in_progress >= 20, timeout=30)
        code = await asyncio.to_thread(svc.terminate, 60)
        stop.set()
        slow_results = await asyncio.gather(*slow, return_exceptions=True)
        await asyncio.wait_for(asyncio.gather(*workers), 30)
        await slow_client.aclose()
    assert code == 0, "".join(svc.stderr_lines)
    assert [getattr(r, "status_code", r) for r in slow_results] == [200] * 20
    statuses = [o for o in outcomes if isinstance(o, int)]
    failures = [o for o in outcomes if not isinstance(o, int)]
    assert set(statuses) <= {200}, outcomes
    assert len(failures) == 5  # each worker stops at its first refused connection
    report = svc.drained()
    answered_ok = 20 + len(statuses)
    assert report["accepted"] == report["answered"] == answered_ok, report
    assert report["aborted"] == 0 and report["in_flight"] == 0, report
    assert ds.stats("search").requests_total == answered_ok
