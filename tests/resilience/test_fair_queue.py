"""`FairQueue`, the order in which waiting tenants are served (no I/O): equal tenants
alternate, tenants that arrived a little late catch up with the places the first one took
before anyone waited, that catch-up is bounded by the allowance, and a quiet tenant's single
call is served next."""

from __future__ import annotations

from toolpool.resilience._admission_rules import AdmissionQueue, AdmitWaiter
from toolpool.resilience._fair import FairQueue


def _drain(fair: FairQueue[str]) -> list[str]:
    out = []
    while (popped := fair.pop()) is not None:
        out.append(popped[1])
    return out


def test_equal_tenants_alternate_fifo_within_each() -> None:
    fair: FairQueue[str] = FairQueue()
    for i in range(3):
        fair.push("a", f"a{i}", allowance=10)
    for i in range(3):
        fair.push("b", f"b{i}", allowance=10)
    assert _drain(fair) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert not fair


def test_late_tenants_catch_up_with_the_first_ones_head_start() -> None:
    fair: FairQueue[str] = FairQueue()
    for _ in range(2):
        fair.note_served("a", allowance=2)  # 'a' took both places before anyone waited
    for tenant in "abc":
        for i in range(4):
            fair.push(tenant, f"{tenant}{i}", allowance=2)
    # b and c get the next places until they had as many as a, then all three alternate.
    order = _drain(fair)
    assert order == ["b0", "c0", "b1", "c1", "a0", "b2", "c2", "a1", "b3", "c3", "a2", "a3"]
    assert [fair.served(t) for t in "abc"] == [6, 4, 4]


def test_catch_up_is_bounded_by_the_allowance() -> None:
    fair: FairQueue[str] = FairQueue()
    for _ in range(100):
        fair.note_served("a", allowance=3)  # a long busy period of one tenant
    fair.push("a", "a0", allowance=3)
    fair.push("a", "a1", allowance=3)
    for i in range(5):
        fair.push("b", f"b{i}", allowance=3)
    # b starts 3 behind a (not 100): 3 places first, then the two alternate.
    assert _drain(fair) == ["b0", "b1", "b2", "a0", "b3", "a1", "b4"]


def test_a_single_call_of_a_quiet_tenant_is_served_next() -> None:
    fair: FairQueue[str] = FairQueue()
    for i in range(50):
        fair.push("heavy", f"h{i}", allowance=5)
    for _ in range(20):
        fair.pop()
    fair.push("light", "l0", allowance=5)
    assert fair.pop() == ("light", "l0")


def test_removed_items_and_reset() -> None:
    fair: FairQueue[str] = FairQueue()
    fair.push("a", "a0", allowance=1)
    fair.remove("a", "a0")
    assert not fair and fair.pop() is None
    fair.push("a", "a1", allowance=1)  # the stale turn of 'a' is skipped, not doubled
    fair.push("b", "b0", allowance=1)
    assert _drain(fair) == ["a1", "b0"]
    assert fair.served("a") == 1
    fair.reset()
    assert fair.served("a") == 0 and fair.served("b") == 0


def test_strict_waiters_wait_for_room_under_the_limit_and_nobody_jumps_them() -> None:
    queue = AdmissionQueue()
    strict = AdmitWaiter(tenant="a", strict=True)
    plain = AdmitWaiter(tenant="b")
    queue.enqueue(strict, allowance=1)
    queue.enqueue(plain, allowance=1)
    # Queue places left (room 3) but none under the limit: the strict head waits, and the
    # plain waiter behind it does not pass it.
    assert queue.grant(room=3, strict_room=0) == []
    assert queue.grant(room=3, strict_room=1) == [strict, plain]
    assert queue.waiting == 0 and queue.admitted == 2
    queue.leave()
    queue.leave()
    assert queue.served("a") == 0  # idle: the counts start afresh
