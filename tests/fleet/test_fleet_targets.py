"""The lease script's targets, run on a real Redis: computed from every live member's demand at
once, they always add up to exactly the cap (work-conserving), the same whichever member asks,
and a member grows only from capacity no record holds."""

from __future__ import annotations

import pytest
import redis

from tests._support.redis_fleet import RedisServer
from toolpool.fleet._leases import RENEW

KEYS = ["t:records", "t:demand", "t:expiry", "t:alive", "t:grace"]
TTL_MS = 60_000


def renew(r: redis.Redis, member: str, claim: int, demand: int, cap: int) -> dict[str, int]:
    out = r.eval(RENEW, len(KEYS), *KEYS, member, claim, demand, cap, TTL_MS, 1)
    new, count, others, grace, target, record = (int(x) for x in out)
    return {"new": new, "count": count, "others": others, "grace": grace,
            "target": target, "record": record}  # fmt: skip


def targets(r: redis.Redis, demands: dict[str, int], cap: int) -> dict[str, int]:
    """Register every member with a claim of 0, then ask each for its target."""
    for name, d in demands.items():
        renew(r, name, 0, d, cap)
    return {name: renew(r, name, 0, d, cap)["target"] for name, d in demands.items()}


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    client = redis_server.client()
    client.set("t:alive", "1", px=TTL_MS)  # no grace period: a fleet already running
    return client


@pytest.mark.parametrize(
    ("demands", "cap", "expected"),
    [
        # equal demand beyond the cap: the whole cap, the remainder by name
        ({"a": 12, "b": 12, "c": 12}, 10, {"a": 4, "b": 3, "c": 3}),
        # 80/10/10: in proportion to demand
        ({"a": 32, "b": 4, "c": 4}, 12, {"a": 10, "b": 1, "c": 1}),
        # an idle member gets nothing while the others want more than the cap
        ({"a": 12, "b": 12, "c": 12, "d": 0}, 10, {"a": 4, "b": 3, "c": 3, "d": 0}),
        # a small demand still gets one permit (taken from the largest share)
        ({"a": 100, "b": 1}, 10, {"a": 9, "b": 1}),
        # demand below the cap: each its demand, one per idle member, the rest by demand
        ({"a": 5, "b": 0, "c": 0}, 12, {"a": 10, "b": 1, "c": 1}),
        ({"a": 2, "b": 2, "c": 0}, 12, {"a": 6, "b": 5, "c": 1}),
        # nobody busy: equal split
        ({"a": 0, "b": 0, "c": 0}, 12, {"a": 4, "b": 4, "c": 4}),
        # more members than permits
        ({"a": 0, "b": 0, "c": 0, "d": 0}, 2, {"a": 1, "b": 1, "c": 0, "d": 0}),
        ({"a": 3, "b": 2, "c": 1}, 2, {"a": 1, "b": 1, "c": 0}),
    ],
)
def test_targets_split_exactly_the_cap_by_demand(
    r: redis.Redis, demands: dict[str, int], cap: int, expected: dict[str, int]
) -> None:
    got = targets(r, demands, cap)
    assert got == expected
    assert sum(got.values()) == cap


def test_a_member_grows_only_from_capacity_no_record_holds(r: redis.Redis) -> None:
    cap = 10
    # a alone, using 8: its demand, plus what is left (nobody else wants it)
    a = renew(r, "a", 8, 8, cap)
    assert (a["target"], a["new"], a["record"]) == (10, 10, 10)
    # b arrives with the same demand: its target is 5, but a's record holds the whole cap
    b = renew(r, "b", 0, 8, cap)
    assert (b["target"], b["new"], b["others"]) == (5, 0, 10)
    # a is told to shrink to 5; its record stays at its claim (its lease of 10) meanwhile
    a = renew(r, "a", 10, 8, cap)
    assert (a["target"], a["new"], a["record"]) == (5, 5, 10)
    assert renew(r, "b", 0, 8, cap)["new"] == 0
    # a still uses 8: b gets the 2 nobody holds
    assert renew(r, "a", 8, 8, cap)["record"] == 8
    b = renew(r, "b", 0, 8, cap)
    assert (b["new"], b["record"]) == (2, 2)
    # a's use came down to its lease: b takes the rest
    assert renew(r, "a", 5, 8, cap)["record"] == 5
    b = renew(r, "b", 2, 8, cap)
    assert (b["new"], b["record"]) == (5, 5)
    records = {k.decode(): int(v) for k, v in r.hgetall("t:records").items()}
    assert records == {"a": 5, "b": 5}


def test_a_dead_members_record_is_dropped_and_its_share_goes_to_the_others(
    r: redis.Redis,
) -> None:
    cap = 9
    for name in "abc":
        renew(r, name, 0, 9, cap)
    got = {name: renew(r, name, 0, 9, cap)["new"] for name in "abc"}
    assert got == {"a": 3, "b": 3, "c": 3}
    r.zadd("t:expiry", {"c": 0})  # c's record is past its expiry (c stopped renewing)
    a = renew(r, "a", 3, 9, cap)
    assert (a["count"], a["target"], a["new"]) == (2, 5, 5)
    b = renew(r, "b", 3, 9, cap)
    assert (b["target"], b["new"]) == (4, 4)
    assert r.hget("t:records", "c") is None and r.hget("t:demand", "c") is None
