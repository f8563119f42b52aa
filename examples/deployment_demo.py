"""The three deployment patterns of the pool service, run end to end on loopback.

    python examples/deployment_demo.py

It starts a test-bed downstream (an OAuth-protected "crm", one client per tenant), writes a
service config, and runs `python -m toolpool serve` as a child process. Then:

1. sidecar / central: agents send tool calls through `toolpool.RemoteTransport`, with the
   downstream's ordinary URL; the service holds the OAuth client secrets, agents only their
   own token. (A sidecar is the same service on 127.0.0.1 next to one agent process; a
   central service is one that all agents share, so its cap is global.)
2. hierarchical: an in-process pool with 3 local connections per destination overflows a
   burst of 40 calls to the service instead of queuing.

Finally it sends SIGTERM and prints the service's drain report. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import toolpool
from toolpool.testing import Downstream, ServiceSpec

AGENT_TOKEN = "demo-agent-token-0123456789abcdef"


def config(ds: Downstream) -> str:
    return f"""
[pool]
warmup = 0.0

[destinations.crm]
url = "{ds.url("crm")}"
max_connections = 6
queue_factor = 10

[destinations.crm.auth]
type = "oauth2_client_credentials"
token_url = "{ds.token_url("crm")}"

[destinations.crm.auth.tenants.acme]
client_id = "acme-app"
client_secret_env = "DEMO_ACME_SECRET"

[destinations.crm.auth.tenants.globex]
client_id = "globex-app"
client_secret_env = "DEMO_GLOBEX_SECRET"

[agents.demo-agent]
token_env = "DEMO_AGENT_TOKEN"
tenants = ["acme", "globex"]
"""


def start_service(path: Path) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "DEMO_AGENT_TOKEN": AGENT_TOKEN,
        "DEMO_ACME_SECRET": "acme-secret",
        "DEMO_GLOBEX_SECRET": "globex-secret",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolpool", "serve", "--config", str(path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    url = json.loads(proc.stdout.readline())["url"]
    deadline = time.monotonic() + 30
    while httpx.get(url + "/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not become ready")
        time.sleep(0.05)
    return proc, url


async def agents(service_url: str, crm_url: str) -> None:
    transport = toolpool.RemoteTransport(service_url, token=AGENT_TOKEN)
    async with httpx.AsyncClient(transport=transport) as client:

        async def call(tenant: str) -> str:
            with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                r = await client.get(crm_url + "/anything")
            return str(r.json()["tenant"])

        seen = await asyncio.gather(*[call(t) for t in ("acme", "globex") for _ in range(20)])
    print(f"1. via the service: 40 calls, tenants seen by the downstream {sorted(set(seen))}")


async def hierarchical(service_url: str, crm_url: str) -> None:
    remote = toolpool.RemotePool(service_url, token=AGENT_TOKEN)
    # The local tier calls the downstream itself, so it has its own credentials for acme.
    local_auth = toolpool.auth.OAuth2ClientCredentials(
        crm_url + "/oauth/token", ("acme-app", "acme-secret")
    )
    pool = toolpool.Pool(
        [toolpool.Destination("crm", crm_url, auth=local_auth)],
        local_max_connections=3,
        overflow=remote,
    )
    async with pool:
        client = pool.client()
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            rs = await asyncio.gather(*[client.get(crm_url + "/anything") for _ in range(40)])
        assert all(r.status_code == 200 for r in rs)
        split = remote.overflow_stats()["crm"]
        local = pool.stats()["crm"]
    print(
        f"2. hierarchical: {split.local_total} calls on the local tier "
        f"(max {local.max_connections} connections, {local.queued_total} queued), "
        f"{split.overflow_total} through the service"
    )


def main() -> None:
    services = {"crm": ServiceSpec(token_latency=0.05, service_time=0.05)}
    with Downstream(services) as ds, tempfile.TemporaryDirectory() as tmp:
        ds.register_client("crm", client_id="acme-app", client_secret="acme-secret", tenant="acme")
        ds.register_client(
            "crm", client_id="globex-app", client_secret="globex-secret", tenant="globex"
        )
        path = Path(tmp) / "toolpool.toml"
        path.write_text(config(ds))
        proc, url = start_service(path)
        try:
            print(f"toolpool serve is listening on {url}")
            asyncio.run(agents(url, ds.url("crm")))
            asyncio.run(hierarchical(url, ds.url("crm")))
            stats = ds.stats("crm")
            print(
                f"downstream: peak {stats.peak_connections} connections, "
                f"{len(stats.mixed_connections())} carried two tenants"
            )
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
        report = next(line for line in err.splitlines() if '"event": "drained"' in line)
        print("3. SIGTERM:", report[report.index("{") :], f"exit status {proc.returncode}")


if __name__ == "__main__":
    main()
