"""An agent process for the service tests: N concurrent tool calls per tenant through
`toolpool.RemoteTransport`, using the destination's ordinary URL; prints one JSON report.

    python tests/_support/agent_script.py SERVICE_URL TARGET_URL TENANT[,TENANT...] N

(the agent token in the environment variable AGENT_TOKEN)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import httpx

import toolpool


async def main(service: str, target: str, tenants: list[str], n: int) -> None:
    transport = toolpool.RemoteTransport(service, token=os.environ["AGENT_TOKEN"])
    results = []
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:

        async def call(tenant: str) -> None:
            with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                r = await client.get(target + "/anything?tool=lookup")
            results.append(
                {
                    "asked": tenant,
                    "status": r.status_code,
                    "body": r.text,
                    "headers": dict(r.headers),
                    "tier": r.extensions["toolpool"]["tier"],
                }
            )

        await asyncio.gather(*[call(t) for t in tenants for _ in range(n)])
    print(json.dumps({"results": results, "env_keys": sorted(os.environ)}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])))
