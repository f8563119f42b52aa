"""Helpers for the auth registry tests: tenants with OAuth clients, and pools whose
destinations authenticate per tenant (tests/auth)."""

from __future__ import annotations

import secrets
from typing import Any

import toolpool

# Secrets are random per run, so a test that finds one in a log or an exception cannot have
# found it by accident of a constant.
RUN = secrets.token_hex(6)


def client_id(tenant: str) -> str:
    return f"{tenant}-app"


def client_secret(tenant: str) -> str:
    return f"cs-{tenant}-{RUN}"


def tenant_ctx(tenant: str, **extra: Any) -> toolpool.AuthContext:
    """An auth context whose credentials hold the tenant's OAuth client."""
    creds = {"client_id": client_id(tenant), "client_secret": client_secret(tenant), **extra}
    return toolpool.AuthContext(tenant=tenant, credentials=creds)


def register(ds: Any, service: str, tenants: list[str]) -> None:
    for tenant in tenants:
        ds.register_client(
            service, client_id=client_id(tenant), client_secret=client_secret(tenant), tenant=tenant
        )


def ctx_client(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
    assert ctx is not None
    return ctx.credentials["client_id"], ctx.credentials["client_secret"]


def oauth(ds: Any, service: str = "crm", **kwargs: Any) -> toolpool.auth.OAuth2ClientCredentials:
    """Client credentials against the service's own token endpoint, per context."""
    kwargs.setdefault("credentials", ctx_client)
    return toolpool.auth.OAuth2ClientCredentials(ds.token_url(service), **kwargs)


def destination(ds: Any, service: str = "crm", **kwargs: Any) -> toolpool.Destination:
    """A destination for a test-bed service, trusting the test CA, without warm-up (so that
    connection counts and reuse flags come from the requests under test only)."""
    kwargs.setdefault("warmup", 0.0)
    if ds.tls:
        kwargs.setdefault("verify", ds.ca_pem_path)
    return toolpool.Destination(service, ds.url(service), **kwargs)


TENANTS = ["acme", "globex", "initech"]
