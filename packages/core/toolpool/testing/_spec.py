"""ServiceSpec: how one loopback service behaves (latency, limits, auth), and its text form."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

#: A duration in seconds: a fixed value, or a ``(lo, hi)`` range drawn uniformly per use.
Seconds = float | tuple[float, float]


def _check_seconds(name: str, value: Seconds, *, allow_inf: bool = False) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1]):
        raise ValueError(f"{name} must be seconds or a (lo, hi) range with lo <= hi, got {value!r}")
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name} must be a number of seconds, got {v!r}")
        if v < 0 or math.isnan(v) or (math.isinf(v) and not allow_inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def draw_seconds(value: Seconds, rng: random.Random) -> float:
    """Return ``value`` itself, or a uniform draw from it when it is a ``(lo, hi)`` range."""
    if isinstance(value, tuple):
        lo, hi = value
        return lo if lo == hi else rng.uniform(lo, hi)
    return float(value)


@dataclass(frozen=True)
class ServiceSpec:
    """How one service of a :class:`~toolpool.testing.Downstream` behaves.

    Example::

        ServiceSpec(service_time=(0.01, 0.03), concurrency_limit=30, require_auth=False)
    """

    #: Seconds each API request takes (fixed or a uniform ``(lo, hi)`` range); timers, no CPU.
    service_time: Seconds = 0.0
    #: nginx ``limit_conn`` style: an API request arriving while this many are in progress is
    #: answered 503 at once. ``None``: unlimited.
    concurrency_limit: int | None = None
    #: The server closes a connection idle this long (nginx's default ``keepalive_timeout``).
    keepalive_timeout: float = 75.0
    #: API endpoints need ``Authorization: Bearer <token issued by this service>``.
    require_auth: bool = True
    #: Latency of the token endpoint, like a real identity provider (fixed or a range).
    token_latency: Seconds = (0.1, 0.3)
    #: ``expires_in`` of issued tokens, in seconds; tokens stop working after it.
    token_ttl: float = 3600.0
    #: TLS with a required client certificate; the tenant is the certificate's common name.
    mtls: bool = False
    #: On TLS, offer HTTP/2 (``h2``) as well as ``http/1.1`` by ALPN; the client's offer decides
    #: (a client that offers only ``http/1.1`` gets HTTP/1.1). Plain HTTP is always HTTP/1.1.
    http2: bool = True
    #: ``SETTINGS_MAX_CONCURRENT_STREAMS`` an HTTP/2 connection announces (nginx's default).
    max_concurrent_streams: int = 128

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_concurrent_streams, bool)
            or not isinstance(self.max_concurrent_streams, int)
            or self.max_concurrent_streams < 1
        ):
            raise ValueError(
                f"max_concurrent_streams must be an int >= 1, got {self.max_concurrent_streams!r}"
            )
        _check_seconds("service_time", self.service_time)
        _check_seconds("token_latency", self.token_latency)
        _check_seconds("keepalive_timeout", self.keepalive_timeout, allow_inf=True)
        if self.keepalive_timeout <= 0:
            raise ValueError("keepalive_timeout must be > 0")
        _check_seconds("token_ttl", self.token_ttl)
        if self.concurrency_limit is not None and (
            isinstance(self.concurrency_limit, bool)
            or not isinstance(self.concurrency_limit, int)
            or self.concurrency_limit < 1
        ):
            raise ValueError(
                f"concurrency_limit must be an int >= 1 or None, got {self.concurrency_limit!r}"
            )

    def to_text(self) -> str:
        """The ``key=value,...`` form used by ``python -m toolpool.testing serve --service``."""
        parts: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={_format_value(value)}")
        return ",".join(parts)

    @classmethod
    def from_text(cls, text: str) -> ServiceSpec:
        """Parse ``key=value,...`` (ranges as ``lo..hi``, ``none``/``true``/``false``)."""
        kwargs: dict[str, object] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(
                    f"bad service option {item!r}: expected one of {sorted(names)} as key=value"
                )
            kwargs[key] = _parse_value(key, raw.strip())
        return cls(**kwargs)  # type: ignore[arg-type]


def _format_value(value: object) -> str:
    if isinstance(value, tuple):
        return f"{float(value[0])!r}..{float(value[1])!r}"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _parse_value(key: str, raw: str) -> object:
    low = raw.lower()
    if key in ("require_auth", "mtls", "http2"):
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key} must be true or false, got {raw!r}")
        return low in ("true", "1", "yes")
    if key == "concurrency_limit":
        return None if low in ("none", "") else int(raw)
    if key == "max_concurrent_streams":
        return int(raw)
    if ".." in raw:
        lo, _, hi = raw.partition("..")
        return (float(lo), float(hi))
    return float(raw)
