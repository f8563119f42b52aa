"""Invalid configuration fails at construction, with a message that says what to change."""

from __future__ import annotations

import pytest

import toolpool
from toolpool import AuthContext, ConfigError, Destination


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "ftp://crm.internal"}, "must start with http:// or https://"),
        ({"url": "https://crm.internal/api/v1"}, "give the origin only"),
        ({"url": "https://user:pw@crm.internal"}, "put credentials in auth="),
        ({"url": "not a url"}, "must start with http"),
        ({"documented_limit": 100, "max_connections": 20}, "not both"),
        ({"documented_limit": 1}, "no connection after 30 % headroom"),
        ({"max_connections": 0}, "max_connections must be a whole number >= 1"),
        ({"max_connections": 2.5}, "max_connections must be a whole number >= 1"),
        ({"idle_ttl": -1}, "idle_ttl must be a number of seconds > 0"),
        ({"queue_factor": -0.5}, "queue_factor must be a finite number >= 0"),
        ({"warmup": 1.5}, "warmup must be a fraction"),
        ({"verify": 3}, "verify must be True, False"),
        ({"warmup_contexts": ["acme"]}, "warmup_contexts must hold toolpool.AuthContext"),
        ({"name": " "}, "name must be a non-empty string"),
    ],
)
def test_bad_destination(kwargs: dict[str, object], message: str) -> None:
    args = {"name": "crm", "url": "https://crm.internal", **kwargs}
    with pytest.raises(ConfigError, match=message):
        Destination(**args)  # type: ignore[arg-type]


def test_limits_and_defaults() -> None:
    assert Destination("crm", "https://crm.internal", documented_limit=100).connection_cap(50) == 70
    assert Destination("crm", "https://crm.internal").connection_cap(50) == 50
    pool = toolpool.Pool([Destination("crm", "https://crm.internal:8443", documented_limit=10)])
    stats = pool.stats()["crm"]
    assert (stats.max_connections, stats.queue_limit) == (7, 14)
    assert stats.url == "https://crm.internal:8443"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_connections": -3}, "max_connections must be a whole number"),
        ({"acquire_timeout": 0}, "acquire_timeout must be a number of seconds > 0"),
        ({"unknown_destinations": "allow"}, "must be 'pool' or 'reject'"),
        ({"warmup": -0.1}, "warmup must be a fraction"),
    ],
)
def test_bad_pool_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        toolpool.Pool(**kwargs)  # type: ignore[arg-type]


def test_duplicate_names_and_origins() -> None:
    with pytest.raises(ConfigError, match="names must be unique"):
        toolpool.Pool(
            [Destination("a", "http://127.0.0.1:1"), Destination("a", "http://127.0.0.1:2")]
        )
    with pytest.raises(ConfigError, match="same origin"):
        toolpool.Pool(
            [Destination("a", "https://x.internal"), Destination("b", "https://x.internal:443")]
        )


def test_auth_context_never_shows_credentials() -> None:
    ctx = AuthContext(tenant="acme", subject="u1", credentials={"client_secret": "hunter2"})
    assert "hunter2" not in repr(ctx)
    assert "hunter2" not in ctx.fingerprint
    same = AuthContext(tenant="acme", subject="u1", credentials={"client_secret": "hunter2"})
    other = AuthContext(tenant="acme", subject="u1", credentials={"client_secret": "other"})
    assert ctx == same and hash(ctx) == hash(same)
    assert ctx != other and ctx.fingerprint != other.fingerprint
    with pytest.raises(AttributeError):
        ctx.tenant = "evil"  # type: ignore[misc]
    with pytest.raises(TypeError):
        toolpool.auth_context("acme")  # type: ignore[arg-type]
