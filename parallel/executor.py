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
from torch.autograd.graph import get_gradient_edge

from .comms import Post, add_comms, comm_plan, has_comms
from trainmem.offload import CopyEngine

from .ir import Action, DeadlockError, Kind, Schedule
from .split_backward import SplitBackward
from .stash import Ledger, Stash, StashSlots, offload_slots
from .transfers import Transfers
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
    """Peak saved-activation memory in M_B, measured from the bytes held: the sum over this rank's
    stages of (bytes its stashes hold / one microbatch's stash bytes of that stage), over v;
    sampled after every F and RELOAD (only they add bytes)."""
    stage_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes one microbatch's stash takes, per stage of this rank (as measured at its first F)."""
    peak_transfer_bytes: int = 0
    """Peak bytes between stages (outputs and gradients awaiting hand-over, sends in flight,
    posted receives not yet consumed): memory beside the saved activations."""


@dataclass
class _Step:
    """What one step holds per (stage, microbatch) between its actions."""

    inputs: dict = field(default_factory=dict)
    """Stage input x (requires grad where the input gradient is wanted), until the backward."""
    roots: dict = field(default_factory=dict)
    """What backward starts from: the scaled loss on the last stage, else the output's gradient
    edge (the output tensor itself goes to the next stage and need not stay)."""
    stashes: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    """SplitBackward between a B and its W."""
    loss: float = 0.0
    peak_mb: float = 0.0
    stage_bytes: dict = field(default_factory=dict)
    caller_ptrs: set = field(default_factory=set)
    """Storages of the step's inputs and targets: the caller's, not activations of the step."""


class PipelineExecutor:
    """Executes ``schedule`` for ``rank`` with ``stages`` = {global stage index: module}.

    ``loss_fn(output, target)`` is the per-microbatch mean loss; the step's loss is their mean, so
    gradients equal one unpipelined step on the concatenated batch. Gradients accumulate into the
    modules' ``.grad`` (zero them between steps as usual).

    ``rank`` is the pipeline rank inside ``group`` (None: the default group). ``on_stage_done(stage)``
    is called once per step and stage right after the stage's last weight-gradient action (its
    last W or BW), when its gradients are complete: data parallelism starts the stage's
    all-reduce there, under the compute of the stages still running.

    ``stash_hooks`` (a :class:`~trainmem.parallel.activations.PipelinePolicy`): its
    ``begin_forward(stage, mb)`` runs before each F and ``end_backward(stage, mb)`` after each
    (stage, mb)'s last backward, once its graph is gone (the activation policy's host carves).
    """

    def __init__(self, schedule: Schedule, rank: int, stages: dict[int, nn.Module],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 group: dist.ProcessGroup | None = None, timeout_s: float = 60.0,
                 on_stage_done: Callable[[int], None] | None = None, copier: CopyEngine | None = None,
                 stash_hooks=None) -> None:
        schedule = executable(schedule)
        if sorted(stages) != sorted(schedule.placement[rank]):
            raise ValueError(f"stages={sorted(stages)} but schedule places stages {schedule.placement[rank]} on rank {rank}")
        self.schedule, self.rank, self.stages, self.loss_fn = schedule, rank, stages, loss_fn
        self.group, self.timeout = group, _dt.timedelta(seconds=timeout_s)
        self.actions = schedule.ranks[rank]
        self.on_stage_done, self.stash_hooks = on_stage_done, stash_hooks
        self._last_weight_action = {a.stage: i for i, a in enumerate(self.actions) if a.kind in (Kind.W, Kind.BW)}
        self._posts: dict[int, Post] = {post.index: post for post in comm_plan(schedule)[rank]}
        self.last = schedule.n_stages - 1
        self.ledger = Ledger()
        device = next(iter(next(iter(stages.values())).parameters())).device
        self.copier = copier if copier is not None else CopyEngine(device)
        """Moves offloaded stashes (shared with the activation policy when the engine passes its own)."""
        self.slots = StashSlots(offload_slots(self.actions), pin=device.type == "cuda")
        self._settling: list[Stash] = []
        self._shapes: dict[tuple[Kind, int, int], tuple[torch.Size, torch.dtype]] = {}
        self._param_ptrs = {p.untyped_storage().data_ptr() for mod in stages.values() for p in mod.parameters()}
        self._st = _Step()
        self._io = Transfers(self._wait)

    # ---- public -------------------------------------------------------------------------------
    def step(self, microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """Run one step over m (inputs, targets) pairs; every rank passes the same list (only the
        first stage reads inputs and only the last reads targets)."""
        if len(microbatches) != self.schedule.m:
            raise ValueError(f"microbatches has {len(microbatches)} entries but the schedule has m={self.schedule.m}")
        self.ledger.peak = self.ledger.bytes
        st = self._st = _Step()
        st.caller_ptrs = {t.untyped_storage().data_ptr() for mb in microbatches for t in mb}
        io = self._io = Transfers(self._wait)
        for i, a in enumerate(self.actions):
            try:
                self._run(i, a, microbatches)
            except PipelineError:
                raise
            except Exception as exc:
                raise PipelineError(f"rank {self.rank} action #{i} {a}: {type(exc).__name__}: {exc}") from exc
            if self.on_stage_done is not None and self._last_weight_action.get(a.stage) == i:
                self.on_stage_done(a.stage)
            io.reap()
        io.drain()
        self._settle()
        leftover = [s.name for s in st.stashes.values() if s.tensors or s.offloaded] + io.leftover()
        if leftover:
            raise PipelineError(f"rank {self.rank}: {leftover} still held after the step (the schedule lacks their W/BW, send or consumer)")
        loss = self._broadcast_loss(st.loss / self.schedule.m)
        return StepStats(loss=loss, peak_bytes=self.ledger.peak, peak_mb=st.peak_mb, stage_bytes=dict(st.stage_bytes),
                         peak_transfer_bytes=io.peak_bytes)

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
            self._send(a, self._posts[i], self._io.hand_over(("out", a.stage, a.mb)).detach())
        elif k is Kind.SEND_B:
            self._send(a, self._posts[i], self._io.hand_over(("grad", a.stage - 1, a.mb)))
        elif k in (Kind.RECV_F, Kind.RECV_B):
            self._post_recv(a, self._posts[i])
        elif k is Kind.OFFLOAD:
            stash = self._st.stashes[(a.stage, a.mb)]
            stash.offload(self.slots, self.copier)
            self._settling.append(stash)
        elif k is Kind.RELOAD:
            self._settle()
            self._st.stashes[(a.stage, a.mb)].reload(self.copier)
            self._sample_mb()

    def _settle(self) -> None:
        """Let go of the device bytes of every offload in flight once its copy has landed: before
        anything allocates (F, RELOAD), so an offloaded stash never shares the device with a new one."""
        for stash in self._settling:
            x = self._st.inputs.get((stash.stage, stash.mb))
            stash.settle(free={x.untyped_storage().data_ptr()} if x is not None else set())
        self._settling = []

    def _sample_mb(self) -> None:
        """Bytes each stage's stashes hold now, in units of one microbatch's stash of that stage."""
        st = self._st
        held = sum(self.ledger.by_owner.get(s, 0) / unit for s, unit in st.stage_bytes.items() if unit)
        st.peak_mb = max(st.peak_mb, held / self.schedule.v)

    def _remote(self, stage: int) -> bool:
        return self.schedule.rank_of(stage) != self.rank

    def _forward(self, a: Action, mbs) -> None:
        self._settle()
        st = self._st
        key = (a.stage, a.mb)
        if a.stage == 0:
            x = mbs[a.mb][0]
        else:
            if self._remote(a.stage - 1):
                x = self._io.take((Kind.RECV_F, a.stage, a.mb))
                if x is None:
                    raise PipelineError(f"rank {self.rank} action {a}: its input {a.stage}RECV_F{a.mb} was never posted")
            else:  # previous stage ran on this rank: hand off locally
                x = self._io.hand_over(("out", a.stage - 1, a.mb)).detach()
            st.inputs[key] = x = x.requires_grad_(x.is_floating_point())
        stash = Stash(self.ledger, a.stage, a.mb)
        st.stashes[key] = stash
        if self.stash_hooks is not None:
            self.stash_hooks.begin_forward(a.stage, a.mb)

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._param_ptrs or ptr in st.caller_ptrs:
                return (None, t)  # parameters and the caller's inputs are not activations
            return (stash, stash.add(t))

        def unpack(h):
            owner, val = h
            return val if owner is None else owner.get(val, self.copier)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = self.stages[a.stage](x)
            if a.stage == self.last:
                loss = self.loss_fn(out, mbs[a.mb][1])
                st.loss += float(loss.detach())
                out = loss / self.schedule.m
        if a.stage == self.last or out.grad_fn is None:
            st.roots[key] = out
        else:
            st.roots[key] = get_gradient_edge(out)
        if a.stage != self.last:
            self._io.hold(("out", a.stage, a.mb), out)
        st.stage_bytes.setdefault(a.stage, stash.bytes())
        self._sample_mb()

    def _backward(self, a: Action, *, weights: bool, inputs: bool) -> None:
        st = self._st
        key = (a.stage, a.mb)
        x = st.inputs.get(key)
        params = [p for p in self.stages[a.stage].parameters() if p.requires_grad]
        want_input = inputs and a.stage > 0 and x is not None
        if not weights:  # B: input grad only; W still needs the graph
            if want_input:
                split = SplitBackward(st.roots[key], x, params)
                self._give_input_grad(a, split.input_grad(self._grad_out(a)))
                st.splits[key] = split
            return
        split = st.splits.pop(key, None)
        if split is not None:  # W after a split B: only the parameter side of the graph
            split.weight_grad()
        else:  # BW, or W of the first stage (its B had no input to differentiate)
            targets = params + ([x] if want_input else [])
            torch.autograd.backward(st.roots[key], self._grad_out(a), inputs=targets)
            if want_input:
                self._give_input_grad(a, x.grad)
        st.stashes[key].release()
        st.roots.pop(key)
        st.inputs.pop(key, None)
        if self.stash_hooks is not None:
            self.stash_hooks.end_backward(a.stage, a.mb)

    def _grad_out(self, a: Action) -> torch.Tensor | None:
        """The gradient of this stage's output (None on the last stage, whose root is the loss)."""
        if a.stage == self.last:
            return None
        if self._remote(a.stage + 1):
            g = self._io.take((Kind.RECV_B, a.stage, a.mb))
        else:
            g = self._io.hand_over(("grad", a.stage, a.mb)) if self._io.holds(("grad", a.stage, a.mb)) else None
        if g is None:
            raise PipelineError(f"rank {self.rank} action {a}: no output gradient for stage {a.stage} microbatch {a.mb}")
        return g

    def _give_input_grad(self, a: Action, gx: torch.Tensor) -> None:
        """Hold the input gradient for stage a.stage-1: its SEND_B or its backward on this rank."""
        self._io.hold(("grad", a.stage - 1, a.mb), gx)

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
            self._io.sent(peer, dist.isend(header, peer, group=self.group, tag=self._tag(post, True)), header, f"{a} header to rank {peer}")
            self._shapes[key] = (t.shape, t.dtype)
        elif known != (t.shape, t.dtype):
            raise PipelineError(f"rank {self.rank} action {a}: tensor changed from {known} to {(t.shape, t.dtype)} between steps; build a new PipelineExecutor")
        self._io.sent(peer, dist.isend(t, peer, group=self.group, tag=self._tag(post, False)), t, f"{a} to rank {peer}")

    def _post_recv(self, a: Action, post: Post) -> None:
        """Post the receive now (the pair's agreed order); the consumer waits for it (``Transfers.take``)."""
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
        self._io.posted(key, peer, work, buf, f"{a} from rank {peer}")

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
