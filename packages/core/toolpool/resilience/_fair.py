"""Who is served next when several tenants wait: one FIFO per tenant, least-served first.

Theory of operation
-------------------
Waiting items (calls waiting for admission, tool calls waiting for a slot) are kept in one
FIFO per tenant. Every place handed out, at once or from the queue, counts one unit of
*service* for its tenant. The next item served is the oldest of the waiting tenant that has
had the least service; ties go to the tenant that has waited longest for its turn (so equal
tenants alternate, round-robin).

Plain round-robin is not enough under a burst: the places a gate hands out before anyone
waits go in arrival order, so the tenant that arrives first holds all of them, and
round-robin afterwards keeps that lead to the end of the burst (measured: a first tenant
finishing its 25 calls in 0.3 s while three others took 0.5-0.9 s). Counting service lets the
tenants that arrived a little later catch up with that lead first.

The lead a newcomer may catch up with is bounded by `allowance` (the caller passes its
capacity): a tenant that starts waiting is credited with at least the most-served tenant's
service minus `allowance`. So a tenant that had been quiet for an hour gets at most one
capacity's worth of precedence over the tenants that kept the destination busy, never an
hour's; a light tenant's single call is served within one turn of arriving.

The counts start afresh whenever the owner goes idle (`reset`, nothing admitted and nothing
waiting), and tenants far behind the leader are forgotten (they would be credited up to the
floor anyway), so memory stays bounded by the tenants active together.

Not thread-safe by itself: owners call it under their own lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")

# Forget tenants at or below the floor once more than this many are remembered.
_PRUNE_AT = 1024


class FairQueue(Generic[T]):
    """Per-tenant FIFOs, served least-served tenant first (ties: longest since its turn).

    ```python
    fair: FairQueue[str] = FairQueue()
    fair.note_served("acme", allowance=10)        # a place handed out at once
    fair.push("acme", "call-2", allowance=10)
    fair.push("globex", "call-1", allowance=10)
    assert fair.pop() == ("globex", "call-1")     # globex has had less service
    ```
    """

    __slots__ = ("_entry", "_heap", "_queues", "_seq", "_served", "_top")

    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[T]] = {}
        # (service when queued for its turn, tie-breaker, tenant): one live entry per tenant
        # that has a queue (`_entry` holds its tie-breaker; others are stale and skipped). A
        # tenant's service changes only when it is popped, so live entries stay true.
        self._heap: list[tuple[int, int, Hashable]] = []
        self._entry: dict[Hashable, int] = {}
        self._served: dict[Hashable, int] = {}
        self._top = 0
        self._seq = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._queues)

    def served(self, tenant: Hashable) -> int:
        """The service `tenant` has had in this busy period (for tests and stats)."""
        return self._served.get(tenant, 0)

    def _credit(self, tenant: Hashable, allowance: int) -> int:
        """`tenant`'s service, raised to the floor (the leader's less `allowance`)."""
        base = max(self._served.get(tenant, 0), self._top - max(0, allowance))
        self._served[tenant] = base
        return base

    def _count(self, tenant: Hashable, base: int) -> None:
        served = self._served[tenant] = base + 1
        if served > self._top:
            self._top = served

    def note_served(self, tenant: Hashable, allowance: int) -> None:
        """A place went to `tenant` without waiting."""
        self._count(tenant, self._credit(tenant, allowance))
        if len(self._served) > _PRUNE_AT:
            self._prune(allowance)

    def push(self, tenant: Hashable, item: T, allowance: int) -> None:
        """Queue `item` at the back of `tenant`'s FIFO."""
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
            self._enter(tenant, self._credit(tenant, allowance))
        queue.append(item)

    def _enter(self, tenant: Hashable, served: int) -> None:
        seq = self._entry[tenant] = next(self._seq)
        heapq.heappush(self._heap, (served, seq, tenant))

    def _leave(self, tenant: Hashable) -> None:
        del self._queues[tenant]
        del self._entry[tenant]

    def peek(self, alive: Callable[[T], bool] | None = None) -> T | None:
        """The item served next (dropping items for which `alive` is False), or None."""
        heap, queues = self._heap, self._queues
        while heap:
            _, seq, tenant = heap[0]
            if self._entry.get(tenant) != seq:
                heapq.heappop(heap)  # stale: the tenant left the queue since
                continue
            queue = queues[tenant]
            if alive is not None:
                while queue and not alive(queue[0]):
                    queue.popleft()
            if queue:
                return queue[0]
            heapq.heappop(heap)
            self._leave(tenant)
        return None

    def pop(self, alive: Callable[[T], bool] | None = None) -> tuple[Hashable, T] | None:
        """Take the item served next and count its tenant's service; None if none waits."""
        if self.peek(alive) is None:
            return None
        _, _, tenant = heapq.heappop(self._heap)
        queue = self._queues[tenant]
        item = queue.popleft()
        self._count(tenant, self._served[tenant])
        if queue:
            self._enter(tenant, self._served[tenant])
        else:
            self._leave(tenant)
        return tenant, item

    def remove(self, tenant: Hashable, item: T) -> None:
        """Take a waiting item out (it gave up); O(its tenant's queue)."""
        queue = self._queues.get(tenant)
        if queue is None:
            return
        try:
            queue.remove(item)
        except ValueError:
            return
        if not queue:
            self._leave(tenant)  # its heap entry goes stale

    def compact(self, tenant: Hashable, alive: Callable[[T], bool]) -> None:
        """Drop `tenant`'s items for which `alive` is False (items that gave up and are
        dropped lazily otherwise, when they reach the head)."""
        queue = self._queues.get(tenant)
        if queue is None:
            return
        live = deque(item for item in queue if alive(item))
        if live:
            self._queues[tenant] = live
        else:
            self._leave(tenant)

    def queued(self, tenant: Hashable) -> int:
        """Items in `tenant`'s FIFO (including any that gave up and wait to be dropped)."""
        queue = self._queues.get(tenant)
        return len(queue) if queue is not None else 0

    def items(self) -> list[T]:
        """Every queued item, tenant by tenant."""
        return [item for queue in self._queues.values() for item in queue]

    def clear(self) -> None:
        """Drop every queued item (the counts of service stay)."""
        self._queues.clear()
        self._entry.clear()
        self._heap.clear()

    def reset(self) -> None:
        """The owner went idle (nothing admitted, nothing alive waiting): drop what is queued
        and forget the counts of service."""
        self.clear()
        self._served.clear()
        self._top = 0

    def _prune(self, allowance: int) -> None:
        floor = self._top - max(0, allowance)
        self._served = {t: s for t, s in self._served.items() if s > floor or t in self._queues}
