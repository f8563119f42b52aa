"""`toolpool top`: a live terminal view of a process's toolpool metrics, scraped over HTTP.

It reads only the Prometheus exposition (`toolpool.metrics`), so it works against any
process that exposes it: an application with `toolpool.metrics.serve()`, a `toolpool serve`
sidecar, or a service mounting `toolpool.metrics.asgi_app()`. Rates and wait percentiles come
from the difference between two scrapes, like Prometheus' `rate()` and
`histogram_quantile()`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = [
    "HELP",
    "DestinationSample",
    "Row",
    "Scrape",
    "configure",
    "fetch",
    "parse",
    "quantile",
    "render",
    "rows",
    "run",
]

HELP = "live view of a pool's metrics, scraped from a /metrics endpoint"

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
# Closes the pool decided on (as opposed to broken connections and shutdown): the seed's
# "eviction rate".
EVICTION_REASONS = ("idle_ttl", "lifetime", "health", "affinity", "limit")
# An HTTP/2 destination's slots are stream permits: new/s and evict/s count its connections
# (the toolpool_http2_connections_* counters), closed for these reasons by the pool's choice.
H2_EVICTION_REASONS = ("idle_ttl", "lifetime", "health")
_BAR_WIDTH = 10


@dataclass
class DestinationSample:
    """One destination's toolpool series in one scrape (absent series stay at their default)."""

    used: float = 0.0
    idle: float = 0.0
    opening: float = 0.0
    closing: float = 0.0
    max_connections: float = 0.0
    limit: float | None = None
    pending: float = 0.0
    pending_max: float | None = None
    created: float = 0.0
    closed: dict[str, float] = field(default_factory=dict)
    # Cumulative wait-time buckets: upper bound (math.inf last) -> count.
    wait_buckets: dict[float, float] = field(default_factory=dict)
    wait_count: float = 0.0
    auth_refreshes: float | None = None
    breaker: str | None = None
    # Speaks HTTP/2 (toolpool_destination_protocol{protocol="h2"}); its connection counters.
    h2: bool = False
    h2_created: float = 0.0
    h2_closed: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scrape:
    """A parsed exposition and when it was taken (a monotonic clock reading, in seconds)."""

    at: float
    destinations: dict[str, DestinationSample]


def parse(text: str, at: float) -> Scrape:
    """Pick the toolpool series out of a Prometheus text exposition."""
    dests: dict[str, DestinationSample] = {}

    def of(labels: dict[str, str]) -> DestinationSample | None:
        name = labels.get("destination")
        if name is None:
            return None
        sample = dests.get(name)
        if sample is None:
            sample = dests[name] = DestinationSample()
        return sample

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("toolpool_"):
                continue
            d = of(s.labels)
            if d is None:
                continue
            name, value, labels = s.name, float(s.value), s.labels
            if name == "toolpool_connections":
                state = labels.get("state", "")
                if state in ("used", "idle", "opening", "closing"):
                    setattr(d, state, value)
            elif name == "toolpool_connections_max":
                d.max_connections = value
            elif name == "toolpool_connections_limit":
                d.limit = value
            elif name == "toolpool_pending_requests":
                d.pending = value
            elif name == "toolpool_pending_requests_max":
                d.pending_max = value
            elif name == "toolpool_connections_created_total":
                d.created = value
            elif name == "toolpool_connections_closed_total":
                d.closed[labels.get("reason", "")] = value
            elif name == "toolpool_connection_wait_seconds_bucket":
                d.wait_buckets[float(labels["le"])] = value
            elif name == "toolpool_connection_wait_seconds_count":
                d.wait_count = value
            elif name == "toolpool_auth_refreshes_total":
                d.auth_refreshes = (d.auth_refreshes or 0.0) + value
            elif name == "toolpool_breaker_state" and value >= 1.0:
                d.breaker = labels.get("state")
            elif name == "toolpool_destination_protocol" and value >= 1.0:
                d.h2 = labels.get("protocol") == "h2"
            elif name == "toolpool_http2_connections_created_total":
                d.h2_created = value
            elif name == "toolpool_http2_connections_closed_total":
                d.h2_closed[labels.get("reason", "")] = value
    return Scrape(at, dests)


@dataclass(frozen=True)
class Row:
    """What one destination's line shows. Rates and percentiles are None without a previous
    scrape (or, for percentiles, when no request acquired a connection in the window)."""

    destination: str
    used: int
    idle: int
    opening: int
    max_connections: int
    limit: int | None
    pending: int
    pending_max: int | None
    utilization: float
    wait_p50: float | None
    wait_p99: float | None
    # The first wait bucket's bound: a percentile at or under it reads "≤ bound".
    wait_floor: float
    requests_per_s: float | None
    created_per_s: float | None
    evicted_per_s: float | None
    auth_refreshes_per_s: float | None
    breaker: str | None


def _increase(now: float, before: float) -> float:
    """A counter's increase; a counter that went down was reset (process restart)."""
    return now - before if now >= before else now


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile estimated from cumulative buckets (upper bound -> count), with linear
    interpolation inside the bucket (as Prometheus' histogram_quantile); None if empty. A
    quantile in the +Inf bucket is reported as the highest finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            in_bucket = count - below
            if in_bucket <= 0:
                return bound
            return lower + (bound - lower) * (rank - below) / in_bucket
        lower, below = bound, count
    return lower


def rows(previous: Scrape | None, current: Scrape) -> list[Row]:
    """The table's rows: gauges from `current`, rates and percentiles over the window since
    `previous` (a destination new in `current` counts from zero)."""
    out: list[Row] = []
    window = current.at - previous.at if previous is not None else 0.0
    for name in sorted(current.destinations):
        cur = current.destinations[name]
        prev = previous.destinations.get(name) if previous is not None else None
        if previous is not None and prev is None:
            prev = DestinationSample()
        finite = sorted(b for b in cur.wait_buckets if not math.isinf(b))
        floor = finite[0] if finite else 0.0
        p50 = p99 = None
        requests = created = evicted = refreshes = None
        if prev is not None and window > 0:
            delta = {
                le: _increase(n, prev.wait_buckets.get(le, 0.0))
                for le, n in cur.wait_buckets.items()
            }
            p50 = quantile(0.5, delta)
            p99 = quantile(0.99, delta)
            requests = _increase(cur.wait_count, prev.wait_count) / window
            reasons: tuple[str, ...]
            if cur.h2:
                # Connections, not stream permits (the gauges count permits: the cap's unit).
                created = _increase(cur.h2_created, prev.h2_created) / window
                closed, prev_closed, reasons = cur.h2_closed, prev.h2_closed, H2_EVICTION_REASONS
            else:
                created = _increase(cur.created, prev.created) / window
                closed, prev_closed, reasons = cur.closed, prev.closed, EVICTION_REASONS
            evicted = (
                sum(_increase(closed.get(r, 0.0), prev_closed.get(r, 0.0)) for r in reasons)
                / window
            )
            if cur.auth_refreshes is not None:
                refreshes = _increase(cur.auth_refreshes, prev.auth_refreshes or 0.0) / window
        cap = cur.max_connections
        out.append(
            Row(
                destination=name,
                used=int(cur.used),
                idle=int(cur.idle),
                opening=int(cur.opening),
                max_connections=int(cap),
                limit=int(cur.limit) if cur.limit is not None else None,
                pending=int(cur.pending),
                pending_max=int(cur.pending_max) if cur.pending_max is not None else None,
                utilization=(cur.used + cur.opening) / cap if cap > 0 else 0.0,
                wait_p50=p50,
                wait_p99=p99,
                wait_floor=floor,
                requests_per_s=requests,
                created_per_s=created,
                evicted_per_s=evicted,
                auth_refreshes_per_s=refreshes,
                breaker=cur.breaker,
            )
        )
    return out


# ---------------------------------------------------------------------- rendering

_DASH = "–"


def format_seconds(value: float | None, floor: float = 0.0) -> str:
    """`12 ms`, `1.5 s`; `≤1 ms` for a percentile inside the first bucket."""
    if value is None:
        return _DASH
    if floor > 0 and value <= floor:
        return "≤" + format_seconds(floor)
    if value < 1.0:
        ms = value * 1000
        return f"{ms:.1f}".removesuffix(".0") + " ms" if ms < 10 else f"{ms:.0f} ms"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def format_rate(value: float | None) -> str:
    if value is None:
        return _DASH
    if value == 0:
        return "0"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _waits(row: Row) -> str:
    if row.wait_p50 is None or row.wait_p99 is None:
        return _DASH
    p50 = format_seconds(row.wait_p50, row.wait_floor)
    return f"{p50}/{format_seconds(row.wait_p99, row.wait_floor)}"


def _bar(utilization: float) -> str:
    filled = max(0, min(_BAR_WIDTH, round(utilization * _BAR_WIDTH)))
    return "█" * filled + "░" * (_BAR_WIDTH - filled)


def _style(utilization: float) -> str:
    # The seed's threshold: sustained utilization above 80 % means too little capacity.
    if utilization >= 0.8:
        return "red"
    return "yellow" if utilization >= 0.6 else "green"


_BREAKER_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


def render(
    table_rows: Iterable[Row], *, url: str, window: float | None, error: str | None = None
) -> RenderableType:
    """The frame for `rows` (a rich renderable)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = f"toolpool top · {url}"
    caption = f"rates and waits over the last {window:.1f} s" if window else "first scrape"
    table = Table(
        title=title,
        caption=caption,
        title_justify="left",
        caption_justify="left",
        box=box.MINIMAL_HEAVY_HEAD,
        show_edge=False,
    )
    table.add_column("destination", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("utilization", no_wrap=True)
    for header in ("used/idle/max", "queue", "wait p50/p99", "req/s", "new/s", "evict/s"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("auth/s", justify="right", no_wrap=True)
    table.add_column("breaker", no_wrap=True)
    any_row = False
    for r in table_rows:
        any_row = True
        usage = f"{r.used}/{r.idle}/{r.max_connections}"
        if r.limit is not None and r.limit < r.max_connections:
            usage += f" ↓{r.limit}"  # the adaptive limit is below max_connections
        queue = str(r.pending) if r.pending_max is None else f"{r.pending}/{r.pending_max}"
        bar = Text(_bar(r.utilization), style=_style(r.utilization))
        bar.append(f" {r.utilization * 100:3.0f}%")
        breaker = (
            Text(r.breaker, style=_BREAKER_STYLE.get(r.breaker, ""))
            if r.breaker is not None
            else Text(_DASH)
        )
        table.add_row(
            r.destination,
            bar,
            usage,
            queue,
            _waits(r),
            format_rate(r.requests_per_s),
            format_rate(r.created_per_s),
            format_rate(r.evicted_per_s),
            format_rate(r.auth_refreshes_per_s),
            breaker,
        )
    parts: list[RenderableType] = [table]
    if not any_row and error is None:
        parts.append(Text(f"no toolpool metrics at {url} yet", style="yellow"))
    if error is not None:
        parts.append(Text(f"scrape failed: {error}", style="bold red"))
    return Group(*parts)


# ---------------------------------------------------------------------- the command


def fetch(url: str, timeout: float = 5.0) -> Scrape:
    """Scrape `url` once (Prometheus text format)."""
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        response = client.get(url, headers={"Accept": "text/plain;version=0.0.4"})
    response.raise_for_status()
    return parse(response.text, time.monotonic())


def configure(parser: argparse.ArgumentParser) -> None:
    """Add `toolpool top`'s options."""
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the /metrics endpoint to watch (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between scrapes; rates and waits cover one interval (default 1)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="scrape twice, one interval apart, print one frame and exit",
    )


def run(args: argparse.Namespace) -> int:
    """Run `toolpool top`; returns the exit status."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print("toolpool top needs rich: pip install 'toolpool[cli]'", file=sys.stderr)
        return 2
    url: str = args.url
    interval: float = max(0.1, float(args.interval))
    console = Console()
    if args.once:
        try:
            first = fetch(url)
            time.sleep(interval)
            second = fetch(url)
        except httpx.HTTPError as exc:
            console.print(f"[bold red]toolpool top: cannot scrape {url}: {exc}[/]")
            return 1
        console.print(render(rows(first, second), url=url, window=second.at - first.at))
        return 0
    previous: Scrape | None = None
    last_rows: list[Row] = []
    try:
        with Live(render([], url=url, window=None), console=console, auto_refresh=False) as live:
            while True:
                error = None
                window = None
                try:
                    current = fetch(url)
                    last_rows = rows(previous, current)
                    window = current.at - previous.at if previous is not None else None
                    previous = current
                except httpx.HTTPError as exc:
                    error = str(exc) or type(exc).__name__
                live.update(render(last_rows, url=url, window=window, error=error), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
