"""MutualTLS: a client certificate per auth context, checked by the test bed's mTLS service
(the tenant it reports is the certificate's common name, per connection)."""

from __future__ import annotations

import asyncio

import pytest

import toolpool
from tests._support.oauth_tenants import destination
from toolpool.testing import Downstream, ServiceSpec

MTLS = ServiceSpec(mtls=True, require_auth=False)


def per_tenant(ds: Downstream) -> toolpool.auth.MutualTLS:
    return toolpool.auth.MutualTLS(cert=lambda ctx: ds.client_cert(ctx.tenant))


async def test_each_context_presents_its_own_certificate():
    async with Downstream({"ledger": MTLS}, tls=True) as ds:
        pool = toolpool.Pool(
            [destination(ds, "ledger", auth=per_tenant(ds), max_connections=4, queue_factor=10)]
        )
        async with pool, pool.client() as client:

            async def call(tenant: str) -> str:
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    r = await client.get(ds.url("ledger") + "/anything")
                    return str(r.json()["tenant"])

            tenants = ["acme", "globex", "initech"] * 10
            seen = await asyncio.gather(*(call(t) for t in tenants))
            stats = pool.destination("ledger").auth.stats()
    assert seen == tenants
    assert not ds.stats("ledger").mixed_connections()
    assert stats.provider == "MutualTLS"
    assert stats.fetches_total == 3  # one certificate load per context
    assert stats.contexts == 3


def test_static_certificate_serves_requests_without_context_and_sync():
    with Downstream({"ledger": MTLS}, tls=True) as ds:
        static = toolpool.auth.MutualTLS(cert=ds.client_cert("ops"))
        with toolpool.Pool([destination(ds, "ledger", auth=static)]) as pool:
            body = pool.sync_client().get(ds.url("ledger") + "/anything").json()
    assert body["tenant"] == "ops"


async def test_request_without_context_fails_clearly_and_opens_nothing():
    async with Downstream({"ledger": MTLS}, tls=True) as ds:
        async with toolpool.Pool([destination(ds, "ledger", auth=per_tenant(ds))]) as pool:
            with pytest.raises(toolpool.AuthError, match=r"toolpool\.auth_context"):
                await pool.client().get(ds.url("ledger") + "/anything")
    assert ds.stats("ledger").connections_accepted == 0


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
async def test_warmup_opens_connections_per_listed_context(http2: bool):
    """HTTP/1.1: warm-up's share of the cap (0.5 x 8), split across the listed contexts;
    HTTP/2: one connection per listed context (it carries all of that context's streams)."""
    contexts = [toolpool.AuthContext(tenant=t) for t in ("acme", "globex")]
    opened = 2 if http2 else 4
    async with Downstream({"ledger": MTLS}, tls=True) as ds:
        dest = destination(
            ds,
            "ledger",
            auth=per_tenant(ds),
            max_connections=8,
            warmup=0.5,
            warmup_contexts=contexts,
            http2=http2,
        )
        async with toolpool.Pool([dest]) as pool:
            # The server counts a TLS connection once its side of the handshake is done.
            await ds.wait_stats_async("ledger", lambda s: s.connections_accepted == opened)
            assert pool.stats()["ledger"].idle == opened
            for ctx in contexts:
                with toolpool.auth_context(ctx):
                    r = await pool.client().get(ds.url("ledger") + "/anything")
                assert r.json()["tenant"] == ctx.tenant
                assert r.extensions["toolpool"]["reused"] is True  # a warm connection of ctx
            assert pool.stats()["ledger"].protocol == ("h2" if http2 else "http/1.1")
    assert ds.stats("ledger").connections_accepted == opened
    assert not ds.stats("ledger").mixed_connections()


async def test_unloadable_certificate_is_an_auth_error_and_is_held():
    async with Downstream({"ledger": MTLS}, tls=True) as ds:
        calls = []

        def cert(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
            calls.append(ctx)
            return ("/nonexistent/cert.pem", "/nonexistent/key.pem")

        provider = toolpool.auth.MutualTLS(cert=cert)
        async with toolpool.Pool([destination(ds, "ledger", auth=provider)]) as pool:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                with pytest.raises(toolpool.AuthError, match="cannot load client certificate"):
                    await pool.client().get(ds.url("ledger") + "/anything")
                with pytest.raises(toolpool.AuthError, match="failed recently"):
                    await pool.client().get(ds.url("ledger") + "/anything")
            assert pool.stats()["ledger"].opening == 0
    assert len(calls) == 1
    assert ds.stats("ledger").connections_accepted == 0


def test_mutual_tls_configuration_errors():
    provider = toolpool.auth.MutualTLS(cert=("c.pem", "k.pem"))
    with pytest.raises(toolpool.ConfigError, match="https://"):
        toolpool.Pool([toolpool.Destination("plain", "http://127.0.0.1:9", auth=provider)])
    with pytest.raises(toolpool.ConfigError, match="not both"):
        toolpool.Pool(
            [
                toolpool.Destination(
                    "both",
                    "https://127.0.0.1:9",
                    cert="c.pem",
                    auth=toolpool.auth.MutualTLS(cert="x"),
                )
            ]
        )
    with pytest.raises(toolpool.ConfigError):
        toolpool.auth.MutualTLS(cert=42)  # type: ignore[arg-type]
