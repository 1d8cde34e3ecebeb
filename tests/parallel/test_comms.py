"""Point-to-point order: both ranks of every pair post the messages they exchange in the same order
(NCCL matches by posting order, not by tag), over the order the executor really posts."""

from __future__ import annotations

import pytest

from trainmem.parallel import (SCHEDULE_NAMES, Kind, ScheduleError, comm_plan, executable, make_schedule,
                               validate, with_offload)


def _cases(name):
    for p in range(2, 9):
        for m in sorted({p, 2 * p, 2 * p + 1}):
            try:
                sched = make_schedule(name, p, m)
            except ValueError:  # interleaved needs m % p == 0
                continue
            yield p, m, sched
            if p <= 4:
                yield p, m, with_offload(sched)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_each_rank_sends_to_a_peer_in_the_order_the_peer_receives(name):
    checked = 0
    for p, m, sched in _cases(name):
        plan = comm_plan(executable(sched))
        for a in range(p):
            for b in range(p):
                if a == b:
                    continue
                sends = [x.message for x in plan[a] if x.op == "send" and x.peer == b]
                recvs = [x.message for x in plan[b] if x.op == "recv" and x.peer == a]
                assert sends == recvs, f"{name} p={p} m={m}: rank {a} -> rank {b}"
                # both directions of a pair share one NCCL stream: the interleaving must agree too
                mine = [(x.op == "send", x.message) for x in plan[a] if x.peer == b]
                theirs = [(x.op == "recv", x.message) for x in plan[b] if x.peer == a]
                assert mine == theirs, f"{name} p={p} m={m}: ranks {a} and {b} interleave differently"
                checked += len(sends)
    assert checked > 0


def test_every_message_is_posted_once_on_each_side():
    sched = executable(make_schedule("zb-v", 4, 8))
    plan = comm_plan(sched)
    sends = sorted((x.message.data.value, x.message.src, x.message.mb) for row in plan for x in row if x.op == "send")
    recvs = sorted((x.message.data.value, x.message.src, x.message.mb) for row in plan for x in row if x.op == "recv")
    assert sends == recvs and len(sends) == len(set(sends))
    # V placement, 8 stages: 7 activation and 7 gradient boundaries cross ranks except the turn at rank 3
    assert len(sends) == 8 * (7 - 1) * 2


def test_validator_rejects_a_receive_order_the_sender_does_not_use():
    sched = executable(make_schedule("gpipe", 2, 2))
    row = list(sched.ranks[1])
    late = next(i for i, a in enumerate(row) if a.kind is Kind.RECV_F and a.mb == 1)
    row.insert(0, row.pop(late))  # receive mb 1 before mb 0: dependencies still hold, the order does not
    broken = sched.with_ranks([sched.ranks[0], row])
    with pytest.raises(ScheduleError, match=r"ranks 0 and 1 post their point-to-point operations in different orders"):
        validate(broken)
