"""The egress policy: which addresses a pooled connection may reach, decided on the address a
host name resolves to at the moment of every connect.

Theory of operation. Agents build URLs from model output, so any URL can arrive. A check on the
URL alone is not enough: a host name can resolve (now, or after a DNS change) to a cloud
metadata address. So each driver, before it opens a socket, asks this module for the addresses
to try: the host is first checked as written (a metadata host name, or a literal address in any
encoding `inet_aton` accepts: decimal `2852039166`, octal `0251.0376.0251.0376`, hex
`0xa9fea9fe`, short forms, a trailing dot, IPv4-mapped IPv6), then resolved once, and every
address of the answer is checked. The driver connects only to these checked addresses, never to
the name again, so nothing can resolve differently between the check and the connect. One
forbidden address in an answer refuses the whole connect: a name that mixes a public address
with a metadata one is a rebinding attempt, not a fallback.

Rules, in order, for each address (and each IPv4 address embedded in an IPv6 one: mapped,
compatible, NAT64 `64:ff9b::/96`, 6to4, Teredo):

1. Built-in denials (`BUILTIN_DENIED`): cloud metadata, link-local, unspecified, multicast,
   broadcast. Lifted only by an `allow` network *inside* the denied one (allowing an address
   explicitly); a host-name allow or a wide network such as 0.0.0.0/0 never lifts them.
2. `allow`: a host-name pattern matching the host, or a network holding the address: allowed.
3. `deny`, then `deny_unknown` (destinations the pool was not given, only pooled on demand):
   a host-name pattern matching the host or a network holding the address: denied.
4. Anything else: allowed.

Metadata host names (`metadata.google.internal`, ...) are refused before any DNS query.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from toolpool.errors import ConfigError, EgressDenied

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BUILTIN_DENIED",
    "DENY_RULES",
    "METADATA_HOSTNAMES",
    "Egress",
    "EgressTarget",
    "Resolver",
    "attempts",
]

log = logging.getLogger("toolpool.egress")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A resolver hook: (host, port) -> the addresses the host resolves to, in preference order.
#: Raise `OSError` (e.g. `socket.gaierror`) for a name that does not resolve.
Resolver = Callable[[str, int], Iterable[str]]


class EgressTarget(Protocol):
    """What the egress check needs of a destination (`toolpool.DestinationPool` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def listed(self) -> bool:
        """Whether the destination was listed (not pooled on demand)."""
        ...

    @property
    def egress(self) -> Egress: ...

    def egress_refused(self, rule: str) -> None:
        """Count a refused connect under `rule`."""
        ...


def _net(text: str) -> Network:
    return ipaddress.ip_network(text)


#: Networks no connection reaches unless an `allow` network inside them says so, with the
#: rule name each one reports (the `rule` label of `toolpool_egress_denied_total`). The most
#: specific entries come first so that a metadata address reports "metadata".
BUILTIN_DENIED: tuple[tuple[Network, str], ...] = (
    (_net("169.254.169.254/32"), "metadata"),  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    (_net("169.254.170.2/32"), "metadata"),  # AWS ECS task credentials
    (_net("169.254.170.23/32"), "metadata"),  # AWS EKS pod identity
    (_net("fd00:ec2::254/128"), "metadata"),  # AWS IMDS over IPv6
    (_net("fd00:ec2::23/128"), "metadata"),  # AWS EKS pod identity over IPv6
    (_net("100.100.100.200/32"), "metadata"),  # Alibaba Cloud
    (_net("169.254.0.0/16"), "link_local"),
    (_net("fe80::/10"), "link_local"),
    (_net("0.0.0.0/8"), "unspecified"),  # "this network": 0.0.0.0 reaches the host itself
    (_net("::/128"), "unspecified"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("ff00::/8"), "multicast"),
    (_net("255.255.255.255/32"), "broadcast"),
)

#: Host names of cloud metadata services, refused before any DNS query (lower case, no dot).
METADATA_HOSTNAMES: frozenset[str] = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)

#: Every value of the `rule` label.
DENY_RULES: tuple[str, ...] = (
    "metadata",
    "link_local",
    "unspecified",
    "multicast",
    "broadcast",
    "deny",
    "deny_unknown",
)

_NAT64 = _net("64:ff9b::/96")
_IPV4_COMPATIBLE = _net("::/96")


def parse_address(host: str) -> Address | None:
    """The address a host written in a URL denotes, or None for a host name.

    Accepts what the system resolver accepts without DNS: dotted quads, IPv6 (brackets and a
    zone allowed), and `inet_aton`'s other forms (1-4 parts, each decimal, octal with a leading
    0 or hex with 0x, the last part filling the remaining bytes), with or without a trailing
    dot.

    >>> str(parse_address("0xa9fea9fe")), str(parse_address("0251.0376.43518."))
    ('169.254.169.254', '169.254.169.254')
    """
    text = host.strip().strip("[]").lower()
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    text = text.removesuffix(".")
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        pass
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if part[:2] == "0x":
            digits, base = part[2:], 16
            if not digits:  # "0x" alone is 0 for inet_aton
                values.append(0)
                continue
        elif len(part) > 1 and part[0] == "0":
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        if not digits or not all(c in "0123456789abcdef"[:base] for c in digits):
            return None
        values.append(int(digits, base))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def address_forms(addr: Address) -> list[Address]:
    """`addr` and every IPv4 address it carries (mapped, compatible, NAT64, 6to4, Teredo):
    each of them must pass, since a packet to one may reach the other."""
    forms: list[Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            forms.append(addr.ipv4_mapped)
        elif addr in _IPV4_COMPATIBLE and int(addr) > 1:
            forms.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr in _NAT64:
            forms.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr.sixtofour is not None:
            forms.append(addr.sixtofour)
        if addr.teredo is not None:
            forms.extend(addr.teredo)
    return forms


def _inside(net: Network, outer: Network) -> bool:
    if isinstance(net, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return net.subnet_of(outer)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return net.subnet_of(outer)
    return False


def _host_name(host: str) -> str:
    return host.strip().lower().removesuffix(".")


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


@dataclass(frozen=True)
class _Rules:
    """One list of `deny` / `allow` entries, split into networks and host-name patterns."""

    networks: tuple[Network, ...]
    patterns: tuple[str, ...]

    @classmethod
    def parse(cls, what: str, entries: Iterable[str]) -> _Rules:
        if isinstance(entries, str):
            raise ConfigError(
                f"Egress({what}=...) takes a list of networks and host names, not one string; "
                f"write {what}=[{entries!r}]"
            )
        networks: list[Network] = []
        patterns: list[str] = []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(
                    f"Egress({what}=...): entries are networks ('10.0.0.0/8', '::1') or host "
                    f"names ('crm.internal', '*.corp.example'), got {entry!r}"
                )
            text = entry.strip()
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            addr = parse_address(text)
            if addr is not None:  # another spelling of an address ("0x7f000001")
                networks.append(ipaddress.ip_network(addr))
                continue
            name = _host_name(text)
            label = name.removeprefix("*.")
            if (
                "/" in text
                or "*" in label
                or not all(
                    part and all(c.isalnum() or c in "-_" for c in part)
                    for part in label.split(".")
                )
            ):
                raise ConfigError(
                    f"Egress({what}=...): {entry!r} is neither a network ('10.0.0.0/8') nor a "
                    f"host name ('crm.internal', or '*.corp.example' for its subdomains)"
                )
            patterns.append(name)
        return cls(tuple(networks), tuple(patterns))

    def network_of(self, addr: Address) -> Network | None:
        for net in self.networks:
            if addr.version == net.version and addr in net:
                return net
        return None

    def pattern_of(self, name: str) -> str | None:
        for pattern in self.patterns:
            if _pattern_matches(pattern, name):
                return pattern
        return None


@dataclass(frozen=True)
class _Denial:
    rule: str
    entry: str
    # The IPv4 address embedded in the refused IPv6 one that matched, if that was the match.
    embedded: Address | None = None


@dataclass(frozen=True)
class Egress:
    """The egress policy of a `Pool`: which addresses tool calls may connect to.

    Checked at every connect, in both drivers, on the address the host name resolves to
    *then* (and on every address of the answer), so a name that resolves or rebinds to a
    forbidden address is refused before any packet is sent to it. The default policy refuses
    cloud metadata (169.254.169.254, fd00:ec2::254, 100.100.100.200, metadata host names),
    link-local, unspecified, multicast and broadcast addresses, whatever spelling a URL uses.

    ```python
    pool = toolpool.Pool(
        [toolpool.Destination("crm", "http://10.1.2.3:8080")],
        egress=toolpool.Egress(
            deny_unknown=toolpool.Egress.PRIVATE,   # model-built URLs: no internal ranges
            allow=["search.internal"],              # ... except this internal service
        ),
    )
    ```

    - `deny`: networks (`"10.0.0.0/8"`, `"::1"`) and host names (`"admin.internal"`,
      `"*.corp.example"` for its subdomains) no connection may reach.
    - `deny_unknown`: the same, for destinations pooled on demand only (a URL a tool built,
      not a `Destination` given to the pool): listed internal services stay reachable.
    - `allow`: networks and host names reachable even if `deny` / `deny_unknown` matches. A
      network inside a built-in denied range (`"169.254.10.0/24"`) also lifts the built-in
      denial for itself; host names and wider networks never do.
    - `resolver`: a function `(host, port) -> addresses` used instead of the system resolver
      (tests map a test-only name to a loopback address with it; `toolpool.testing.HostMap`).

    A refused connect raises `toolpool.EgressDenied` (an `httpx.TransportError`), counts in
    `toolpool_egress_denied_total{destination,rule}` and logs one line on `toolpool.egress`.
    """

    deny: Sequence[str] = ()
    deny_unknown: Sequence[str] = ()
    allow: Sequence[str] = ()
    resolver: Resolver | None = field(default=None, compare=False)
    _deny: _Rules = field(init=False, repr=False, compare=False)
    _deny_unknown: _Rules = field(init=False, repr=False, compare=False)
    _allow: _Rules = field(init=False, repr=False, compare=False)
    # Allow networks inside a built-in denied range: the only ones that lift its denial.
    _lifting: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    #: Private and shared address space (RFC 1918, RFC 6598 carrier-grade NAT, IPv6 ULA):
    #: where internal services live. `deny_unknown=Egress.PRIVATE` keeps model-built URLs out.
    PRIVATE: ClassVar[tuple[str, ...]] = (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    )
    #: This host's loopback addresses (admin ports, sidecars).
    LOOPBACK: ClassVar[tuple[str, ...]] = ("127.0.0.0/8", "::1/128")

    def __post_init__(self) -> None:
        for name in ("deny", "deny_unknown", "allow"):
            rules = _Rules.parse(name, getattr(self, name))
            object.__setattr__(self, name, tuple(getattr(self, name)))
            object.__setattr__(self, f"_{name}", rules)
        if self.resolver is not None and not callable(self.resolver):
            raise ConfigError(
                "Egress(resolver=...) takes a function (host, port) -> addresses, "
                f"got {type(self.resolver).__name__}"
            )
        lifting = tuple(
            net
            for net in self._allow.networks
            if any(_inside(net, builtin) for builtin, _ in BUILTIN_DENIED)
        )
        object.__setattr__(self, "_lifting", lifting)

    def __repr__(self) -> str:
        parts = [
            f"{name}={list(getattr(self, name))!r}"
            for name in ("deny", "deny_unknown", "allow")
            if getattr(self, name)
        ]
        if self.resolver is not None:
            parts.append("resolver=<custom>")
        return f"Egress({', '.join(parts)})"

    # ------------------------------------------------------------------ decisions (no I/O)

    def check_host(self, host: str, *, listed: bool = True) -> str | None:
        """Why a connection to `host` (as written in a URL) is refused before resolution
        (a metadata host name, a denied name or a denied literal address), or None.

        >>> Egress().check_host("0xA9FEA9FE")
        'address 169.254.169.254 is a cloud metadata address (built-in rule metadata)'
        """
        denial, _ = self._before_resolution(host, listed)
        return None if denial is None else _reason(denial, parse_address(host))

    def check_address(
        self, address: str, host: str | None = None, *, listed: bool = True
    ) -> str | None:
        """Why a connection to the resolved `address` of `host` is refused, or None."""
        addr = parse_address(address)
        if addr is None:
            raise ValueError(f"{address!r} is not an IP address")
        host_allowed = host is not None and self._allow_pattern(host) is not None
        denial = self._address_denial(addr, host_allowed, listed)
        return None if denial is None else _reason(denial, addr)

    def _allow_pattern(self, host: str) -> str | None:
        return self._allow.pattern_of(_host_name(host))

    def _before_resolution(self, host: str, listed: bool) -> tuple[_Denial | None, Address | None]:
        """(denial, literal address) for `host` as written."""
        addr = parse_address(host)
        if addr is not None:
            return self._address_denial(addr, False, listed), addr
        name = _host_name(host)
        if name in METADATA_HOSTNAMES:
            return _Denial("metadata", name), None
        if self._allow_pattern(name) is not None:
            return None, None
        for rule, rules in self._deny_rules(listed):
            pattern = rules.pattern_of(name)
            if pattern is not None:
                return _Denial(rule, pattern), None
        return None, None

    def _deny_rules(self, listed: bool) -> tuple[tuple[str, _Rules], ...]:
        if listed:
            return (("deny", self._deny),)
        return (("deny", self._deny), ("deny_unknown", self._deny_unknown))

    def _address_denial(self, addr: Address, host_allowed: bool, listed: bool) -> _Denial | None:
        for form in address_forms(addr):
            embedded = form if form is not addr else None
            for builtin, rule in BUILTIN_DENIED:
                if form.version == builtin.version and form in builtin:
                    if not any(form.version == n.version and form in n for n in self._lifting):
                        return _Denial(rule, str(builtin), embedded)
                    break
            if host_allowed or self._allow.network_of(form) is not None:
                continue
            for rule, rules in self._deny_rules(listed):
                net = rules.network_of(form)
                if net is not None:
                    return _Denial(rule, str(net), embedded)
        return None

    # ------------------------------------------------------------------ the drivers' step

    def plan(self, dest: EgressTarget) -> _Plan:
        """Check the destination's host as written; raise `EgressDenied` if it is refused."""
        host = dest.host
        listed = bool(dest.listed)
        denial, literal = self._before_resolution(host, listed)
        if denial is not None:
            raise _refuse(dest, denial, literal)
        return _Plan(self, dest, listed, literal)


class _Plan:
    """The host of one connect, checked as written; `checked()` checks the resolver's answer."""

    __slots__ = ("dest", "egress", "host_allowed", "listed", "literal")

    def __init__(
        self, egress: Egress, dest: EgressTarget, listed: bool, literal: Address | None
    ) -> None:
        self.egress = egress
        self.dest = dest
        self.listed = listed
        self.literal = literal
        self.host_allowed = literal is None and egress._allow_pattern(dest.host) is not None

    def checked(self, answers: Iterable[str]) -> list[str]:
        """The resolver's answer as connectable address strings, every one checked."""
        out: list[str] = []
        for answer in answers:
            addr = parse_address(answer)
            if addr is None:
                raise OSError(f"the resolver answered {answer!r} for {self.dest.host!r}")
            denial = self.egress._address_denial(addr, self.host_allowed, self.listed)
            if denial is not None:
                raise _refuse(self.dest, denial, addr)
            # Canonical text (what was checked), keeping an IPv6 zone a link-local needs.
            text = f"{addr}%{answer.split('%', 1)[1]}" if "%" in answer else str(addr)
            if text not in out:
                out.append(text)
        if not out:
            raise OSError(f"{self.dest.host!r} resolved to no address")
        return out


def _reason(denial: _Denial, addr: Address | None) -> str:
    what = f"address {addr}" if addr is not None else f"host name {denial.entry!r}"
    if denial.embedded is not None:
        what += f" (carrying {denial.embedded})"
    if denial.rule == "metadata":
        kind = "a cloud metadata address" if addr is not None else "a cloud metadata host name"
        return f"{what} is {kind} (built-in rule metadata)"
    if denial.rule in ("link_local", "unspecified", "multicast", "broadcast"):
        return f"{what} is in {denial.entry} ({denial.rule.replace('_', '-')}, built-in rule)"
    scope = "deny"
    if denial.rule == "deny_unknown":
        scope = "deny_unknown (destinations pooled on demand)"
    if addr is not None:
        return f"{what} is in {denial.entry}, listed in the egress policy's {scope}"
    return f"{what} matches the egress policy's {scope}"


def _refuse(dest: EgressTarget, denial: _Denial, addr: Address | None) -> EgressDenied:
    """Count, log and build the error for a refused connect."""
    dest.egress_refused(denial.rule)
    address = str(addr) if addr is not None else None
    log.warning(
        "egress denied: destination %s host %s address %s port %d rule %s (%s)",
        dest.name,
        dest.host,
        address or "-",
        dest.port,
        denial.rule,
        denial.entry,
    )
    return EgressDenied(
        destination=dest.name,
        host=dest.host,
        address=address,
        rule=denial.rule,
        reason=_reason(denial, addr),
    )


# ---------------------------------------------------------------------- resolution (I/O)


def _answers(infos: Iterable[tuple[Any, ...]]) -> list[str]:
    return [str(info[4][0]) for info in infos]


def resolve(dest: EgressTarget) -> list[str]:
    """The addresses to connect to for `dest`, resolved once and every one checked (thread
    driver). Raises `EgressDenied` before any connect, `OSError` if nothing resolves."""
    egress: Egress = dest.egress
    plan = egress.plan(dest)
    if plan.literal is not None:
        return [str(plan.literal)]
    if egress.resolver is not None:
        return plan.checked(egress.resolver(dest.host, dest.port))
    return plan.checked(_answers(socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)))


async def aresolve(dest: EgressTarget, loop: asyncio.AbstractEventLoop) -> list[str]:
    """`resolve` for the asyncio driver (the system resolver runs in the loop's executor)."""
    egress: Egress = dest.egress
    plan = egress.plan(dest)
    if plan.literal is not None:
        return [str(plan.literal)]
    if egress.resolver is not None:
        hook = egress.resolver
        answers = await loop.run_in_executor(None, lambda: list(hook(dest.host, dest.port)))
        return plan.checked(answers)
    infos = await loop.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)
    return plan.checked(_answers(infos))


def try_next(exc: OSError, address: str, addresses: list[str]) -> bool:
    """After a failed connect to `address`: whether to try the next checked address (a TCP
    connect that failed, as the system's create_connection does; not a failed TLS handshake,
    a timeout, or the last address). When False the caller re-raises `exc`."""
    return address != addresses[-1] and not isinstance(exc, TimeoutError | ssl.SSLError)


class Attempt:
    """One connect to one checked address: `with attempt as address:` around the connect
    (see `attempts`)."""

    __slots__ = ("address", "addresses", "connected")

    def __init__(self, address: str, addresses: list[str]) -> None:
        self.address = address
        self.addresses = addresses
        self.connected = False

    def __enter__(self) -> str:
        return self.address

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.connected = True
            return False
        # Swallowed (the next address is tried) only as `try_next` allows; anything else,
        # a cancellation included, propagates unchanged.
        return isinstance(exc, OSError) and try_next(exc, self.address, self.addresses)


def attempts(addresses: list[str]) -> Iterator[Attempt]:
    """The connects to try for `addresses` (resolved and checked), in order, as the system's
    create_connection tries them: after a failed TCP connect the next address, until one
    connects; a timeout, a failed TLS handshake or the last address's failure propagates.
    The drivers only connect:

    ```python
    for attempt in _egress.attempts(await _egress.aresolve(dest, loop)):
        with attempt as address:
            sock = await connect_to(address)
    ```
    """
    for address in addresses:
        attempt = Attempt(address, addresses)
        yield attempt
        if attempt.connected:
            return
