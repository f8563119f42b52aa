"""`toolpool serve` configuration: the documented example loads, and every mistake fails at
start naming the line and what to fix, without echoing a secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import toolpool
from toolpool.errors import ConfigError
from toolpool.service import StaticShare, forbidden_address, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {"T": "agent-token-0123456789", "T2": "agent-token-9876543210", "S": "s3cret-value-xyz"}

BASE = """
[destinations.crm]
url = "http://127.0.0.1:9"

[agents.a]
token_env = "T"
tenants = ["acme"]
"""

# (name, config text with the faulty line marked "# <-", fragment of the message)
CASES = [
    (
        "typo",
        BASE.replace(
            'url = "http://127.0.0.1:9"', 'url = "http://127.0.0.1:9"\nmax_conections = 3  # <-'
        ),
        "unknown key; did you mean 'max_connections'",
    ),
    (
        "inline secret",
        BASE + '\n[destinations.crm.auth]\ntype = "bearer"\ntoken = "sekrit-inline-123"  # <-\n',
        "secrets are never written in the config file",
    ),
    (
        "missing env",
        BASE.replace('token_env = "T"', 'token_env = "NOT_SET_ANYWHERE"  # <-'),
        "environment variable NOT_SET_ANYWHERE is not set",
    ),
    (
        "metadata address",
        BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://169.254.169.254"  # <-'),
        "169.254.169.254 is a cloud metadata address",
    ),
    (
        "ipv6 link-local",
        BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://[fe80::1]:8080"  # <-'),
        "fe80::/10",
    ),
    (
        "metadata name",
        BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://metadata.google.internal"  # <-'),
        "cloud metadata host name",
    ),
    (
        "path in url",
        BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://127.0.0.1:9/api"  # <-'),
        "give the origin only",
    ),
    (
        "zero cap",
        BASE.replace(
            'url = "http://127.0.0.1:9"', 'url = "http://127.0.0.1:9"\nmax_connections = 0  # <-'
        ),
        "must be a whole number >= 1, got 0",
    ),
    (
        "toml syntax",
        BASE.replace('tenants = ["acme"]', 'tenants = ["acme"] ]  # <-'),
        "not valid TOML",
    ),
    (
        "short agent token",
        BASE.replace('token_env = "T"', 'token_env = "SHORT"  # <-'),
        "shorter than 16 characters",
    ),
    (
        "unknown auth type",
        BASE + '\n[destinations.crm.auth]\ntype = "oauth2_client_credential"  # <-\n',
        "did you mean 'oauth2_client_credentials'",
    ),
    (
        "open proxy",
        '[pool]\nunknown_destinations = "pool"  # <-\n' + BASE,
        "an open proxy is refused",
    ),
    (
        "no tenants",
        BASE.replace('tenants = ["acme"]', "tenants = []  # <-"),
        "lists no tenant",
    ),
    (
        "missing secret file",
        BASE.replace('token_env = "T"', 'token_file = "/nonexistent/agent-token"  # <-'),
        "cannot read /nonexistent/agent-token",
    ),
    (
        "same token twice",
        BASE + '\n[agents.b]  # <-\ntoken_env = "T"\ntenants = ["acme"]\n',
        "has the same token as agent 'a'",
    ),
    (
        "both limits",
        BASE.replace(
            'url = "http://127.0.0.1:9"',
            'url = "http://127.0.0.1:9"\ndocumented_limit = 10\nmax_connections = 5  # <-',
        ),
        "give documented_limit or max_connections, not both",
    ),
    (
        "bad tenant header",
        '[service]\ntenant_header = "X Tenant"  # <-\n' + BASE,
        "not a valid HTTP header name",
    ),
]


@pytest.mark.parametrize(("name", "text", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_config_errors_name_the_line_and_the_fix(name: str, text: str, fragment: str) -> None:
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "# <-" in t)
    env = {**ENV, "SHORT": "short"}
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="toolpool.toml", env=env)
    message = str(info.value)
    assert f"toolpool.toml, line {line}" in message or f"(at line {line}," in message, message
    assert fragment in message, message
    for secret in ("sekrit-inline-123", *ENV.values()):
        assert secret not in message


def test_example_config_loads_and_documents_every_section(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "toolpool.toml").read_text()
    env = {
        "RESEARCH_BOT_TOKEN": "research-bot-token-0123456789",
        "BILLING_BOT_TOKEN": "billing-bot-token-0123456789",
        "CRM_ACME_CLIENT_SECRET": "acme-client-secret-1",
        "CRM_GLOBEX_CLIENT_SECRET": "globex-client-secret-2",
        "SEARCH_API_KEY": "search-api-key-3",
    }
    config = parse_config(text, source="examples/toolpool.toml", env=env, base=tmp_path)
    assert set(config.destinations) == {"crm", "search", "profile", "ledger-local"}
    profile_auth = config.destinations["profile"].auth
    assert profile_auth is not None and profile_auth.kind == "token_exchange"
    assert config.service.egress == toolpool.Egress()  # the documented defaults
    assert config.service.subject_token_header == "X-Toolpool-Subject-Token"
    assert set(config.agents) == {"research-bot", "billing-bot"}
    assert config.agents["billing-bot"].default_tenant == "acme"
    assert config.destinations["crm"].fleet_cap == 70  # documented_limit 100 x 0.7
    assert isinstance(config.limit, StaticShare)
    # Secrets are held, never shown.
    for value in env.values():
        assert value not in repr(config)


def test_secrets_come_from_files_and_never_show(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("file-secret-token-0123456789\n")
    text = BASE.replace('token_env = "T"', f'token_file = "{secret.name}"')
    text += '\n[destinations.crm.auth]\ntype = "bearer"\ntoken_file = "token"\n'
    path = tmp_path / "toolpool.toml"
    path.write_text(text)
    config = load_config(path, env={})
    auth = config.destinations["crm"].auth
    assert auth is not None and auth.shared
    provider = auth.make()
    ctx = toolpool.AuthContext(tenant="acme")
    assert provider.credential(ctx) == "file-secret-token-0123456789"  # stripped of the newline
    assert "file-secret" not in repr(provider) + repr(config)


def test_static_share_divides_each_cap_among_replicas(tmp_path: Path) -> None:
    text = "[limits]\nreplicas = 3\n" + BASE.replace(
        'url = "http://127.0.0.1:9"', 'url = "http://127.0.0.1:9"\ndocumented_limit = 100'
    )
    config = parse_config(text, env=ENV)
    pool = config.build_pool()
    try:
        assert pool.stats()["crm"].max_connections == 23  # floor(floor(100 x 0.7) / 3)
    finally:
        pool.close()


def test_http2_is_the_default_on_https_and_a_key_turns_it_off() -> None:
    """`[pool] http2` and `[destinations.NAME] http2` default to the library's default:
    HTTP/2 offered by ALPN on https:// (plain http:// is HTTP/1.1); `http2 = false` opts out."""
    text = BASE.replace('url = "http://127.0.0.1:9"', 'url = "https://127.0.0.1:9"') + (
        '\n[destinations.old]\nurl = "https://127.0.0.1:10"\nhttp2 = false\n'
        '\n[destinations.plain]\nurl = "http://127.0.0.1:11"\n'
    )
    pool = parse_config(text, env=ENV).build_pool()
    try:
        offered = {name: pool.destination(name).settings.http2 for name in ("crm", "old", "plain")}
        assert offered == {"crm": True, "old": False, "plain": False}
    finally:
        pool.close()
    off = parse_config("[pool]\nhttp2 = false\n" + text, env=ENV).build_pool()
    try:
        assert off.destination("crm").settings.http2 is False
    finally:
        off.close()


def test_forbidden_addresses() -> None:
    for host in ("169.254.169.254", "[fe80::1]", "0.0.0.0", "::ffff:169.254.169.254", "metadata"):
        assert forbidden_address(host) is not None, host
    for host in ("127.0.0.1", "10.0.0.5", "crm.internal", "::1"):
        assert forbidden_address(host) is None, host


def test_serve_exits_2_with_the_line_on_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace('tenants = ["acme"]', 'tenants = ["acme"]\nrole = "x"'))
    proc = subprocess.run(
        [sys.executable, "-m", "toolpool", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"T": ENV["T"], "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{path}, line 8: agents.a.role: unknown key" in proc.stderr


def test_check_flag_validates_and_summarises(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(BASE)
    proc = subprocess.run(
        [sys.executable, "-m", "toolpool", "serve", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        env={"T": ENV["T"], "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"destinations": ["crm"]' in proc.stdout
    assert ENV["T"] not in proc.stdout + proc.stderr
