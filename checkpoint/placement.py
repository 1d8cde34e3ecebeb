"""Which holder stores which fragment of a rank's snapshot.

Fragment j (0 <= j < k+m) of a rank whose home holder is h goes to holder (h + j) mod n: with
n >= k+m holders the k+m fragments sit on k+m different nodes, so any m lost nodes leave k.
The home holder also keeps the rank's k data fragments, so a restarted trainer restores from
its own node without decoding or network traffic.
"""

from __future__ import annotations

import itertools


def assignment(home: int, holders: list[int], k: int, m: int) -> dict[int, list[int]]:
    """{holder index: fragment indices} for a rank homed on ``holders[home_pos]``-ish.

    ``holders`` lists the live holder indices in order; ``home`` is one of them (or any index,
    which is then mapped onto the list by position).
    """
    if not holders:
        raise ValueError("no live snapshot holders to place fragments on")
    pos = holders.index(home) if home in holders else home % len(holders)
    out: dict[int, set[int]] = {}
    for j in range(k + m):
        out.setdefault(holders[(pos + j) % len(holders)], set()).add(j)
    out.setdefault(holders[pos], set()).update(range(k))
    return {h: sorted(js) for h, js in out.items()}


def node_loss_tolerance(n_holders: int, k: int, m: int) -> int:
    """How many holders may be lost at once with every rank still decodable (worst case over homes)."""
    holders = list(range(n_holders))
    worst = n_holders
    for home in holders:
        place = assignment(home, holders, k, m)
        for lost in range(1, n_holders + 1):
            broken = False
            for gone in itertools.islice(itertools.combinations(holders, lost), 20000):
                survivors = set().union(*(place.get(h, []) for h in holders if h not in gone))
                if len(survivors) < k:
                    broken = True
                    break
            if broken:
                worst = min(worst, lost - 1)
                break
    return worst
