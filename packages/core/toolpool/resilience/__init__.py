"""toolpool.resilience: retries with a budget, circuit breakers, rate limits, an adaptive
connection limit, and the admission API that tells agent frameworks to slow down.

Every pool runs `Policy()` on each destination unless told otherwise:

```python
import toolpool
from toolpool.resilience import AdaptiveLimit, Policy, RateLimit

pool = toolpool.Pool(
    [
        toolpool.Destination("crm", "https://crm.internal", documented_limit=100,
                             policy=Policy(rate_limit=RateLimit(rate=50, per_tenant=True))),
        toolpool.Destination("search", "https://search.internal"),   # the pool's policy
    ],
    policy=Policy(adaptive=AdaptiveLimit(latency_tolerance=2.0)),    # pool-wide default
)

async with pool.admit("crm"):              # waits while 'crm' is saturated, or raises
    r = await pool.client().get("https://crm.internal/contacts")   # PoolSaturated

pool.on_saturation(lambda s: print(s.destination, s.state, s.retry_after))
pool.destination("crm").policy.stats()     # retries, breaker, limit, rejections
```

`Policy.off()` keeps admission and turns every other piece off; `Pool(policy=None)` runs
destinations without a resilience layer.
"""

from __future__ import annotations

from toolpool.resilience._adaptive import AdaptiveLimit
from toolpool.resilience._admission_control import AsyncAdmission, SyncAdmission
from toolpool.resilience._admission_rules import Saturation
from toolpool.resilience._breaker import CircuitBreaker
from toolpool.resilience._layer import PolicyRuntime
from toolpool.resilience._policy import DEFAULT_POLICY, Policy
from toolpool.resilience._ratelimit import RateLimit
from toolpool.resilience._retry import Retry
from toolpool.resilience._stats import PolicyStats

__all__ = [
    "DEFAULT_POLICY",
    "AdaptiveLimit",
    "AsyncAdmission",
    "CircuitBreaker",
    "Policy",
    "PolicyRuntime",
    "PolicyStats",
    "RateLimit",
    "Retry",
    "Saturation",
    "SyncAdmission",
]
