"""How evenly a burst served its tenants, from when each tenant's calls finished.

`tenant_fairness({"acme": [0.31, 0.52, ...], "globex": [...]})` takes each tenant's finish
times (seconds, any common origin) and reports:

- `p99` per tenant and `p99_ratio` (largest / smallest): the timing view, which moves with
  the machine's load;
- `last_rank` per tenant (the position of its last finished call among all calls, 1-based)
  and `rank_ratio` (largest / smallest): the same question asked of the order of
  completions, which does not depend on how fast the machine is. When one tenant's burst
  is served before the others, its last call finishes early (25th of 100) and the ratio
  is large (4); served in turn, every tenant finishes near the end and it stays near 1;
- `max_lead`: the most calls by which one tenant was ever ahead of another while the burst
  was being served (at any point of the completion order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["TenantFairness", "tenant_fairness"]


@dataclass(frozen=True)
class TenantFairness:
    """See the module docstring."""

    p99: dict[str, float]
    p99_ratio: float
    last_rank: dict[str, int]
    rank_ratio: float
    max_lead: int

    def __str__(self) -> str:
        p99 = ", ".join(f"{t} {v:.3f}" for t, v in sorted(self.p99.items()))
        ranks = ", ".join(f"{t} {v}" for t, v in sorted(self.last_rank.items()))
        return (
            f"p99 s: {p99} (max/min {self.p99_ratio:.2f}); last call's rank: {ranks} "
            f"(max/min {self.rank_ratio:.2f}); max lead {self.max_lead}"
        )


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def tenant_fairness(finished: Mapping[str, Sequence[float]]) -> TenantFairness:
    """Fairness figures of one burst from each tenant's finish times (see module doc)."""
    if not finished or any(not v for v in finished.values()):
        raise ValueError("tenant_fairness needs at least one finish time per tenant")
    p99 = {t: _p99(v) for t, v in finished.items()}
    completions = sorted((time, tenant) for tenant, times in finished.items() for time in times)
    counts = dict.fromkeys(finished, 0)
    last_rank: dict[str, int] = {}
    max_lead = 0
    for rank, (_, tenant) in enumerate(completions, start=1):
        counts[tenant] += 1
        last_rank[tenant] = rank
        # Leads only count while every tenant still has calls to finish.
        if all(counts[t] < len(finished[t]) for t in finished if t != tenant):
            max_lead = max(max_lead, max(counts.values()) - min(counts.values()))
    return TenantFairness(
        p99=p99,
        p99_ratio=max(p99.values()) / max(1e-9, min(p99.values())),
        last_rank=last_rank,
        rank_ratio=max(last_rank.values()) / min(last_rank.values()),
        max_lead=max_lead,
    )
