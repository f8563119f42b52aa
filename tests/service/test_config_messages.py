"""Every bad config below fails with exactly the message of `config_messages.txt`: the one
f2b4a80 (the last hand-written reader) gave, or, where it changed on purpose, the one that
file gives after it with the reason. Each case is one mistake (two for the last ones: the
first is reported) in an otherwise valid config."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from toolpool.errors import ConfigError
from toolpool.service import parse_config

BASE = """[service]
#SERVICE
[pool]
#POOL
[destinations.crm]
url = "http://127.0.0.1:9"
#DEST
[agents.a]
token_env = "T"
tenants = ["acme"]
#AGENT
"""
ENV = {"T": "agent-token-0123456789", "S": "s3cret-value-xyz", "SHORT": "short", "EMPTY": ""}


def at(mark, text):
    return BASE.replace(f"#{mark}", text)


def auth(text):
    return BASE + "\n[destinations.crm.auth]\n" + text + "\n"


OAUTH = 'type = "oauth2_client_credentials"\ntoken_url = "http://127.0.0.1:9/token"\n'
CLIENT = 'client_id = "c"\nclient_secret_env = "S"\n'
ACME = "[destinations.crm.auth.tenants.acme]\n"
EXCH = 'type = "token_exchange"\ntoken_url = "http://127.0.0.1:9/token"\n'

CASES = [
    # top level
    ("unknown top key", "destination = 1\n" + BASE),
    ("service not table", "service = 1\n" + BASE.replace("[service]\n", "")),
    ("pool not table", "pool = 1\n" + BASE.replace("[pool]\n", "")),
    ("limits not table", "limits = 1\n" + BASE),
    ("no destinations", BASE.replace('[destinations.crm]\nurl = "http://127.0.0.1:9"\n', "")),
    (
        "empty destinations",
        BASE.replace('[destinations.crm]\nurl = "http://127.0.0.1:9"\n', "[destinations]\n"),
    ),
    (
        "destinations not table",
        "destinations = 1\n" + BASE.replace('[destinations.crm]\nurl = "http://127.0.0.1:9"\n', ""),
    ),
    ("no agents", BASE.replace('[agents.a]\ntoken_env = "T"\ntenants = ["acme"]\n', "")),
    (
        "empty agents",
        BASE.replace('[agents.a]\ntoken_env = "T"\ntenants = ["acme"]\n', "[agents]\n"),
    ),
    (
        "agent not table",
        BASE.replace('[agents.a]\ntoken_env = "T"\ntenants = ["acme"]\n', "[agents]\na = 1\n"),
    ),
    (
        "destination not table",
        BASE.replace(
            '[destinations.crm]\nurl = "http://127.0.0.1:9"\n', '[destinations]\ncrm = "http://x"\n'
        ),
    ),
    # [service]
    ("service unknown key", at("SERVICE", 'hots = "0.0.0.0"')),
    ("host empty", at("SERVICE", 'host = ""')),
    ("host int", at("SERVICE", "host = 5")),
    ("port big", at("SERVICE", "port = 70000")),
    ("port negative", at("SERVICE", "port = -1")),
    ("port string", at("SERVICE", 'port = "80"')),
    ("port bool", at("SERVICE", "port = true")),
    ("port float", at("SERVICE", "port = 80.5")),
    ("drain zero", at("SERVICE", "drain_timeout = 0")),
    ("drain negative", at("SERVICE", "drain_timeout = -1.5")),
    ("drain string", at("SERVICE", 'drain_timeout = "5s"')),
    ("drain inf", at("SERVICE", "drain_timeout = inf")),
    ("drain nan", at("SERVICE", "drain_timeout = nan")),
    ("request body negative", at("SERVICE", "max_request_body = -1")),
    ("request body float", at("SERVICE", "max_request_body = 1.5")),
    ("response body string", at("SERVICE", 'max_response_body = "big"')),
    ("allowed_hosts string", at("SERVICE", 'allowed_hosts = "localhost"')),
    ("allowed_hosts empty entry", at("SERVICE", 'allowed_hosts = [""]')),
    ("allowed_hosts int", at("SERVICE", "allowed_hosts = [1]")),
    ("tenant header space", at("SERVICE", 'tenant_header = "X Tenant"')),
    ("tenant header int", at("SERVICE", "tenant_header = 5")),
    ("tenant header empty", at("SERVICE", 'tenant_header = ""')),
    ("access_log string", at("SERVICE", 'access_log = "yes"')),
    ("metrics int", at("SERVICE", "metrics = 1")),
    ("warmup_timeout negative", at("SERVICE", "warmup_timeout = -1")),
    ("warmup_timeout inf", at("SERVICE", "warmup_timeout = inf")),
    (
        "tls cert missing file",
        at("SERVICE", 'tls_cert_file = "nofile.pem"\ntls_key_file = "key.pem"'),
    ),
    ("tls cert alone", at("SERVICE", 'tls_cert_file = "cert.pem"')),
    ("tls key alone", at("SERVICE", 'tls_key_file = "key.pem"')),
    ("tls key empty", at("SERVICE", 'tls_cert_file = "cert.pem"\ntls_key_file = ""')),
    ("subject header same", at("SERVICE", 'subject_token_header = "x-toolpool-tenant"')),
    ("subject header bad", at("SERVICE", 'subject_token_header = "X:Y"')),
    ("egress not table", at("SERVICE", 'egress = "deny-all"')),
    ("egress deny string", at("SERVICE", '[service.egress]\ndeny = "10.0.0.0/8"')),
    ("egress deny bad net", at("SERVICE", '[service.egress]\ndeny = ["10.0.0.0/33"]')),
    ("egress allow int", at("SERVICE", "[service.egress]\nallow = [1]")),
    ("egress deny_unknown", at("SERVICE", '[service.egress]\ndeny_unknown = ["10.0.0.0/8"]')),
    ("egress typo", at("SERVICE", '[service.egress]\ndenny = ["10.0.0.0/8"]')),
    # [pool]
    ("pool typo", at("POOL", "max_conections = 3")),
    ("pool cap zero", at("POOL", "max_connections = 0")),
    ("pool cap string", at("POOL", 'max_connections = "10"')),
    ("pool cap float", at("POOL", "max_connections = 1.5")),
    ("pool idle zero", at("POOL", "idle_ttl = 0")),
    ("pool lifetime negative", at("POOL", "max_lifetime = -5")),
    ("pool health string", at("POOL", 'health_check_interval = "10"')),
    ("pool acquire inf", at("POOL", "acquire_timeout = inf")),
    ("pool connect zero", at("POOL", "connect_timeout = 0")),
    ("pool queue negative", at("POOL", "queue_factor = -1")),
    ("pool warmup big", at("POOL", "warmup = 1.5")),
    ("pool warmup negative", at("POOL", "warmup = -0.5")),
    ("pool warmup string", at("POOL", 'warmup = "all"')),
    ("pool verify missing", at("POOL", 'verify = "nofile.pem"')),
    ("pool verify int", at("POOL", "verify = 3")),
    ("pool verify empty", at("POOL", 'verify = ""')),
    ("pool policy bogus", at("POOL", 'policy = "bogus"')),
    ("pool policy int", at("POOL", "policy = 1")),
    ("open proxy", at("POOL", 'unknown_destinations = "pool"')),
    ("pool http2 string", at("POOL", 'http2 = "yes"')),
    # [limits]
    ("limits replicas zero", "[limits]\nreplicas = 0\n" + BASE),
    ("limits replicas string", '[limits]\nreplicas = "3"\n' + BASE),
    ("limits typo", "[limits]\nreplica = 3\n" + BASE),
    ("limits provider int", "[limits]\nprovider = 5\n" + BASE),
    ("limits provider nocolon", '[limits]\nprovider = "mymodule"\n' + BASE),
    ("limits provider no module", '[limits]\nprovider = "no_such_module_x:make"\n' + BASE),
    ("limits provider no attr", '[limits]\nprovider = "os:no_such_attr"\n' + BASE),
    ("limits provider not a limit", '[limits]\nprovider = "builtins:dict"\n' + BASE),
    ("limits redis no url", '[limits]\nprovider = "redis"\n' + BASE),
    (
        "limits redis bad option",
        '[limits]\nprovider = "redis"\nurl_env = "S"\nlease_ttl = 0.5\n' + BASE,
    ),
    # [destinations.NAME]
    ("dest bad name", BASE.replace("[destinations.crm]", '[destinations."crm/x"]')),
    ("dest typo", at("DEST", "max_conections = 3")),
    ("url missing", BASE.replace('url = "http://127.0.0.1:9"', 'uri = "http://127.0.0.1:9"')),
    ("url int", BASE.replace('url = "http://127.0.0.1:9"', "url = 9")),
    ("url empty", BASE.replace('url = "http://127.0.0.1:9"', 'url = ""')),
    ("url ftp", BASE.replace('url = "http://127.0.0.1:9"', 'url = "ftp://127.0.0.1:9"')),
    ("url path", BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://127.0.0.1:9/api"')),
    ("url userinfo", BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://u:p@127.0.0.1:9"')),
    ("url no host", BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://"')),
    ("url metadata", BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://169.254.169.254"')),
    (
        "url link-local v6",
        BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://[fe80::1]:8080"'),
    ),
    (
        "url metadata name",
        BASE.replace('url = "http://127.0.0.1:9"', 'url = "http://metadata.google.internal"'),
    ),
    ("dest cap zero", at("DEST", "max_connections = 0")),
    ("dest cap string", at("DEST", 'max_connections = "4"')),
    ("dest documented zero", at("DEST", "documented_limit = 0")),
    ("dest documented one", at("DEST", "documented_limit = 1")),
    ("dest documented float", at("DEST", "documented_limit = 10.5")),
    ("dest both limits", at("DEST", "documented_limit = 10\nmax_connections = 5")),
    ("dest idle zero", at("DEST", "idle_ttl = 0")),
    ("dest lifetime string", at("DEST", 'max_lifetime = "10m"')),
    ("dest health negative", at("DEST", "health_check_interval = -1")),
    ("dest acquire inf", at("DEST", "acquire_timeout = inf")),
    ("dest connect nan", at("DEST", "connect_timeout = nan")),
    ("dest queue negative", at("DEST", "queue_factor = -2")),
    ("dest warmup big", at("DEST", "warmup = 2")),
    ("dest verify missing", at("DEST", 'verify = "nofile.pem"')),
    ("dest verify list", at("DEST", 'verify = ["a"]')),
    ("dest cert missing", at("DEST", 'cert = "nofile.pem"')),
    ("dest cert ints", at("DEST", "cert = [1, 2]")),
    ("dest cert three", at("DEST", 'cert = ["cert.pem", "key.pem", "x.pem"]')),
    ("dest cert key missing", at("DEST", 'cert = ["cert.pem", "nokey.pem"]')),
    ("dest read zero", at("DEST", "read_timeout = 0")),
    ("dest write string", at("DEST", 'write_timeout = "30"')),
    ("dest forward bad", at("DEST", 'forward_tenant_as = "X Tenant"')),
    ("dest forward int", at("DEST", "forward_tenant_as = 5")),
    ("dest policy bogus", at("DEST", 'policy = "always"')),
    ("dest http2 string", at("DEST", 'http2 = "yes"')),
    ("dest auth not table", at("DEST", 'auth = "bearer"')),
    ("dest name field", at("DEST", 'name = "other"')),
    ("dest warmup_contexts", at("DEST", "warmup_contexts = []")),
    # auth
    ("auth no type", auth('token_env = "S"')),
    ("auth type int", auth("type = 5")),
    ("auth unknown type", auth('type = "oauth2_client_credential"')),
    ("auth type far", auth('type = "kerberos"')),
    ("bearer no token", auth('type = "bearer"')),
    ("bearer inline", auth('type = "bearer"\ntoken = "sekrit-inline-123"')),
    ("bearer env and file", auth('type = "bearer"\ntoken_env = "S"\ntoken_file = "token"')),
    ("bearer env empty name", auth('type = "bearer"\ntoken_env = ""')),
    ("bearer env int", auth('type = "bearer"\ntoken_env = 5')),
    ("bearer env unset", auth('type = "bearer"\ntoken_env = "NOPE"')),
    ("bearer env empty value", auth('type = "bearer"\ntoken_env = "EMPTY"')),
    ("bearer file missing", auth('type = "bearer"\ntoken_file = "nofile"')),
    ("bearer file empty", auth('type = "bearer"\ntoken_file = "empty"')),
    ("bearer file int", auth('type = "bearer"\ntoken_file = 5')),
    ("bearer typo", auth('type = "bearer"\ntoken_env = "S"\nheader = "X-Key"')),
    ("bearer tenants not table", auth('type = "bearer"\ntenants = "acme"')),
    (
        "bearer tenant not table",
        auth('type = "bearer"\n[destinations.crm.auth.tenants]\nacme = "S"'),
    ),
    (
        "bearer bad tenant",
        auth('type = "bearer"\n[destinations.crm.auth.tenants."a b"]\ntoken_env = "S"'),
    ),
    ("bearer tenant no token", auth('type = "bearer"\n[destinations.crm.auth.tenants.acme]\n')),
    (
        "bearer tenant inline",
        auth('type = "bearer"\n[destinations.crm.auth.tenants.acme]\ntoken = "sekrit-inline-123"'),
    ),
    (
        "bearer tenant typo",
        auth('type = "bearer"\n[destinations.crm.auth.tenants.acme]\ntoken_env = "S"\nscope = "x"'),
    ),
    ("api_key no key", auth('type = "api_key"')),
    ("api_key bad header", auth('type = "api_key"\nkey_env = "S"\nheader = "X Key"')),
    ("api_key header int", auth('type = "api_key"\nkey_env = "S"\nheader = 5')),
    ("api_key scheme int", auth('type = "api_key"\nkey_env = "S"\nscheme = 5')),
    ("api_key scheme empty", auth('type = "api_key"\nkey_env = "S"\nscheme = ""')),
    ("api_key inline", auth('type = "api_key"\nkey = "sekrit-inline-123"')),
    (
        "oauth no token_url",
        auth('type = "oauth2_client_credentials"\nclient_id = "c"\nclient_secret_env = "S"'),
    ),
    (
        "oauth token_url ftp",
        auth('type = "oauth2_client_credentials"\ntoken_url = "ftp://x/token"\n' + CLIENT),
    ),
    (
        "oauth token_url int",
        auth('type = "oauth2_client_credentials"\ntoken_url = 5\n' + CLIENT),
    ),
    ("oauth no client", auth(OAUTH)),
    ("oauth secret without id", auth(OAUTH + 'client_secret_env = "S"')),
    ("oauth id without secret", auth(OAUTH + 'client_id = "c"')),
    ("oauth id int", auth(OAUTH + 'client_id = 5\nclient_secret_env = "S"')),
    (
        "oauth bad method",
        auth(OAUTH + 'client_id = "c"\nclient_secret_env = "S"\nauth_method = "basic"'),
    ),
    ("oauth scope int", auth(OAUTH + 'client_id = "c"\nclient_secret_env = "S"\nscope = 5')),
    ("oauth inline secret", auth(OAUTH + 'client_id = "c"\nclient_secret = "sekrit-inline-123"')),
    ("oauth typo", auth(OAUTH + 'client_id = "c"\nclient_secret_env = "S"\nscopes = "a"')),
    (
        "oauth tenant no id",
        auth(OAUTH + '[destinations.crm.auth.tenants.acme]\nclient_secret_env = "S"'),
    ),
    (
        "oauth tenant no secret",
        auth(OAUTH + '[destinations.crm.auth.tenants.acme]\nclient_id = "c"'),
    ),
    (
        "oauth tenant typo",
        auth(OAUTH + ACME + CLIENT + 'scope = "x"'),
    ),
    ("oauth audience", auth(OAUTH + 'client_id = "c"\nclient_secret_env = "S"\naudience = "x"')),
    ("exchange no token_url", auth('type = "token_exchange"')),
    ("exchange token_url bad", auth('type = "token_exchange"\ntoken_url = "nope"')),
    ("exchange audience int", auth(EXCH + "audience = 5")),
    ("exchange resource empty", auth(EXCH + 'resource = ""')),
    ("exchange id only", auth(EXCH + 'client_id = "c"')),
    ("exchange secret only", auth(EXCH + 'client_secret_env = "S"')),
    ("exchange bad method", auth(EXCH + 'auth_method = "jwt"')),
    ("exchange typo", auth(EXCH + 'audiences = "x"')),
    (
        "exchange tenant no id",
        auth(EXCH + '[destinations.crm.auth.tenants.acme]\nclient_secret_env = "S"'),
    ),
    ("mtls no cert", auth('type = "mtls"')),
    ("mtls cert missing", auth('type = "mtls"\ncert = ["nocert.pem", "key.pem"]')),
    ("mtls cert int", auth('type = "mtls"\ncert = 5')),
    ("mtls tenant no cert", auth('type = "mtls"\n[destinations.crm.auth.tenants.acme]\n')),
    (
        "mtls tenant cert missing",
        auth('type = "mtls"\n[destinations.crm.auth.tenants.acme]\ncert = "nocert.pem"'),
    ),
    ("mtls typo", auth('type = "mtls"\ncert = "cert.pem"\nkey = "key.pem"')),
    # [agents.NAME]
    ("agent bad name", BASE.replace("[agents.a]", '[agents."a b"]')),
    ("agent typo", at("AGENT", 'role = "x"')),
    ("agent no token", BASE.replace('token_env = "T"\n', "")),
    ("agent inline token", BASE.replace('token_env = "T"', 'token = "sekrit-inline-123"')),
    ("agent short token", BASE.replace('token_env = "T"', 'token_env = "SHORT"')),
    ("agent env unset", BASE.replace('token_env = "T"', 'token_env = "NOT_SET_ANYWHERE"')),
    (
        "agent file missing",
        BASE.replace('token_env = "T"', 'token_file = "/nonexistent/agent-token"'),
    ),
    ("agent file empty", BASE.replace('token_env = "T"', 'token_file = "empty"')),
    ("agent short file", BASE.replace('token_env = "T"', 'token_file = "token"')),
    ("agent sha bad", BASE.replace('token_env = "T"', 'token_sha256 = "abc"')),
    ("agent sha int", BASE.replace('token_env = "T"', "token_sha256 = 5")),
    (
        "agent sha and env",
        BASE.replace('token_env = "T"', 'token_env = "T"\ntoken_sha256 = "' + "0" * 64 + '"'),
    ),
    ("agent no tenants", BASE.replace('tenants = ["acme"]\n', "")),
    ("agent tenants empty", BASE.replace('tenants = ["acme"]', "tenants = []")),
    ("agent tenants string", BASE.replace('tenants = ["acme"]', 'tenants = "acme"')),
    ("agent tenant bad", BASE.replace('tenants = ["acme"]', 'tenants = ["acme", "a b"]')),
    ("agent tenant int", BASE.replace('tenants = ["acme"]', "tenants = [1]")),
    ("agent tenant empty", BASE.replace('tenants = ["acme"]', 'tenants = [""]')),
    ("agent same token", BASE + '\n[agents.b]\ntoken_env = "T"\ntenants = ["acme"]\n'),
    (
        "agent same digest",
        BASE
        + '\n[agents.b]\ntoken_sha256 = "'
        + hashlib.sha256(b"agent-token-0123456789").hexdigest()
        + '"\ntenants = ["acme"]\n',
    ),
    # two mistakes: the first by line wins
    ("two mistakes", at("SERVICE", "port = -1").replace('tenants = ["acme"]', "tenants = []")),
    ("two mistakes reversed", at("AGENT", "role = 1").replace("#DEST", "idle_ttl = 0")),
]


EXPECTED: dict[str, str] = {}
for _line in (Path(__file__).parent / "config_messages.txt").read_text().splitlines():
    if _line and not _line.startswith("#"):
        _name, _, _message = _line.partition(" | ")
        EXPECTED[_name] = _message.removeprefix("now: ")  # the later line wins


def test_every_case_has_one_expected_message() -> None:
    assert [name for name, _ in CASES] == list(EXPECTED)


@pytest.mark.parametrize(("name", "text"), CASES, ids=[name for name, _ in CASES])
def test_the_message_of_a_bad_config(name: str, text: str, tmp_path: Path) -> None:
    for file, content in (("cert.pem", "x"), ("key.pem", "x"), ("empty", ""), ("token", "short\n")):
        (tmp_path / file).write_text(content)
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="toolpool.toml", env=ENV, base=tmp_path)
    assert str(info.value) == EXPECTED[name].replace("{base}", str(tmp_path))
    for secret in ("sekrit-inline-123", *(v for v in ENV.values() if len(v) > 8)):
        assert secret not in str(info.value)
