"""The egress policy's decisions, without I/O: every spelling of a metadata address, the
built-in denials and how only an allow *by address* lifts them, deny / deny_unknown / allow
with networks and host-name patterns, configuration errors that say what to write, and which checked
address a connect tries next."""

from __future__ import annotations

import asyncio
import ssl

import pytest

import toolpool
from tests._support.metadata_forms import METADATA_FORMS
from toolpool._egress import address_forms, attempts, parse_address
from toolpool.errors import ConfigError


@pytest.mark.parametrize(("host", "rule"), METADATA_FORMS)
def test_default_policy_refuses_every_metadata_form(host: str, rule: str) -> None:
    why = toolpool.Egress().check_host(host)
    assert why is not None, host
    assert f"rule {rule}" in why or f"{rule.replace('_', '-')}, built-in rule" in why


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "10.1.2.3", "crm.internal", "example.com", "0x7f000001"]
)
def test_default_policy_allows_ordinary_hosts(host: str) -> None:
    assert toolpool.Egress().check_host(host) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2852039166", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("0xA9FEA9FE", "169.254.169.254"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("crm.internal", None),
        ("256.1.1.1", None),
        ("1.2.3.4.5", None),
        ("08.1.1.1", None),  # 8 is no octal digit: a name, as inet_aton says
        ("0x", "0.0.0.0"),
        ("4294967296", None),
    ],
)
def test_parse_address_follows_inet_aton(text: str, expected: str | None) -> None:
    addr = parse_address(text)
    assert (str(addr) if addr is not None else None) == expected


def test_ipv6_forms_carry_their_ipv4_address() -> None:
    addr = parse_address("::ffff:169.254.169.254")
    assert addr is not None
    assert [str(a) for a in address_forms(addr)] == ["::ffff:a9fe:a9fe", "169.254.169.254"]
    why = toolpool.Egress().check_address("::ffff:a9fe:a9fe")
    assert why is not None and "carrying 169.254.169.254" in why


def test_only_an_allow_by_address_inside_the_range_lifts_a_builtin_denial() -> None:
    assert toolpool.Egress(allow=["169.254.169.254/32"]).check_host("169.254.169.254") is None
    assert toolpool.Egress(allow=["169.254.10.0/24"]).check_address("169.254.10.7") is None
    assert toolpool.Egress(allow=["169.254.10.0/24"]).check_address("169.254.169.254") is not None
    # A wide network and a host name never lift it.
    assert toolpool.Egress(allow=["0.0.0.0/0"]).check_address("169.254.169.254") is not None
    assert toolpool.Egress(allow=["::/0"]).check_address("fd00:ec2::254") is not None
    allow_name = toolpool.Egress(allow=["metadata.google.internal", "imds.test"])
    assert allow_name.check_host("metadata.google.internal") is not None
    assert allow_name.check_address("169.254.169.254", "imds.test") is not None


def test_deny_and_allow_networks_and_names() -> None:
    egress = toolpool.Egress(
        deny=[*toolpool.Egress.PRIVATE, "*.corp.example", "admin.internal"],
        allow=["10.1.2.0/24", "search.corp.example"],
    )
    assert "10.0.0.0/8" in (egress.check_address("10.9.9.9") or "")
    assert egress.check_address("10.1.2.3") is None  # allowed network
    assert egress.check_address("192.168.1.1", "search.corp.example") is None  # allowed name
    assert "'*.corp.example'" in (egress.check_host("wiki.corp.example") or "")
    assert "'*.corp.example'" in (egress.check_host("A.B.Corp.Example.") or "")
    assert egress.check_host("corp.example") is None  # "*." means subdomains only
    assert egress.check_host("ADMIN.internal") is not None
    assert egress.check_host("search.corp.example") is None
    assert egress.check_host("8.8.8.8") is None


def test_deny_unknown_spares_listed_destinations() -> None:
    egress = toolpool.Egress(deny_unknown=toolpool.Egress.PRIVATE)
    assert egress.check_address("10.0.0.5", listed=True) is None
    why = egress.check_address("10.0.0.5", listed=False)
    assert why is not None and "deny_unknown" in why
    assert egress.check_host("0x0a000005", listed=False) is not None  # any spelling


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deny": "10.0.0.0/8"}, "not one string"),
        ({"allow": ["10.0.0.0/33"]}, "neither a network"),
        ({"deny": ["exa mple.com"]}, "neither a network"),
        ({"deny": ["a.*.example"]}, "neither a network"),
        ({"deny": [""]}, "entries are networks"),
        ({"resolver": 42}, "takes a function"),
    ],
)
def test_bad_configuration_says_what_to_write(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        toolpool.Egress(**kwargs)  # type: ignore[arg-type]


def test_pool_takes_only_an_egress() -> None:
    with pytest.raises(ConfigError, match=r"egress must be a toolpool\.Egress"):
        toolpool.Pool(egress=["10.0.0.0/8"])
    assert repr(toolpool.Egress(deny=["10.0.0.0/8"])) == "Egress(deny=['10.0.0.0/8'])"


def _connect_through(addresses: list[str], outcomes: dict[str, BaseException | None]) -> list[str]:
    """Drive `attempts` as the drivers do; `outcomes[address]` is what its connect raises
    (None: it connects). The addresses tried, in order."""
    tried: list[str] = []
    for attempt in attempts(addresses):
        with attempt as address:
            tried.append(address)
            error = outcomes[address]
            if error is not None:
                raise error
    return tried


def test_a_failed_tcp_connect_tries_the_next_address_until_one_connects() -> None:
    refused = ConnectionRefusedError(111, "refused")
    outcomes: dict[str, BaseException | None] = {"a": refused, "b": OSError(113), "c": None}
    assert _connect_through(["a", "b", "c", "d"], outcomes) == ["a", "b", "c"]
    assert _connect_through(["c", "a"], outcomes) == ["c"]


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError("timed out"),  # an OSError, but the time is spent: no next address
        ssl.SSLError(1, "handshake failed"),  # TCP worked: the server is there
        asyncio.CancelledError(),  # not an OSError: cancellation passes through untouched
        KeyboardInterrupt(),
        ValueError("a bug"),
    ],
)
def test_anything_but_a_failed_tcp_connect_propagates_unchanged(error: BaseException) -> None:
    with pytest.raises(type(error)) as info:
        _connect_through(["a", "b"], {"a": error, "b": None})
    assert info.value is error


def test_the_last_address_failure_propagates() -> None:
    last = ConnectionRefusedError(111, "refused")
    with pytest.raises(ConnectionRefusedError) as info:
        _connect_through(["a", "b"], {"a": OSError(113), "b": last})
    assert info.value is last
