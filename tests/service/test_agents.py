"""Two agent processes through one `toolpool serve` process: the service's per-destination cap
holds across both, tenants stay isolated end to end, and agents never see downstream tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests._support.pool_service import (
    AGENT_A_TOKEN,
    AGENT_B_TOKEN,
    SERVICE_ENV,
    ServiceProcess,
    service_config,
    write_config,
)
from toolpool.testing import Downstream, ServiceSpec

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "_support" / "agent_script.py"


def _agent(
    service_url: str, target: str, token: str, tenants: str, n: int
) -> subprocess.Popen[str]:
    # The agent's environment holds its own token and nothing of the downstream's.
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env.update({"AGENT_TOKEN": token, "PYTHONPATH": str(ROOT)})
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), service_url, target, tenants, str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_agent_processes_share_the_cap_and_stay_isolated(tmp_path: Path) -> None:
    services = {
        "crm": ServiceSpec(token_latency=0.0, service_time=0.05),
        "search": ServiceSpec(require_auth=False),
    }
    with Downstream(services) as ds:
        ds.register_client(
            "crm", client_id="acme-app", client_secret="acme-downstream-secret", tenant="acme"
        )
        ds.register_client(
            "crm", client_id="globex-app", client_secret="globex-downstream-secret", tenant="globex"
        )
        # A queue long enough for the whole burst: every call waits its turn for one of 4.
        text = service_config(ds, crm_cap=4, crm_extra="queue_factor = 20")
        with ServiceProcess(write_config(tmp_path, text)) as svc:
            target = ds.url("crm")  # the ordinary URL; RemoteTransport maps it onto the service
            a = _agent(svc.url, target, AGENT_A_TOKEN, "acme", 30)
            b = _agent(svc.url, target, AGENT_B_TOKEN, "acme,globex", 15)
            outs = []
            for proc in (a, b):
                out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
                outs.append(json.loads(out))
            # The operator (not an agent) looks at what the downstream received for acme.
            seen = httpx.get(
                svc.url + "/d/crm/echo",
                headers={"Authorization": f"Bearer {AGENT_B_TOKEN}", "X-Toolpool-Tenant": "acme"},
            ).json()
            assert svc.terminate() == 0
        stats = ds.stats("crm")
    results = outs[0]["results"] + outs[1]["results"]
    assert len(results) == 60 and all(r["status"] == 200 for r in results)
    for r in results:
        body = json.loads(r["body"])
        assert body["tenant"] == r["asked"]  # the downstream identified the tenant asked for
        assert r["tier"] == "service"
    # The service's cap held across both agents: never more than 4 connections downstream.
    assert stats.peak_connections <= 4, stats
    # Tenant isolation end to end: every downstream connection carried exactly one tenant.
    assert stats.mixed_connections() == {}
    assert {len(t) for t in stats.connection_tenants.values()} == {1}
    assert set().union(*stats.connection_tenants.values()) == {"acme", "globex"}
    # One token per tenant, fetched by the service (single flight, cached).
    assert dict(stats.token_requests_by_tenant) == {"acme": 1, "globex": 1}
    # Agents never saw a downstream credential: not in their environment, bodies or headers.
    token = seen["headers"]["authorization"].split(" ", 1)[1]
    for out in outs:
        assert not {"CRM_ACME_SECRET", "CRM_GLOBEX_SECRET"} & set(out["env_keys"])
        dump = json.dumps(out["results"])
        assert token not in dump and "downstream-secret" not in dump
    # The access log recorded every agent request, without secrets or query strings.
    records = svc.access_records()
    assert sum(1 for r in records if r["agent"] == "agent-a") == 30
    assert (
        sum(1 for r in records if r["agent"] == "agent-b") == 31
    )  # 15 per tenant + the operator's echo
    log = "".join(svc.stderr_lines)
    for secret in (AGENT_A_TOKEN, AGENT_B_TOKEN, token, "downstream-secret", "tool=lookup"):
        assert secret not in log
