"""Where a schedule's point-to-point operations go, and the order each rank posts them in.

NCCL matches the sends and receives between two ranks by the order they are posted (it ignores
tags), and torch runs both directions of a rank pair on one NCCL communicator and stream. So a
schedule is only safe on GPUs if, for every pair of ranks, both post the messages they exchange
in the same order. ``add_comms`` places SEND/RECV actions so that this holds by construction:
it replays the compute order in lockstep rounds and appends each SEND to the producer's list and
its RECV to the consumer's list at the same moment. A RECV therefore lands where the consumer
is when the data is produced, possibly well before the compute that consumes it; the executor
posts the receive there and waits for it only at the consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import BACKWARD, COMM, Action, DeadlockError, Kind, Schedule


@dataclass(frozen=True)
class Message:
    """One tensor sent between ranks: an activation (``data`` F) or an input gradient (B) that
    stage ``src`` produced for microbatch ``mb``."""

    data: Kind
    src: int
    mb: int

    def __str__(self) -> str:
        return f"{'activation' if self.data is Kind.F else 'gradient'} {self.src}:{self.mb}"


@dataclass(frozen=True)
class Post:
    """One point-to-point operation in a rank's posting order."""

    index: int
    """Position of its SEND/RECV action in the rank's action list."""
    op: str
    """'send' or 'recv'."""
    peer: int
    """Pipeline rank on the other end."""
    message: Message


def has_comms(schedule: Schedule) -> bool:
    return any(a.kind in COMM for acts in schedule.ranks for a in acts)


def _needs(schedule: Schedule, rank: int, a: Action) -> Action | None:
    """The RECV that compute action ``a`` consumes, if its input comes from another rank."""
    if a.kind is Kind.F and a.stage > 0 and schedule.rank_of(a.stage - 1) != rank:
        return schedule.act(Kind.RECV_F, a.stage, a.mb)
    if a.kind in BACKWARD and a.stage < schedule.n_stages - 1 and schedule.rank_of(a.stage + 1) != rank:
        return schedule.act(Kind.RECV_B, a.stage, a.mb)
    return None


def _produces(schedule: Schedule, rank: int, a: Action) -> tuple[Action, Action] | None:
    """(SEND on this rank, RECV on the peer) for the tensor ``a`` hands to another rank."""
    if a.kind is Kind.F and a.stage < schedule.n_stages - 1 and schedule.rank_of(a.stage + 1) != rank:
        return schedule.act(Kind.SEND_F, a.stage, a.mb), schedule.act(Kind.RECV_F, a.stage + 1, a.mb)
    if a.kind in BACKWARD and a.stage > 0 and schedule.rank_of(a.stage - 1) != rank:
        return schedule.act(Kind.SEND_B, a.stage, a.mb), schedule.act(Kind.RECV_B, a.stage - 1, a.mb)
    return None


def add_comms(schedule: Schedule) -> Schedule:
    """Insert SEND right after each producing compute and the matching RECV into the consumer's
    list at the same lockstep round (always before the consumer). Existing comms are replaced.

    Raises DeadlockError, naming each stuck rank and the message it waits for, when the compute
    order itself cannot run (a cycle across ranks).
    """
    compute = [[a for a in acts if a.kind not in COMM] for acts in schedule.ranks]
    out: list[list[Action]] = [[] for _ in compute]
    ptr = [0] * len(compute)
    posted: set[Action] = set()
    while any(ptr[r] < len(acts) for r, acts in enumerate(compute)):
        moved = False
        for r, acts in enumerate(compute):
            if ptr[r] == len(acts):
                continue
            a = acts[ptr[r]]
            need = _needs(schedule, r, a)
            if need is not None and need not in posted:
                continue
            out[r].append(a)
            ptr[r] += 1
            moved = True
            pair = _produces(schedule, r, a)
            if pair is not None:
                send, recv = pair
                out[r].append(send)
                out[schedule.rank_of(recv.stage)].append(recv)
                posted.add(recv)
        if not moved:
            raise DeadlockError("deadlock: " + "; ".join(_stuck(schedule, compute, ptr, out)))
    return schedule.with_ranks(out)


def _stuck(schedule: Schedule, compute, ptr, out) -> list[str]:
    lines = []
    for r, acts in enumerate(compute):
        if ptr[r] == len(acts):
            continue
        need = _needs(schedule, r, acts[ptr[r]])
        sender = need.stage - 1 if need.kind is Kind.RECV_F else need.stage + 1
        kind = Kind.SEND_F if need.kind is Kind.RECV_F else Kind.SEND_B
        lines.append(f"rank {r} action #{len(out[r])} {need} waits for {sender}{kind.value}{need.mb} "
                     f"from rank {schedule.rank_of(sender)}, which never gets to send it")
    return lines


def message_of(a: Action) -> Message:
    """The message a SEND/RECV action carries."""
    if a.kind is Kind.SEND_F:
        return Message(Kind.F, a.stage, a.mb)
    if a.kind is Kind.RECV_F:
        return Message(Kind.F, a.stage - 1, a.mb)
    if a.kind is Kind.SEND_B:
        return Message(Kind.B, a.stage, a.mb)
    if a.kind is Kind.RECV_B:
        return Message(Kind.B, a.stage + 1, a.mb)
    raise ValueError(f"action={a} is not a send or receive")


def comm_plan(schedule: Schedule) -> list[list[Post]]:
    """Per rank, its point-to-point operations in the order the executor posts them."""
    plan = []
    for acts in schedule.ranks:
        row = []
        for i, a in enumerate(acts):
            if a.kind not in COMM:
                continue
            msg = message_of(a)
            send = a.kind in (Kind.SEND_F, Kind.SEND_B)
            if msg.data is Kind.F:
                peer_stage = msg.src + 1 if send else msg.src
            else:
                peer_stage = msg.src - 1 if send else msg.src
            row.append(Post(i, "send" if send else "recv", schedule.rank_of(peer_stage), msg))
        plan.append(row)
    return plan


def order_mismatch(schedule: Schedule) -> str | None:
    """None if every pair of ranks posts the messages it exchanges in the same order; else a
    sentence naming both ranks and the first message where their orders part."""
    plan = comm_plan(schedule)
    for a in range(schedule.p):
        for b in range(a + 1, schedule.p):
            seq_a = [(x.op, x.message) for x in plan[a] if x.peer == b]
            seq_b = [("recv" if x.op == "send" else "send", x.message) for x in plan[b] if x.peer == a]
            for i, (x, y) in enumerate(zip(seq_a, seq_b)):
                if x != y:
                    return (f"ranks {a} and {b} post their point-to-point operations in different orders: "
                            f"operation #{i} between them is rank {a}'s {x[0]} of {x[1]} but rank {b}'s "
                            f"{'send' if y[0] == 'recv' else 'recv'} of {y[1]} (NCCL matches by posting order; "
                            "let add_comms place the sends and receives)")
            if len(seq_a) != len(seq_b):
                return f"ranks {a} and {b} post {len(seq_a)} and {len(seq_b)} operations with each other"
    return None
