"""The warm-up trace and the eviction policy that reads it (pure data; property-tested).

A *moment* is one point of the step where chunks must be resident: before an operator's forward
(``("F", op)``) and when backward unpacks a tensor saved from a chunk (``("U", chunk)``, PatrickStar's
metronome ticks). The trace records each moment's key, the chunks it needs and the gradient
chunks open at that point. In steady state, :class:`Policy` evicts the resident chunk whose next
use lies furthest in the future (Belady's MIN, which is optimal for demand fetching) and
prefetches upcoming chunks only by evicting one needed later than the chunk fetched. When the
observed moments stop matching the trace the engine switches the policy to LRU and records anew.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

NEVER = float("inf")


@dataclass(frozen=True)
class Moment:
    key: tuple
    needs: tuple[int, ...]
    grads_open: int = 0


@dataclass
class Trace:
    moments: list[Moment] = field(default_factory=list)

    def add(self, key: tuple, needs, grads_open: int = 0) -> None:
        self.moments.append(Moment(key, tuple(sorted(set(needs))), grads_open))

    def __len__(self) -> int:
        return len(self.moments)

    def needs(self) -> list[tuple[int, ...]]:
        return [m.needs for m in self.moments]

    def max_grads_open(self) -> int:
        return max((m.grads_open for m in self.moments), default=0)


class NextUse:
    """For each chunk, the sorted moments that need it: next use after t in O(log n)."""

    def __init__(self, needs: list[tuple[int, ...]]):
        self.at: dict[int, list[int]] = {}
        for t, chunks in enumerate(needs):
            for c in chunks:
                self.at.setdefault(c, []).append(t)

    def after(self, chunk: int, t: int) -> float:
        """The first moment > t that needs ``chunk`` (NEVER if none)."""
        times = self.at.get(chunk)
        if not times:
            return NEVER
        i = bisect.bisect_right(times, t)
        return times[i] if i < len(times) else NEVER


class Policy:
    """Furthest-next-use over a trace, or LRU when there is none (warm-up, or after the order changed)."""

    def __init__(self, trace: Trace | None):
        self.trace = trace
        self.next_use = NextUse(trace.needs()) if trace is not None else None
        self.last_used: dict[int, int] = {}
        self.clock = 0

    @property
    def belady(self) -> bool:
        return self.next_use is not None

    def fall_back_to_lru(self) -> None:
        self.next_use = None

    def touch(self, chunks, t: int) -> None:
        self.clock += 1
        for c in chunks:
            self.last_used[c] = self.clock

    def victim(self, resident, pinned: set[int], t: int) -> int | None:
        """The chunk to evict at moment t (never a pinned one); None if every resident chunk is pinned."""
        movable = [c for c in resident if c not in pinned]
        if not movable:
            return None
        if self.next_use is not None:
            return max(movable, key=lambda c: (self.next_use.after(c, t), -c))
        return min(movable, key=lambda c: (self.last_used.get(c, -1), c))

    def prefetch_plan(self, t: int, depth: int) -> list[int]:
        """Chunks the next ``depth`` moments need, soonest first (no duplicates)."""
        if self.trace is None or self.next_use is None:
            return []
        out: list[int] = []
        for m in self.trace.moments[t + 1: t + 1 + depth]:
            out.extend(c for c in m.needs if c not in out)
        return out


@dataclass
class SimResult:
    misses: int
    fetches: list[tuple[int, int, str]]  # (moment, chunk, "demand" | "prefetch")
    evictions: list[tuple[int, int, int, str]]  # (moment, victim, for chunk, "demand" | "prefetch")


def simulate(needs: list[tuple[int, ...]], capacity: int, *, prefetch: int = 0, lru: bool = False,
             pin_previous: bool = False) -> SimResult:
    """Run the policy over a need sequence with ``capacity`` slots; count fetches (misses).

    ``pin_previous`` keeps the previous moment's chunks as well (the engine does so in backward, where
    an autograd node may still read the tensors it unpacked a moment before).
    """
    trace = Trace([Moment(("m", t), tuple(sorted(set(n)))) for t, n in enumerate(needs)])
    policy = Policy(None if lru else trace)
    resident: set[int] = set()
    result = SimResult(0, [], [])
    for t, moment in enumerate(trace.moments):
        pinned = set(moment.needs) | (set(needs[t - 1]) if pin_previous and t else set())
        if len(set(moment.needs)) > capacity:
            raise ValueError(f"moment {t} needs {len(moment.needs)} chunks but capacity is {capacity}")
        for c in moment.needs:
            if c in resident:
                continue
            if len(resident) >= capacity:
                v = policy.victim(resident, pinned, t)
                if v is None:
                    raise ValueError(f"moment {t}: every slot is pinned")
                resident.discard(v)
                result.evictions.append((t, v, c, "demand"))
            resident.add(c)
            result.misses += 1
            result.fetches.append((t, c, "demand"))
        policy.touch(moment.needs, t)
        for c in policy.prefetch_plan(t, prefetch):
            if c in resident:
                continue
            if len(resident) < capacity:
                resident.add(c)
            else:
                v = policy.victim(resident, pinned | set(moment.needs), t)
                if v is None or policy.next_use.after(v, t) <= policy.next_use.after(c, t):
                    break  # never evict a chunk needed before the one fetched
                resident.discard(v)
                result.evictions.append((t, v, c, "prefetch"))
                resident.add(c)
            result.misses += 1
            result.fetches.append((t, c, "prefetch"))
    return result


def min_slots(trace: Trace, *, pin_previous_in_backward: bool = True, reduce_buffer: int = 0) -> int:
    """The fewest arena slots that can run this trace: pinned chunks plus open gradient chunks (plus the
    reduce buffer a data-parallel gradient close needs), at the worst moment."""
    worst = 0
    prev: tuple[int, ...] = ()
    for m in trace.moments:
        pinned = set(m.needs) | (set(prev) if pin_previous_in_backward and m.key[0] == "U" else set())
        worst = max(worst, len(pinned) + m.grads_open + (reduce_buffer if m.grads_open else 0))
        prev = m.needs
    return max(worst, 1)
