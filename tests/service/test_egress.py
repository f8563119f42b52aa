"""The service applies its egress policy (`[service.egress]`) at every connect, on the
address a destination's host resolves to then: a resolver hook maps test-only names to
loopback addresses the policy forbids (and changes one answer between two connects); the
agent gets 403 egress_denied, nothing leaves loopback (packet spy), the refusal is counted.
Also: the config's egress table, and the RFC 8693 token-exchange auth type."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from tests._support.packet_spy import PacketSpy
from tests._support.pool_service import AGENT_B_TOKEN, SERVICE_ENV, ServiceThread, write_config
from toolpool.errors import ConfigError
from toolpool.service import ServiceConfig, parse_config
from toolpool.testing import Downstream, HostMap, ServiceSpec

B = {"Authorization": f"Bearer {AGENT_B_TOKEN}"}


def _config(port: int, extra: str = "") -> str:
    return f"""
[service]
allowed_hosts = ["127.0.0.1"]

[service.egress]
deny = ["127.0.0.2"]

[pool]
warmup = 0.0
policy = "off"

[destinations.web]
url = "http://web.test:{port}"

[destinations.evil]
url = "http://evil.test:{port}"

[destinations.imds]
url = "http://imds.test"

[agents.agent-b]
token_env = "AGENT_B_TOKEN"
tenants = ["acme", "globex"]
{extra}
"""


def _with_resolver(names: HostMap) -> object:
    def configure(config: ServiceConfig) -> ServiceConfig:
        egress = dataclasses.replace(config.service.egress, resolver=names)
        return dataclasses.replace(
            config, service=dataclasses.replace(config.service, egress=egress)
        )

    return configure


def test_the_service_checks_the_resolved_address_at_every_connect(
    tmp_path: Path, spy: PacketSpy
) -> None:
    names = HostMap(
        {"web.test": "127.0.0.1", "evil.test": "127.0.0.2", "imds.test": "169.254.169.254"}
    )
    with Downstream({"web": ServiceSpec(require_auth=False)}) as ds:
        port = ds.address("web")[1]
        path = write_config(tmp_path, _config(port))
        with (
            ServiceThread(path, configure=_with_resolver(names)) as svc,  # type: ignore[arg-type]
            httpx.Client(base_url=svc.url, headers=B, timeout=30) as agent,
        ):
            ok = agent.get("/d/web/anything", headers={"X-Toolpool-Tenant": "acme"})
            assert ok.status_code == 200 and ok.json()["path"] == "/anything"
            for name, address, rule in (
                ("evil", "127.0.0.2", "deny"),
                ("imds", "169.254.169.254", "metadata"),
            ):
                refused = agent.get(
                    f"/d/{name}/x?token=s3cret", headers={"X-Toolpool-Tenant": "acme"}
                )
                assert refused.status_code == 403
                assert refused.headers["x-toolpool-error"] == "egress_denied"
                body = refused.json()
                assert (body["destination"], body["rule"]) == (name, rule)
                assert address in body["detail"] and "s3cret" not in body["detail"]
            # The name rebinds; the next connect (another tenant's connection) is refused.
            names.set("web.test", "127.0.0.2")
            rebound = agent.get("/d/web/anything", headers={"X-Toolpool-Tenant": "globex"})
            assert rebound.status_code == 403, rebound.text
            assert rebound.json()["rule"] == "deny"
            assert names.lookups("web.test") == 2
            metrics = agent.get("/metrics").text
        assert 'toolpool_egress_denied_total{destination="evil",rule="deny"} 1.0' in metrics
        assert 'toolpool_egress_denied_total{destination="imds",rule="metadata"} 1.0' in metrics
        assert 'toolpool_egress_denied_total{destination="web",rule="deny"} 1.0' in metrics
        assert ds.stats("web").requests_total == 1


def test_the_config_egress_table(tmp_path: Path) -> None:
    base = _config(8080).replace("http://imds.test", "http://169.254.10.5")
    with pytest.raises(ConfigError, match=r"line \d+: destinations.imds.url: .*link-local"):
        parse_config(base, env=SERVICE_ENV)
    # An address range allowed explicitly may be configured (and is reachable).
    allowed = base.replace(
        'deny = ["127.0.0.2"]', 'deny = ["127.0.0.2"]\nallow = ["169.254.10.0/24"]'
    )
    config = parse_config(allowed, env=SERVICE_ENV)
    assert config.service.egress.allow == ("169.254.10.0/24",)
    assert config.service.egress.check_address("169.254.10.5") is None
    assert config.service.egress.check_address("169.254.169.254") is not None
    for bad, message in (
        ('deny = ["10.0.0.0/33"]', r"line 6: service.egress.deny: '10.0.0.0/33' is neither"),
        ('deny_unknown = ["10.0.0.0/8"]', r"service.egress.deny_unknown: every destination"),
        ('deny = "10.0.0.0/8"', r"service.egress.deny: must be a list"),
        ('denny = ["10.0.0.0/8"]', r"service.egress.denny: unknown key; did you mean 'deny'"),
    ):
        text = _config(8080).replace('deny = ["127.0.0.2"]', bad)
        with pytest.raises(ConfigError, match=message):
            parse_config(text, env=SERVICE_ENV)


def _exchange_config(ds: Downstream, client: str = "") -> str:
    return f"""
[service]
allowed_hosts = ["127.0.0.1"]

[pool]
warmup = 0.0
policy = "off"

[destinations.crm]
url = "{ds.url("crm")}"

[destinations.crm.auth]
type = "token_exchange"
token_url = "{ds.token_url("crm")}"
audience = "crm"
{client}

[agents.agent-b]
token_env = "AGENT_B_TOKEN"
tenants = ["acme", "globex"]
"""


def test_token_exchange_per_user_through_the_service(tmp_path: Path) -> None:
    with Downstream({"crm": ServiceSpec(token_latency=0.0)}) as ds:
        alice = ds.subject_token(tenant="acme", subject="alice")
        bob = ds.subject_token(tenant="acme", subject="bob")
        path = write_config(tmp_path, _exchange_config(ds))
        with (
            ServiceThread(path) as svc,
            httpx.Client(base_url=svc.url, headers=B, timeout=30) as agent,
        ):
            seen = []
            for token in (alice, bob, alice):
                r = agent.get(
                    "/d/crm/echo",
                    headers={"X-Toolpool-Tenant": "acme", "X-Toolpool-Subject-Token": token},
                )
                assert r.status_code == 200, r.text
                body = r.json()
                seen.append((body["tenant"], body["subject"]))
                forwarded = {str(k).lower() for k in body["headers"]}
                assert "x-toolpool-subject-token" not in forwarded
                assert "authorization" in forwarded  # the exchanged token, not the agent's
            assert seen == [("acme", "alice"), ("acme", "bob"), ("acme", "alice")]
            missing = agent.get("/d/crm/echo", headers={"X-Toolpool-Tenant": "acme"})
            assert missing.status_code == 401
            assert missing.headers["x-toolpool-error"] == "missing_subject_token"
            assert "X-Toolpool-Subject-Token" in missing.json()["detail"]
        # One exchange per user (cached), none for the refused request.
        assert ds.stats("crm").token_requests == 2


def test_token_exchange_config(tmp_path: Path) -> None:
    with Downstream({"crm": ServiceSpec()}) as ds:
        env = {**SERVICE_ENV, "CRM_EXCHANGE_SECRET": "exchange-secret"}
        client = 'client_id = "gateway"\nclient_secret_env = "CRM_EXCHANGE_SECRET"'
        config = parse_config(_exchange_config(ds, client), env=env)
        auth = config.destinations["crm"].auth
        assert auth is not None and auth.kind == "token_exchange" and auth.shared
        provider = auth.make()
        assert "exchange-secret" not in repr(provider) and "<redacted>" in repr(provider)
        assert provider.audience == "crm"
        with pytest.raises(ConfigError, match="never written in the config file"):
            parse_config(_exchange_config(ds, 'client_id = "g"\nclient_secret = "x"'), env=env)
        with pytest.raises(ConfigError, match="client_id: is required"):
            parse_config(_exchange_config(ds, 'client_secret_env = "CRM_EXCHANGE_SECRET"'), env=env)
        header = _exchange_config(ds).replace(
            'allowed_hosts = ["127.0.0.1"]',
            'allowed_hosts = ["127.0.0.1"]\nsubject_token_header = "X-Toolpool-Tenant"',
        )
        with pytest.raises(ConfigError, match="must differ from tenant_header"):
            parse_config(header, env=env)
