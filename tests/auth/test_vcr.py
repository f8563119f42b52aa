"""vcrpy records tool traffic sent through a pooled client and replays it offline, and no
credential toolpool injected (bearer token, OAuth client secret, access token) is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import vcr
from vcr.errors import CannotOverwriteExistingCassetteException

import toolpool
from tests._support.oauth_tenants import (
    RUN,
    client_secret,
    destination,
    oauth,
    register,
    tenant_ctx,
)
from toolpool.testing import Downstream, ServiceSpec

SERVICES = {"crm": ServiceSpec(token_latency=0.01), "search": ServiceSpec(require_auth=False)}


def recorder(*, filter_headers: bool = True, **kwargs: object) -> vcr.VCR:
    """The settings the README recommends. `filter_headers` scrubs credentials that tool code
    sets itself; the test records without it, to show that toolpool's never get that far."""
    return vcr.VCR(
        custom_patches=toolpool.auth.vcr_patches(),
        filter_headers=["authorization", "x-api-key"] if filter_headers else [],
        decode_compressed_response=True,
        **kwargs,
    )


def pool_for(ds: Downstream) -> toolpool.Pool:
    return toolpool.Pool(
        [
            destination(ds, "crm", auth=oauth(ds)),
            destination(ds, "search", auth=toolpool.auth.Bearer(f"bearer-{RUN}")),
        ]
    )


async def tool_calls(pool: toolpool.Pool, crm: str, search: str) -> list[object]:
    async with pool.client() as client:
        with toolpool.auth_context(tenant_ctx("acme")):
            a = (await client.get(crm + "/anything?q=1")).json()
            b = (await client.post(crm + "/anything", json={"note": "hello"})).json()
            c = (await client.get(search + "/anything")).json()
    return [a, b, c]


async def test_cassette_recorded_through_the_pool_replays_offline_without_credentials(tmp_path):
    cassette = Path(tmp_path) / "tools.yaml"
    async with Downstream(SERVICES, tls=True) as ds:
        register(ds, "crm", ["acme"])
        crm, search = ds.url("crm"), ds.url("search")
        async with pool_for(ds) as pool:
            record = recorder(record_mode="once", filter_headers=False)
            with record.use_cassette(str(cassette)) as cass:
                recorded = await tool_calls(pool, crm, search)
            assert len(cass) == 3  # the three tool calls, not the token request
            # Outside the cassette: the servers did get the credentials toolpool injected.
            with toolpool.auth_context(tenant_ctx("acme")):
                echoed = (await pool.client().get(search + "/echo")).json()["headers"]
        assert echoed["authorization"] == f"Bearer bearer-{RUN}"
        assert recorded[0]["tenant"] == "acme"  # only a valid access token says so
        assert recorded[1]["body_size"] == len(b'{"note":"hello"}')
        assert ds.stats("crm").token_requests == 1
        dest_urls = (crm, search)
    # The Downstream is stopped: replay below is offline.
    text = cassette.read_text()
    assert text.count("uri:") == 3
    assert '{"note":"hello"}' in text  # the tool's own request body is recorded
    assert "/oauth/token" not in text
    assert client_secret("acme") not in text
    assert RUN not in text  # neither the client secret nor the bearer token
    assert "tb-access-" not in text  # nor any access token the test bed issued
    assert "authorization" not in text.lower()
    # No warm-up: it would try the stopped servers, and on HTTP/2 (the default) take a stream
    # permit for that connect; the counts below are the replayed requests' alone.
    replay_pool = toolpool.Pool(
        [
            toolpool.Destination("crm", dest_urls[0], auth=oauth_for_replay()),
            toolpool.Destination("search", dest_urls[1], auth=toolpool.auth.Bearer("unused")),
        ],
        warmup=0.0,
    )
    async with replay_pool:
        with recorder(record_mode="none").use_cassette(str(cassette)):
            replayed = await tool_calls(replay_pool, *dest_urls)
            with pytest.raises(CannotOverwriteExistingCassetteException):
                async with replay_pool.client() as client:
                    await client.get(dest_urls[0] + "/not-recorded")
        assert replayed == recorded
        for name in ("crm", "search"):  # nothing touched the network, nor took a connection
            st = replay_pool.stats()[name]
            assert (st.created_total, st.acquired_total, st.http2_connections_opened) == (0, 0, 0)
        assert replay_pool.destination("crm").auth.stats().fetches_total == 0


def oauth_for_replay() -> toolpool.auth.OAuth2ClientCredentials:
    return toolpool.auth.OAuth2ClientCredentials(
        "https://127.0.0.1:9/oauth/token", credentials=lambda ctx: ("x", "y")
    )
