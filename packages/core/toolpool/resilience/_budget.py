"""The retry budget: retries may add at most `ratio` of the calls made in a sliding window,
plus a small floor, so that retries can never multiply the load on a failing destination.

Pure bookkeeping with no I/O and no clock of its own: every method takes `now` (a monotonic
clock reading). Not thread-safe by itself; the policy runtime calls it under its lock.

Theory of operation
-------------------
Time is cut into `buckets` equal slices of `window / buckets` seconds. Each slice counts the
calls (first attempts) and the retries that happened in it; the window is the current slice
and the `buckets - 1` before it, so counts leave the window a slice at a time. A retry is
granted when, after it, the window would hold

    retries <= ratio * calls + floor

and refused otherwise (the caller then returns the failure it already has). Over any span
shorter than `window - window / buckets`, the number of requests sent is therefore at most
`(1 + ratio) * calls + floor`, however many attempts each call is allowed.
"""

from __future__ import annotations

import math

__all__ = ["RetryBudget"]


class RetryBudget:
    """Counts calls and retries in a sliding window; `try_retry` spends budget if any is left.

    >>> budget = RetryBudget(ratio=0.2, floor=0, window=10.0)
    >>> for _ in range(10):
    ...     budget.record_call(now=0.0)
    >>> [budget.try_retry(now=0.0) for _ in range(3)]
    [True, True, False]
    """

    __slots__ = (
        "_calls",
        "_epoch",
        "_latest",
        "_retries",
        "_width",
        "buckets",
        "floor",
        "ratio",
        "window",
    )

    def __init__(self, ratio: float, floor: int, window: float, buckets: int = 10) -> None:
        if not ratio >= 0:
            raise ValueError(f"ratio must be >= 0, got {ratio!r}")
        if floor < 0:
            raise ValueError(f"floor must be >= 0, got {floor!r}")
        if not window > 0 or buckets < 1:
            raise ValueError("window must be > 0 seconds and buckets >= 1")
        self.ratio = ratio
        self.floor = floor
        self.window = window
        self.buckets = buckets
        self._width = window / buckets
        self._calls = [0] * buckets
        self._retries = [0] * buckets
        # The slice number (floor(now / width)) that each bucket currently counts.
        self._epoch = [-1] * buckets
        # Readings from several threads may arrive slightly out of order; time never runs
        # backwards here, so a late reading cannot recycle a newer bucket.
        self._latest = -math.inf

    def _slot(self, now: float) -> int:
        """The bucket of `now`, emptied first if it still counts an older slice."""
        now = self._latest = max(now, self._latest)
        epoch = math.floor(now / self._width)
        index = epoch % self.buckets
        if self._epoch[index] != epoch:
            self._epoch[index] = epoch
            self._calls[index] = 0
            self._retries[index] = 0
        return index

    def _totals(self, now: float) -> tuple[int, int]:
        """(calls, retries) in the window ending at `now`."""
        now = max(now, self._latest)
        oldest = math.floor(now / self._width) - self.buckets + 1
        calls = retries = 0
        for i in range(self.buckets):
            if self._epoch[i] >= oldest:
                calls += self._calls[i]
                retries += self._retries[i]
        return calls, retries

    def record_call(self, now: float) -> None:
        """A call (its first attempt) starts: it earns `ratio` of a retry."""
        self._calls[self._slot(now)] += 1

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the window allows it; False means: do not retry."""
        index = self._slot(now)
        calls, retries = self._totals(now)
        if retries + 1 > self.ratio * calls + self.floor:
            return False
        self._retries[index] += 1
        return True

    def available(self, now: float) -> float:
        """Retries the window would still grant now (may be fractional)."""
        self._slot(now)
        calls, retries = self._totals(now)
        return max(0.0, self.ratio * calls + self.floor - retries)
