"""Property tests of the eviction policy: furthest-next-use misses equal the offline optimum (exhaustive
search) on random traces, and prefetch never evicts a chunk needed before the one it fetches."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from trainmem.offload.params import NextUse, simulate

N_CHUNKS = 6


def optimal_misses(needs: list[tuple[int, ...]], capacity: int) -> int:
    """Fewest fetches over every eviction choice (demand paging; a moment's chunks resident together)."""

    @functools.lru_cache(maxsize=None)
    def best(t: int, resident: frozenset) -> int:
        if t == len(needs):
            return 0
        need = frozenset(needs[t])
        missing = need - resident
        keep_candidates = resident - need
        room = capacity - len(need)
        # any subset of the other resident chunks that fits next to this moment's needs may stay
        out = None
        items = sorted(keep_candidates)
        for mask in range(1 << len(items)):
            kept = frozenset(c for i, c in enumerate(items) if mask >> i & 1)
            if len(kept) > room or (len(resident) + len(missing) <= capacity and kept != keep_candidates):
                continue  # no eviction without need (optimal demand paging never needs one)
            cost = len(missing) + best(t + 1, need | kept)
            out = cost if out is None else min(out, cost)
        return out

    return best(0, frozenset())


traces = st.lists(st.lists(st.integers(0, N_CHUNKS - 1), min_size=1, max_size=2).map(lambda c: tuple(sorted(set(c)))),
                  min_size=1, max_size=14)


@settings(max_examples=150, deadline=None)
@given(needs=traces, capacity=st.integers(2, 4))
def test_furthest_next_use_is_optimal(needs, capacity):
    assert simulate(needs, capacity).misses == optimal_misses(needs, capacity)


@settings(max_examples=150, deadline=None)
@given(needs=traces, capacity=st.integers(2, 4))
def test_lru_is_never_better_than_belady(needs, capacity):
    assert simulate(needs, capacity, lru=True).misses >= simulate(needs, capacity).misses


@settings(max_examples=200, deadline=None)
@given(needs=traces, capacity=st.integers(2, 4), depth=st.integers(1, 3))
def test_prefetch_never_evicts_a_chunk_needed_sooner(needs, capacity, depth):
    result = simulate(needs, capacity, prefetch=depth)
    nxt = NextUse(needs)  # recomputed here from the raw sequence, not the policy's own table
    for t, victim, fetched, why in result.evictions:
        if why == "prefetch":
            assert nxt.after(victim, t) > nxt.after(fetched, t), (t, victim, fetched)
    # every demanded chunk was resident when its moment ran: replay and check
    resident: set[int] = set()
    fetch_at: dict[int, list] = {}
    for t, c, _ in result.fetches:
        fetch_at.setdefault(t, []).append(c)
    evict_at: dict[int, list] = {}
    for t, v, _, why in result.evictions:
        evict_at.setdefault(t, []).append((v, why))
    for t, need in enumerate(needs):
        demand_evicts = [v for v, why in evict_at.get(t, []) if why == "demand"]
        resident -= set(demand_evicts)
        resident |= set(need)
        assert set(need) <= resident and len(resident) <= capacity
        resident -= {v for v, why in evict_at.get(t, []) if why == "prefetch"}
        resident |= {c for c in fetch_at.get(t, []) if c not in need}
        assert len(resident) <= capacity
