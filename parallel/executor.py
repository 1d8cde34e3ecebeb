"""Run one rank's part of a pipeline schedule over torch.distributed point-to-point.

Each rank holds the stage modules the schedule's placement gives it and runs its action list in
order. Point-to-point operations are posted in the order ``comm_plan`` gives (the same order on
both ranks of every pair, as NCCL needs): a SEND posts an ``isend``, a RECV posts an ``irecv``
that the consuming compute waits for; every wait has a timeout and a ``PipelineError`` naming
rank, action and peer. The first message of each (kind, stage, microbatch) carries a small shape
header, received where the RECV is posted; later steps reuse the shape.

B/W split (``split_backward.py``): B computes only the input gradient and keeps the gradients at
the graph's parameter boundary; W computes only the weight gradients from there and frees the
stash. The first stage has no input gradient, so its B is empty and its W is the whole backward.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from .comms import Post, add_comms, comm_plan, has_comms
from .ir import Action, DeadlockError, Kind, Schedule
from .split_backward import SplitBackward
from .stash import HostPool, Ledger, Stash
from .validate import ScheduleError, validate

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32]


class PipelineError(RuntimeError):
    """A pipeline action failed or timed out; the message names rank, action and peer."""


def executable(schedule: Schedule) -> Schedule:
    """``schedule`` as the executor runs it: sends and receives placed by ``add_comms`` unless it
    has its own, then validated (ScheduleError if it cannot run)."""
    if not has_comms(schedule):
        try:
            schedule = add_comms(schedule)
        except DeadlockError as exc:
            raise ScheduleError(str(exc)) from None
    return validate(schedule)


@dataclass
class StepStats:
    loss: float
    """Mean loss over the step's microbatches (from the last stage, broadcast to every rank)."""
    peak_bytes: int
    """Peak device-resident saved-activation bytes on this rank during the step."""
    peak_mb: float
    """Peak live stashes on this rank in M_B (each stage's stash counts 1/v)."""
    stage_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes one microbatch's stash takes, per stage of this rank (as measured at its first F)."""


class PipelineExecutor:
    """Executes ``schedule`` for ``rank`` with ``stages`` = {global stage index: module}.

    ``loss_fn(output, target)`` is the per-microbatch mean loss; the step's loss is their mean, so
    gradients equal one unpipelined step on the concatenated batch. Gradients accumulate into the
    modules' ``.grad`` (zero them between steps as usual).
    """

    def __init__(self, schedule: Schedule, rank: int, stages: dict[int, nn.Module],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 group: dist.ProcessGroup | None = None, timeout_s: float = 60.0) -> None:
        schedule = executable(schedule)
        if sorted(stages) != sorted(schedule.placement[rank]):
            raise ValueError(f"stages={sorted(stages)} but schedule places stages {schedule.placement[rank]} on rank {rank}")
        self.schedule, self.rank, self.stages, self.loss_fn = schedule, rank, stages, loss_fn
        self.group, self.timeout = group, _dt.timedelta(seconds=timeout_s)
        self.actions = schedule.ranks[rank]
        self._posts: dict[int, Post] = {post.index: post for post in comm_plan(schedule)[rank]}
        self.last = schedule.n_stages - 1
        self.ledger = Ledger()
        self.pool = HostPool()
        self._shapes: dict[tuple[Kind, int, int], tuple[torch.Size, torch.dtype]] = {}
        self._param_ptrs = {p.untyped_storage().data_ptr() for mod in stages.values() for p in mod.parameters()}
        self._state: dict = {}

    # ---- public -------------------------------------------------------------------------------
    def step(self, microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """Run one step over m (inputs, targets) pairs; every rank passes the same list (only the
        first stage reads inputs and only the last reads targets)."""
        if len(microbatches) != self.schedule.m:
            raise ValueError(f"microbatches has {len(microbatches)} entries but the schedule has m={self.schedule.m}")
        self.ledger.peak = self.ledger.bytes
        st = self._state = {"x": {}, "root": {}, "gout": {}, "gin": {}, "stash": {}, "sends": [], "inbox": {},
                            "loss": 0.0, "live": 0.0, "peak_mb": 0.0, "stage_bytes": {}, "split": {}}
        for i, a in enumerate(self.actions):
            try:
                self._run(i, a, microbatches)
            except PipelineError:
                raise
            except Exception as exc:
                raise PipelineError(f"rank {self.rank} action #{i} {a}: {type(exc).__name__}: {exc}") from exc
        for work, what in st["sends"]:
            self._wait(work, what)
        leftover = [s.name for s in st["stash"].values() if s.tensors or s.offloaded]
        if leftover:
            raise PipelineError(f"rank {self.rank}: stashes {leftover} still held after the step (schedule lacks their W/BW)")
        loss = self._broadcast_loss(st["loss"] / self.schedule.m)
        return StepStats(loss=loss, peak_bytes=self.ledger.peak, peak_mb=st["peak_mb"], stage_bytes=dict(st["stage_bytes"]))

    # ---- actions ------------------------------------------------------------------------------
    def _run(self, i: int, a: Action, mbs) -> None:
        k = a.kind
        if k is Kind.F:
            self._forward(a, mbs)
        elif k is Kind.BW:
            self._backward(a, weights=True, inputs=True)
        elif k is Kind.B:
            self._backward(a, weights=False, inputs=True)
        elif k is Kind.W:
            self._backward(a, weights=True, inputs=False)
        elif k is Kind.SEND_F:
            self._send(a, self._posts[i], self._state["root"][(a.stage, a.mb)].detach())
        elif k is Kind.SEND_B:
            self._send(a, self._posts[i], self._state["gin"].pop((a.stage, a.mb)))
        elif k in (Kind.RECV_F, Kind.RECV_B):
            self._post_recv(a, self._posts[i])
        elif k is Kind.OFFLOAD:
            self._state["stash"][(a.stage, a.mb)].offload(self.pool)
            self._state["live"] -= 1.0 / self.schedule.v
        elif k is Kind.RELOAD:
            self._state["stash"][(a.stage, a.mb)].reload(self.pool)
            self._bump(1.0 / self.schedule.v)

    def _bump(self, delta: float) -> None:
        st = self._state
        st["live"] += delta
        st["peak_mb"] = max(st["peak_mb"], st["live"])

    def _forward(self, a: Action, mbs) -> None:
        st = self._state
        key = (a.stage, a.mb)
        if a.stage == 0:
            x = mbs[a.mb][0]
        elif self.schedule.rank_of(a.stage - 1) != self.rank:
            x = self._take(Kind.RECV_F, a.stage, a.mb)
            st["x"][key] = x.requires_grad_(x.is_floating_point())
        else:  # previous stage ran on this rank: hand off locally
            x = st["root"][(a.stage - 1, a.mb)].detach().requires_grad_(True)
            st["x"][key] = x
        stash = Stash(self.ledger, f"{a.stage}:{a.mb}")
        st["stash"][key] = stash

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() in self._param_ptrs:
                return (None, t)  # parameters are not activations
            return (stash, stash.add(t))

        def unpack(h):
            owner, val = h
            return val if owner is None else owner.get(val)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = self.stages[a.stage](x)
            if a.stage == self.last:
                loss = self.loss_fn(out, mbs[a.mb][1])
                st["loss"] += float(loss.detach())
                out = loss / self.schedule.m
        st["root"][key] = out
        st["stage_bytes"].setdefault(a.stage, stash.bytes())
        self._bump(1.0 / self.schedule.v)

    def _backward(self, a: Action, *, weights: bool, inputs: bool) -> None:
        st = self._state
        key = (a.stage, a.mb)
        root = st["root"][key]
        grad = None if a.stage == self.last else self._grad_out(a)
        x = st["x"].get(key)
        params = [p for p in self.stages[a.stage].parameters() if p.requires_grad]
        want_input = inputs and a.stage > 0 and x is not None
        if not weights:  # B: input grad only; W still needs the graph
            if want_input:
                split = SplitBackward(root, x, params)
                self._give_input_grad(a, split.input_grad(grad))
                st["split"][key] = split
            return
        split = st["split"].pop(key, None)
        if split is not None:  # W after a split B: only the parameter side of the graph
            split.weight_grad(grad)
        else:  # BW, or W of the first stage (its B had no input to differentiate)
            targets = params + ([x] if want_input else [])
            torch.autograd.backward(root, grad, inputs=targets)
            if want_input:
                self._give_input_grad(a, x.grad)
        st["stash"][key].release(self.pool)
        self._state["live"] -= 1.0 / self.schedule.v
        for d in ("root", "x", "gout"):
            st[d].pop(key, None)

    def _grad_out(self, a: Action) -> torch.Tensor:
        gout, key = self._state["gout"], (a.stage, a.mb)
        if key not in gout and self.schedule.rank_of(a.stage + 1) != self.rank:
            gout[key] = self._take(Kind.RECV_B, a.stage, a.mb)  # kept for W after a split B
        g = gout.get(key)
        if g is None:
            raise PipelineError(f"rank {self.rank} action {a}: no output gradient for stage {a.stage} microbatch {a.mb}")
        return g

    def _give_input_grad(self, a: Action, gx: torch.Tensor) -> None:
        if self.schedule.rank_of(a.stage - 1) == self.rank:
            self._state["gout"][(a.stage - 1, a.mb)] = gx
        else:
            self._state["gin"][(a.stage, a.mb)] = gx

    # ---- communication ------------------------------------------------------------------------
    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _tag(self, post: Post, header: bool) -> int:
        msg = post.message
        code = 0 if msg.data is Kind.F else 1
        return (((code * self.schedule.n_stages + msg.src) * self.schedule.m + msg.mb) * 2) + int(header)

    def _send(self, a: Action, post: Post, t: torch.Tensor) -> None:
        t = t.contiguous()
        peer = self._global(post.peer)
        key = (a.kind, a.stage, a.mb)
        known = self._shapes.get(key)
        if known is None:
            header = torch.zeros(8, dtype=torch.int64, device=t.device)  # nccl sends device tensors only
            header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
            header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            self._state["sends"].append((dist.isend(header, peer, group=self.group, tag=self._tag(post, True)), f"{a} header to rank {peer}"))
            self._state.setdefault("keep", []).append(header)
            self._shapes[key] = (t.shape, t.dtype)
        elif known != (t.shape, t.dtype):
            raise PipelineError(f"rank {self.rank} action {a}: tensor changed from {known} to {(t.shape, t.dtype)} between steps; build a new PipelineExecutor")
        self._state.setdefault("keep", []).append(t)
        self._state["sends"].append((dist.isend(t, peer, group=self.group, tag=self._tag(post, False)), f"{a} to rank {peer}"))

    def _post_recv(self, a: Action, post: Post) -> None:
        """Post the receive now (the pair's agreed order); ``_take`` waits for it at the consumer."""
        peer = self._global(post.peer)
        key = (a.kind, a.stage, a.mb)
        device = next(iter(self.stages[a.stage].parameters())).device
        if key not in self._shapes:
            header = torch.zeros(8, dtype=torch.int64, device=device)
            self._wait(dist.irecv(header, peer, group=self.group, tag=self._tag(post, True)), f"{a} header from rank {peer}")
            nd = int(header[1])
            self._shapes[key] = (torch.Size(header[2:2 + nd].tolist()), _DTYPES[int(header[0])])
        shape, dtype = self._shapes[key]
        buf = torch.empty(shape, dtype=dtype, device=device)
        work = dist.irecv(buf, peer, group=self.group, tag=self._tag(post, False))
        self._state["inbox"][key] = (work, buf, f"{a} from rank {peer}")

    def _take(self, kind: Kind, stage: int, mb: int) -> torch.Tensor:
        posted = self._state["inbox"].pop((kind, stage, mb), None)
        if posted is None:
            raise PipelineError(f"rank {self.rank}: nothing received for {stage}{kind.value}{mb} (the schedule lacks that RECV)")
        work, buf, what = posted
        self._wait(work, what)
        return buf

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timeout=self.timeout)
        except Exception as exc:
            raise PipelineError(f"rank {self.rank} action {what}: timed out or failed after {self.timeout.total_seconds():g}s ({exc})") from None
        if ok is False:
            raise PipelineError(f"rank {self.rank} action {what}: did not complete within {self.timeout.total_seconds():g}s")

    def _broadcast_loss(self, local: float) -> float:
        src = self._global(self.schedule.rank_of(self.last))
        device = next(iter(next(iter(self.stages.values())).parameters())).device
        t = torch.tensor([local], dtype=torch.float64, device=device)
        self._wait(dist.broadcast(t, src=src, group=self.group, async_op=True), f"loss broadcast from rank {src}")
        return float(t.item())
