"""The send chain: layers go to their place by role, whatever the order they are added in;
adding or removing one rebuilds both sends; a destination has one layer of each single role."""

from __future__ import annotations

import httpx
import pytest

import toolpool
from toolpool import AuthContext
from toolpool._chain import AsyncSend, SyncSend
from toolpool.resilience import PolicyRuntime
from toolpool.testing import Downstream


class Recorder:
    """A layer that notes its name in `trail` on the way in, for each request."""

    def __init__(self, role: str, name: str, trail: list[str]) -> None:
        self.role = role
        self.name = name
        self.trail = trail

    def wrap_async(self, inner: AsyncSend) -> AsyncSend:
        async def send(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            self.trail.append(self.name)
            return await inner(request, ctx)

        return send

    def wrap_sync(self, inner: SyncSend) -> SyncSend:
        def send(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            self.trail.append(self.name)
            return inner(request, ctx)

        return send


async def test_layers_run_outermost_first_in_role_order_whatever_the_order_added(
    plain: Downstream,
) -> None:
    trail: list[str] = []
    pool = toolpool.Pool([toolpool.Destination("api", plain.url("api"))], warmup=0.0)
    dest = pool.destination("api")
    assert isinstance(dest, toolpool.DestinationPool)
    assert [layer.role for layer in dest.layers] == ["policy"]
    # Added outermost-first on purpose: the chain still sorts them innermost-first.
    tracing = Recorder("tracing", "tracing", trail)
    tenants = Recorder("tenant_metrics", "tenants", trail)
    dest.add_layer(tracing)
    dest.add_layer(tenants)
    assert [layer.role for layer in dest.layers] == ["policy", "tenant_metrics", "tracing"]
    async with pool:
        r = await pool.request("GET", plain.url("api") + "/anything")
        assert r.status_code == 200
        assert trail == ["tracing", "tenants"]
        trail.clear()
        assert pool.request_sync("GET", plain.url("api") + "/anything").status_code == 200
        assert trail == ["tracing", "tenants"]
        # A second layer of a role goes outside the first one of that role.
        later = Recorder("tenant_metrics", "tenants-2", trail)
        dest.add_layer(later)
        trail.clear()
        await pool.request("GET", plain.url("api") + "/anything")
        assert trail == ["tracing", "tenants-2", "tenants"]
        # Removing rebuilds both sends without the layer.
        dest.remove_layer(tracing)
        dest.remove_layer(later)
        trail.clear()
        await pool.request("GET", plain.url("api") + "/anything")
        pool.request_sync("GET", plain.url("api") + "/anything")
        assert trail == ["tenants", "tenants"]
        assert [layer.role for layer in dest.layers] == ["policy", "tenant_metrics"]


def test_single_roles_refuse_a_second_layer_and_unknown_roles_are_refused(
    plain: Downstream,
) -> None:
    pool = toolpool.Pool([toolpool.Destination("api", plain.url("api"))], warmup=0.0)
    dest = pool.destination("api")
    policy = dest.policy
    assert isinstance(policy, PolicyRuntime)
    with pytest.raises(toolpool.ConfigError, match="already has a resilience policy"):
        dest.add_layer(PolicyRuntime(toolpool.resilience.Policy.off(), dest))
    with pytest.raises(toolpool.ConfigError, match="role must be one of auth, policy"):
        dest.add_layer(Recorder("logging", "x", []))
    # Taking the policy out leaves the pooled send alone; a new one can then join.
    dest.remove_layer(policy)
    assert dest.policy is None and dest.layers == ()
    assert dest.async_send is dest.base_async_send
    replacement = PolicyRuntime(toolpool.resilience.Policy.off(), dest)
    dest.add_layer(replacement)
    assert dest.policy is replacement
    pool.close()


def test_pool_route_is_the_destination_a_request_goes_through() -> None:
    """`pool.route(url)` (what transports and adapters send with): the listed destination
    of the URL's origin, default port or not; an unknown origin pooled on demand, or
    refused; only http(s); refused once the pool is closed."""
    listed = toolpool.Destination("crm", "http://127.0.0.1:9")
    pool = toolpool.Pool([listed], warmup=0.0)
    try:
        crm = pool.route(httpx.URL("http://127.0.0.1:9/contacts?q=1"))
        assert crm is pool.destination("crm")
        assert isinstance(crm, toolpool.DestinationPool)
        other = pool.route(httpx.URL("http://127.0.0.2:9/x"))
        assert other.name == "http://127.0.0.2:9" and not other.settings.listed
        assert pool.destinations == ["crm", "http://127.0.0.2:9"]
        assert pool.route(httpx.URL("http://127.0.0.2:9/y")) is other
        with pytest.raises(httpx.UnsupportedProtocol, match="not 'ftp'"):
            pool.route(httpx.URL("ftp://127.0.0.1/file"))
    finally:
        pool.close()
    with pytest.raises(toolpool.PoolClosed):
        pool.route(httpx.URL("http://127.0.0.1:9/contacts"))
    strict = toolpool.Pool([listed], warmup=0.0, unknown_destinations="reject")
    with strict, pytest.raises(toolpool.UnknownDestination, match="crm"):
        strict.route(httpx.URL("http://127.0.0.3:9/"))
