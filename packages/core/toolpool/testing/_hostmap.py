"""`HostMap`: a resolver hook for `toolpool.Egress(resolver=...)` that answers test-only host
names from a table, so egress tests exercise real resolution-then-check without DNS."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable, Mapping

__all__ = ["HostMap"]


class HostMap:
    """Answers `(host, port) -> addresses` from a table; unknown names fail like DNS does.

    Only loopback addresses may be *connected to* in tests; the table may hold any address
    (a policy test maps a name to 169.254.169.254 to prove the connect is refused before it
    happens), but `set` refuses nothing: pair it with a connect spy.

    ```python
    names = HostMap({"evil.test": ["127.0.0.2"]})
    pool = toolpool.Pool(egress=toolpool.Egress(deny=["127.0.0.2"], resolver=names))
    names.set("rebind.test", "127.0.0.1")      # first answer ...
    names.set("rebind.test", "127.0.0.2")      # ... and the next connect sees this one
    names.lookups("rebind.test")               # how many times it was resolved
    ```
    """

    def __init__(self, table: Mapping[str, str | Iterable[str]] | None = None) -> None:
        self._lock = threading.Lock()
        self._table: dict[str, tuple[str, ...]] = {}
        self._lookups: dict[str, int] = {}
        for host, addresses in (table or {}).items():
            self.set(host, addresses)

    def set(self, host: str, addresses: str | Iterable[str]) -> None:
        """Make `host` resolve to `addresses` (in this order) from now on."""
        answer = (addresses,) if isinstance(addresses, str) else tuple(addresses)
        for address in answer:
            ipaddress.ip_address(address)  # a typo must fail here, not as a DNS error later
        with self._lock:
            self._table[host.lower().rstrip(".")] = answer

    def lookups(self, host: str) -> int:
        """How many times `host` was resolved."""
        with self._lock:
            return self._lookups.get(host.lower().rstrip("."), 0)

    def __call__(self, host: str, port: int) -> list[str]:
        name = host.lower().rstrip(".")
        with self._lock:
            self._lookups[name] = self._lookups.get(name, 0) + 1
            answer = self._table.get(name)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r} is not in the test's HostMap")
        return list(answer)

    def __repr__(self) -> str:
        return f"<HostMap {sorted(self._table)}>"
