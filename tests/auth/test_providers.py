"""Static and callable providers (Bearer, ApiKey, a custom TokenProvider), one provider per
destination, and secrets kept out of reprs, logs, stats and exceptions."""

from __future__ import annotations

import logging
import traceback

import httpx
import pytest

import toolpool
from tests._support.oauth_tenants import (
    RUN,
    client_secret,
    destination,
    oauth,
    register,
    tenant_ctx,
)
from toolpool.auth import ApiKey, Bearer, Credential, TokenPolicy, TokenProvider
from toolpool.testing import Downstream, ServiceSpec

OPEN = {"api": ServiceSpec(require_auth=False)}


async def test_bearer_static_and_per_context():
    calls: list[str] = []

    def token(ctx: toolpool.AuthContext | None) -> str:
        assert ctx is not None
        calls.append(ctx.label)
        return f"tok-{ctx.tenant}-{RUN}"

    async with Downstream(OPEN) as ds:
        static = toolpool.Pool([destination(ds, "api", auth=Bearer(f"static-{RUN}"))])
        async with static:
            echoed = (await static.client().get(ds.url("api") + "/echo")).json()["headers"]
        assert echoed["authorization"] == f"Bearer static-{RUN}"
        async with toolpool.Pool([destination(ds, "api", auth=Bearer(token))]) as pool:
            client = pool.client()
            seen = []
            for tenant in ["acme", "globex", "acme", "acme", "globex"]:
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    seen.append((await client.get(ds.url("api") + "/echo")).json())
            with pytest.raises(toolpool.AuthError, match="need an auth context"):
                await client.get(ds.url("api") + "/echo")
    assert [s["headers"]["authorization"] for s in seen] == [
        f"Bearer tok-{t}-{RUN}" for t in ["acme", "globex", "acme", "acme", "globex"]
    ]
    assert calls == ["acme", "globex"]  # called once per context, then cached


def test_api_key_header_and_expiring_callable_credentials():
    issued: list[int] = []

    def key(ctx: toolpool.AuthContext | None) -> Credential:
        issued.append(1)
        return Credential(f"k{len(issued)}-{RUN}", expires_in=3600)

    with Downstream(OPEN) as ds:
        provider = ApiKey(header="X-Api-Token", key=key)
        with toolpool.Pool([destination(ds, "api", auth=provider)]) as pool:
            client = pool.sync_client()
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                first = client.get(ds.url("api") + "/echo").json()["headers"]
                second = client.get(ds.url("api") + "/echo").json()["headers"]
                pool.destination("api").auth.invalidate(toolpool.AuthContext(tenant="acme"))
                third = client.get(ds.url("api") + "/echo").json()["headers"]
    assert first["x-api-token"] == second["x-api-token"] == f"k1-{RUN}"  # no scheme prefix
    assert "authorization" not in first
    assert third["x-api-token"] == f"k2-{RUN}"


async def test_a_custom_token_provider_class():
    """The documented protocol: credential(ctx) returns a token request; the default
    token_response parses the OAuth answer."""

    class PerTenantClient(TokenProvider):
        def credential(self, ctx: toolpool.AuthContext | None) -> httpx.Request:
            assert ctx is not None
            return httpx.Request(
                "POST",
                ds.token_url("crm"),
                data={
                    "grant_type": "client_credentials",
                    "client_id": f"{ctx.tenant}-app",
                    "client_secret": client_secret(str(ctx.tenant)),
                },
            )

    async with Downstream({"crm": ServiceSpec(token_latency=0.01)}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        async with toolpool.Pool([destination(ds, auth=PerTenantClient())]) as pool:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                body = (await pool.client().get(ds.url("crm") + "/anything")).json()
    assert body["tenant"] == "acme"
    assert ds.stats("crm").token_requests == 1


def test_one_provider_object_per_destination():
    provider = Bearer("t")
    pool = toolpool.Pool([toolpool.Destination("a", "http://127.0.0.1:9", auth=provider)])
    with pytest.raises(toolpool.ConfigError, match="already the auth provider of destination 'a'"):
        toolpool.Pool([toolpool.Destination("b", "http://127.0.0.1:8", auth=provider)])
    with pytest.raises(toolpool.ConfigError, match="one provider object per destination"):
        toolpool.Pool(
            [
                toolpool.Destination("c", "http://127.0.0.1:7", auth=provider),
                toolpool.Destination("d", "http://127.0.0.1:6", auth=provider),
            ]
        )
    pool.close()
    # Once its pool is closed, the provider can serve a new pool.
    toolpool.Pool([toolpool.Destination("a", "http://127.0.0.1:9", auth=provider)]).close()


def test_configuration_is_validated():
    with pytest.raises(toolpool.ConfigError):
        TokenPolicy(refresh_fraction=0)
    with pytest.raises(toolpool.ConfigError):
        TokenPolicy(negative_ttl=-1)
    with pytest.raises(toolpool.ConfigError):
        Bearer("")
    with pytest.raises(toolpool.ConfigError):
        toolpool.auth.OAuth2ClientCredentials("ftp://127.0.0.1/token", credentials=("a", "b"))
    with pytest.raises(toolpool.ConfigError):
        toolpool.auth.OAuth2ClientCredentials("https://127.0.0.1/t", credentials=("a", ""))
    with pytest.raises(toolpool.ConfigError):
        toolpool.auth.OAuth2ClientCredentials(
            "https://127.0.0.1/t", credentials=("a", "b"), auth_method="private_key_jwt"
        )
    with pytest.raises(ValueError, match="CR, LF"):
        Credential("a\r\nX-Injected: 1")
    assert TokenPolicy().refresh_after(3600) == 2880  # 80 % of the lifetime
    assert TokenPolicy().refresh_after(120) == 90  # 30 s before expiry is earlier
    assert TokenPolicy().refresh_after(40) == 20  # never before half the lifetime


async def test_secrets_never_appear_in_reprs_logs_stats_or_exceptions(caplog):
    caplog.set_level(logging.DEBUG, logger="toolpool")
    secret = client_secret("acme")
    async with Downstream({"crm": ServiceSpec(token_latency=0.01)}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        ds.register_client("crm", client_id="broken-app", client_secret="other", tenant="broken")
        provider = oauth(ds)
        shared = oauth(ds, credentials=("acme-app", secret))
        errors: list[BaseException] = []
        pool = toolpool.Pool([destination(ds, auth=provider)])
        async with pool, pool.client() as client:
            url = ds.url("crm") + "/anything"
            with toolpool.auth_context(tenant_ctx("acme")):
                assert (await client.get(url)).status_code == 200
                ds.set_fault("crm", "status", status=401)
                with pytest.raises(toolpool.AuthError) as rejected:
                    await client.get(url)
                errors.append(rejected.value)
            with toolpool.auth_context(tenant_ctx("broken")):
                with pytest.raises(toolpool.AuthError) as failed:
                    await client.get(url)
                errors.append(failed.value)
            entry = pool.destination("crm").auth.cache.entries[tenant_ctx("broken").fingerprint]
            stats_text = repr(pool.destination("crm").auth.stats())
            cached_repr = repr(entry)
        texts = [
            repr(provider),
            repr(shared),
            repr(tenant_ctx("acme")),
            repr(Credential(secret, expires_in=1)),
            repr(Bearer(secret)),
            repr(ApiKey(key=secret)),
            stats_text,
            cached_repr,
            caplog.text,
        ]
        for err in errors:
            texts += [str(err), repr(err), "".join(traceback.format_exception(err))]
    assert "401" in str(errors[0])
    assert "invalid_client" in str(errors[1])
    # The logs were exercised: a fetch, a failure and a rejection were logged.
    logged = [r.getMessage() for r in caplog.records if r.name == "toolpool.auth"]
    assert any("fetched a credential" in m for m in logged)
    assert any("failed" in m for m in logged)
    assert any("rejected" in m for m in logged)
    for text in texts:
        assert secret not in text
        assert RUN not in text
        assert "tb-access-" not in text  # every token the test bed issues starts so
        assert "Basic " not in text
