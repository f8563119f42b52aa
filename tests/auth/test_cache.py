"""The token cache's rules (auth/_cache.py), driven directly with explicit clock readings:
no I/O, so every decision can be checked exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from toolpool.auth import Credential, TokenPolicy
from toolpool.auth._cache import FAIL, LEAD, REFRESH, USE, WAIT, Cached, TokenCache

POLICY = TokenPolicy(negative_ttl=5.0)


def fetched(cache: TokenCache, key: str, now: float, expires_in: float | None = 100.0) -> Cached:
    decision = cache.lookup(key, now)
    assert decision.kind == LEAD
    cached = Cached(Credential(f"v-{now}", expires_in=expires_in), now, cache.policy)
    cache.finish(decision.flight, now + 0.1, cached=cached)
    return cached


def test_first_lookup_leads_and_concurrent_ones_wait():
    cache = TokenCache(POLICY)
    lead = cache.lookup("a", 0.0)
    assert lead.kind == LEAD
    assert lead.flight.reason == "initial"
    waits = [cache.lookup("a", 0.01) for _ in range(5)]
    assert {w.kind for w in waits} == {WAIT}
    assert {id(w.flight) for w in waits} == {id(lead.flight)}
    # Another context is independent: it leads its own fetch at the same time.
    assert cache.lookup("b", 0.01).kind == LEAD
    woken: list[int] = []
    for i in range(5):
        lead.flight.add_waiter(lambda i=i: woken.append(i))
    cached = Cached(Credential("v"), 0.0, POLICY)
    for wake in cache.finish(lead.flight, 0.2, cached=cached):
        wake()
    assert woken == [0, 1, 2, 3, 4]
    assert cache.lookup("a", 0.3) == (USE, cached, None, None, 0.0)


def test_refresh_point_then_one_background_refresh_then_expiry():
    cache = TokenCache(POLICY)
    cached = fetched(cache, "a", 0.0, expires_in=100.0)  # refresh at 70 s (30 s margin)
    assert cached.refresh_at == 70.0
    assert cached.expires_at == 100.0
    assert cache.lookup("a", 69.9).kind == USE
    refresh = cache.lookup("a", 70.0)
    assert refresh.kind == REFRESH
    assert refresh.cached is cached  # the old credential serves this request
    assert refresh.flight.reason == "expiry"
    # While the refresh runs, others keep using the old credential: nobody waits.
    assert cache.lookup("a", 80.0) == (USE, cached, None, None, 0.0)
    # If the refresh is still running at expiry, requests wait for it.
    assert cache.lookup("a", 100.0).kind == WAIT


def test_a_failed_background_refresh_keeps_the_old_credential_until_expiry():
    cache = TokenCache(POLICY)
    cached = fetched(cache, "a", 0.0, expires_in=100.0)
    refresh = cache.lookup("a", 71.0)
    cache.finish(refresh.flight, 72.0, failure="the token endpoint answered 503")
    assert cache.lookup("a", 73.0).kind == USE  # held: no new refresh for 5 s
    assert cache.lookup("a", 77.5).kind == REFRESH  # the hold is over
    assert cache.counters.failures_total == 1
    del cached


def test_failures_are_held_for_negative_ttl_and_retry_after():
    cache = TokenCache(POLICY)
    lead = cache.lookup("a", 0.0)
    cache.finish(lead.flight, 1.0, failure="the token endpoint answered 401 (invalid_client)")
    held = cache.lookup("a", 3.0)
    assert held.kind == FAIL
    assert held.failure == "the token endpoint answered 401 (invalid_client)"
    assert held.retry_in == 3.0
    assert cache.lookup("a", 6.0).kind == LEAD
    # A Retry-After longer than the hold extends it.
    again = cache.lookup("b", 0.0)
    cache.finish(again.flight, 0.0, failure="429", retry_after=20.0)
    assert cache.lookup("b", 19.0).kind == FAIL
    assert cache.counters.negative_hits_total == 2


def test_401_drops_only_the_rejected_credential():
    cache = TokenCache(POLICY)
    old = fetched(cache, "a", 0.0)
    # A 401 for the current credential: fetch again, reason "401".
    lead = cache.rejected("a", old, 1.0)
    assert lead.kind == LEAD
    assert lead.flight.reason == "401"
    new = Cached(Credential("new", expires_in=100.0), 1.0, POLICY)
    cache.finish(lead.flight, 1.1, cached=new)
    # A late 401 for the old credential (sent before the refresh) keeps the new one.
    assert cache.rejected("a", old, 1.2) == (USE, new, None, None, 0.0)
    assert cache.counters.refreshes_total == {"initial": 1, "expiry": 0, "401": 1}


def test_abandoned_flight_lets_a_waiter_lead_again():
    cache = TokenCache(POLICY)
    lead = cache.lookup("a", 0.0)
    assert cache.lookup("a", 0.0).kind == WAIT
    cache.finish(lead.flight, 0.5)  # the leader was cancelled
    assert lead.flight.done
    assert lead.flight.cached is None
    assert lead.flight.failure is None
    assert cache.lookup("a", 0.6).kind == LEAD
    assert cache.counters.abandoned_total == 1


def test_credentials_without_expiry_are_never_refreshed():
    cache = TokenCache(POLICY)
    cached = fetched(cache, "a", 0.0, expires_in=None)
    assert cache.lookup("a", 10**9) == (USE, cached, None, None, 0.0)


def test_the_number_of_cached_contexts_is_bounded():
    cache = TokenCache(TokenPolicy(max_contexts=100))
    for i in range(1000):
        fetched(cache, f"k{i}", float(i), expires_in=10.0)
        assert len(cache.entries) <= 100
    # A fetch under way is never dropped.
    lead = cache.lookup("busy", 2000.0)
    for i in range(200):
        fetched(cache, f"m{i}", 2000.0)
    assert cache.entries["busy"].flight is lead.flight


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(["lookup", "ok", "fail", "cancel", "reject"]),
            st.floats(0.0, 50.0),
        ),
        max_size=60,
    )
)
def test_single_flight_invariants(steps):
    """Whatever happens, a context has at most one fetch under way, a request never gets an
    expired credential, and a context is only held while its failure is recent."""
    cache = TokenCache(TokenPolicy(negative_ttl=3.0))
    now = 0.0
    running: dict[str, object] = {}
    for key, action, dt in steps:
        now += dt
        if action == "lookup":
            d = cache.lookup(key, now)
            if d.kind in (USE, REFRESH):
                assert now < d.cached.expires_at
            if d.kind in (LEAD, REFRESH):
                assert key not in running
                running[key] = d.flight
            if d.kind == WAIT:
                assert running[key] is d.flight
            if d.kind == FAIL:
                assert 0 < d.retry_in <= 3.0
        elif action == "reject":
            entry = cache.entries.get(key)
            if entry is not None and entry.cached is not None:
                d = cache.rejected(key, entry.cached, now)
                assert d.kind != USE or d.cached is not entry.cached
                if d.kind == LEAD:
                    assert key not in running
                    running[key] = d.flight
        elif key in running:
            flight = running.pop(key)
            if action == "ok":
                cached = Cached(Credential("v", expires_in=20.0), now, cache.policy)
                cache.finish(flight, now, cached=cached)  # type: ignore[arg-type]
            elif action == "fail":
                cache.finish(flight, now, failure="x")  # type: ignore[arg-type]
            else:
                cache.finish(flight, now)  # type: ignore[arg-type]
        for k, entry in cache.entries.items():
            assert (entry.flight is not None) == (k in running)
