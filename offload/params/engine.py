"""``ChunkedEngine``: a ZeRO-3-like data-parallel engine over chunks placed on device, host and disk.

Each step, per micro-batch: an operator's forward pre-hook makes its chunks resident in the device
arena (all-gathered from every rank's shard) and points its parameters at them; parameters of
chunks not resident point at a one-element NaN placeholder of the right shape (so autograd keeps
working and nothing can silently compute from stale memory). Tensors autograd saves from a chunk
are packed as (chunk, offset, geometry) and rebuilt on unpack from wherever the chunk is then,
fetching it first: eviction between forward and backward is always safe. Gradients land through
post-accumulate hooks in a gradient chunk in the arena; when its last parameter's gradient is in,
the chunk is all-to-all'ed, the owner adds the W pieces in rank order into its host gradient shard
(micro-batch by micro-batch, so the sum runs in global micro-batch order at any world size), and
the arena slot is freed. The optimizer then runs on the host shard by shard.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.graph import saved_tensors_hooks

from ..tiers import CopyEngine, DeviceArena, DiskSlots, Handle, HostPool
from .config import PlacementConfig
from .layout import STATES
from .optim import HostAdamW
from .planner import plan_with_layout
from .store import ShardStore
from .trace import Policy, Trace, min_slots

CHECKPOINT_FORMAT = "trainmem-chunked-v1"
SAVED_STATES = ("param", "exp_avg", "exp_avg_sq")


def operators(model: nn.Module) -> list[nn.Module]:
    """Modules that own parameters directly, in registration order (the planner's first guess at use order)."""
    return [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]


def check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if type(m).__name__ == "ProductKeyMemory" or getattr(m, "sparse", False) is True:
            raise ValueError(f"model.memory_layers: {name or type(m).__name__} has sparse-gradient value rows with "
                             "their own optimizer, which [placement] does not place yet (fix: remove [placement] "
                             "or model.memory_layers)")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise ValueError(f"[placement] places fp32 parameters; {name} is {p.dtype}")


class _SavedRef:
    __slots__ = ("chunk", "offset", "size", "stride")

    def __init__(self, chunk: int, offset: int, size, stride):
        self.chunk, self.offset, self.size, self.stride = chunk, offset, size, stride


class _Fetch:
    __slots__ = ("handle", "work", "release")

    def __init__(self, handle: Handle | None, work, release: Callable[[], None] | None):
        self.handle, self.work, self.release = handle, work, release


class ChunkedEngine:
    """The runtime's contract: ``forward_backward(x, y) -> global mean loss``, ``clip(max_norm)``,
    ``optimizer_step()``, ``state_for_checkpoint()`` / ``load_checkpoint(read, saved_world)``,
    ``full_state_dict()`` (collective), ``data_rank_world``, ``replica_group_key`` and ``last_stats``."""

    def __init__(self, model: nn.Module, cfg: PlacementConfig, *, lr: float, weight_decay: float,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                 group: dist.ProcessGroup | None = None, events: Callable[..., None] | None = None):
        check_supported(model)
        self.model, self.cfg, self.loss_fn, self.group = model, cfg, loss_fn, group
        self.device = torch.device(device)
        self.events = events or (lambda name, **fields: None)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        index = {id(p): i for i, p in enumerate(self.params)}
        self.ops = operators(model)
        self.op_params = [[index[id(p)] for p in op.parameters(recurse=False)] for op in self.ops]
        shapes = [(n, tuple(p.shape)) for n, p in zip(self.names, self.params)]
        self.plan, self.layout = plan_with_layout(shapes, self.op_params, cfg, world=self.world)
        self.events("placement_plan", **{k: v for k, v in self.plan.to_dict().items() if k != "notes"})
        layout = self.layout
        self.shard = layout.shard_elems
        self.op_chunks = [sorted({layout.slots[i].chunk for i in ps}) for ps in self.op_params]
        self.chunk_slots = [layout.chunk_params(c) for c in range(layout.n_chunks)]
        self.my_slots = [layout.owned(self.rank, c) for c in range(layout.n_chunks)]
        self.copier = CopyEngine(self.device)
        self.arena = DeviceArena(self.plan.device_bytes, layout.chunk_bytes, self.device)
        self.pool = HostPool(self.plan.host_bytes, pin=self.device.type == "cuda")
        disk_states = [s for s in STATES if self.plan.homes[s] == "disk"]
        self.disk = DiskSlots(cfg.disk_path, rank=self.rank, slot_bytes=layout.shard_bytes,
                              n_slots=len(STATES) * layout.n_chunks, engine=self.copier) if disk_states else None
        self.store = ShardStore(layout, self.plan.homes, pool=self.pool, disk=self.disk, engine=self.copier)
        self.optimizer = HostAdamW(cfg.optimizer, lr=lr, weight_decay=weight_decay)
        self._placeholder = torch.full((1,), float("nan"), dtype=torch.float32, device=self.device)
        self.resident: dict[int, int] = {}  # chunk -> arena slot
        self.fetching: dict[int, _Fetch] = {}
        self.grad_slot: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.closed: set[int] = set()
        self.norms: dict[int, torch.Tensor] = {}
        self.clip_coef: torch.Tensor | None = None
        self.step_count = 0
        self.micro, self.micro_count = 0, cfg.micro_batches
        self.trace: Trace | None = None
        self.live = Trace()
        self.policy = Policy(None)
        self.t = 0
        self.diverged_at: int | None = None
        self.pins: set[int] = set()
        self.prev_needs: tuple[int, ...] = ()
        self.fetches = self.evictions = self.network_bytes = 0
        self.last_stats: dict[str, Any] = {}
        self._init_shards()
        self._hooks = self._install_hooks()

    # ---- set-up -------------------------------------------------------------------------------
    def _init_shards(self) -> None:
        for c in range(self.layout.n_chunks):
            for state in STATES:
                shard = self.store.get(state, c, read=False)
                shard.zero_()
                if state == "param":
                    for s in self.my_slots[c]:
                        off = s.shard_offset(self.shard)
                        shard[off: off + s.numel].copy_(self.params[s.index].detach().reshape(-1))
                self.store.put(state, c, dirty=True)
        self.store.flush()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.data = self._placeholder.expand(p.shape)  # the model's own copy is freed here

    def _install_hooks(self) -> list:
        handles = []
        for op_index, op in enumerate(self.ops):
            handles.append(op.register_forward_pre_hook(self._pre_forward(op_index)))
            handles.append(op.register_forward_hook(self._post_forward))
        for i, p in enumerate(self.params):
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))
        return handles

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self.store.flush()
        self.copier.close()
        if self.disk is not None:
            self.disk.close()

    # ---- public contract ------------------------------------------------------------------------
    def on_new_group(self) -> None:
        """The process group was formed again (a lost peer replaced): drop what the interrupted step
        had in flight. Its all-gathers belong to the old group and are never waited on; the shards on
        the host are what load_checkpoint overwrites next."""
        for c, f in list(self.fetching.items()):
            if f.release is not None:
                f.release()
        self.fetching.clear()
        for c in list(self.resident):
            self._evict(c)
        for slot in self.grad_slot.values():
            self.arena.release(slot)
        self.grad_slot.clear()
        self.pending.clear()
        self.closed = set()
        self._release_pins()
        # Prefetches are collectives too: the replacement starts without a trace, so this rank must
        # record again with it, or the two would issue their all-gathers in different orders.
        self.trace, self.live, self.policy, self.diverged_at = None, Trace(), Policy(None), None

    @property
    def data_rank_world(self) -> tuple[int, int]:
        return self.rank, self.world

    @property
    def replica_group_key(self) -> str:
        return f"placement-rank-{self.rank}"  # every rank holds different shards

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.live, self.t, self.diverged_at = Trace(), 0, None
        self.policy = Policy(self.trace)
        k_total = self.micro_count
        if x.shape[0] % k_total:
            raise ValueError(f"placement.micro_batches={k_total} must divide the batch of {x.shape[0]} sequences")
        losses = []
        for k, (xm, ym) in enumerate(zip(x.chunk(k_total), y.chunk(k_total))):
            self.micro, self.closed = k, set()
            with saved_tensors_hooks(self._pack, self._unpack):
                loss = self.loss_fn(self.model(xm), ym)
            loss.backward()
            self._close_remaining()
            self._release_pins()
            losses.append(loss.detach().to("cpu", torch.float64))
        self._end_trace()
        mean = self._global_mean(torch.stack(losses))
        self.last_stats["forward_backward_s"] = time.perf_counter() - t0
        return mean

    def clip(self, max_norm: float) -> None:
        """torch's clip_grad_norm_: per-parameter norms (each on its owner), the norm of norms, one coefficient."""
        local = torch.zeros(len(self.params), dtype=torch.float32)
        for i, n in self.norms.items():
            local[i] = n
        if self.world > 1:
            gathered = torch.empty(self.world * len(self.params), dtype=torch.float32)
            dist.all_gather_into_tensor(gathered, local, group=self.group)
            rows = gathered.view(self.world, -1)
            local = torch.stack([rows[self.layout.slots[i].owner, i] for i in range(len(self.params))])
        norms = [local[i] for i in range(len(self.params)) if self.params[i].requires_grad]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        self.clip_coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        self.last_stats["grad_norm"] = float(total)

    def optimizer_step(self) -> None:
        """AdamW on the host, shard by shard (next shard's disk reads and last shard's writes in flight); zero grads."""
        self._invalidate_arena()
        self.step_count += 1
        t0 = time.perf_counter()
        n = self.layout.n_chunks
        for state in STATES:
            self.store.prefetch(state, 0)
        for c in range(n):
            for state in STATES:
                self.store.prefetch(state, c + 1)
            p, g, m, v = (self.store.get(s, c) for s in STATES)
            if self.clip_coef is not None:
                g.mul_(self.clip_coef)
            views = [(s.shard_offset(self.shard), s.numel, s.shape) for s in self.my_slots[c]
                     if self.params[s.index].requires_grad]
            if views:
                self.optimizer.step_shard(self.step_count, p, g, m, v, views)
            for state, dirty in zip(STATES, (True, False, True, True)):
                self.store.put(state, c, dirty=dirty)
        self.clip_coef = None
        self.norms = {}
        self.last_stats["optimizer_s"] = time.perf_counter() - t0
        self._stats()

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.store.flush()
        tensors = {f"{state}/{c}": self.store.read_copy(state, c)
                   for state in SAVED_STATES for c in range(self.layout.n_chunks)}
        meta = {"format": CHECKPOINT_FORMAT, "rank": self.rank, "world": self.world, "step": self.step_count,
                "shard_elems": self.shard, **self.layout.to_meta()}
        return tensors, meta

    def load_checkpoint(self, read: Callable[[int], tuple[dict[str, torch.Tensor], dict[str, Any]]],
                        saved_world: int) -> None:
        cache: dict[int, tuple[dict, dict]] = {}

        def get(r: int):
            if r not in cache:
                cache[r] = read(r)
                if cache[r][1].get("format") != CHECKPOINT_FORMAT:
                    raise ValueError(f"checkpoint of old rank {r} is not a [placement] checkpoint "
                                     f"(format {cache[r][1].get('format')!r})")
            return cache[r]

        meta = get(0)[1]
        if int(meta["world"]) != saved_world:
            raise ValueError(f"checkpoint says world {meta['world']}, caller says {saved_world}")
        old, old_shard = meta["params"], int(meta["chunk_elems"]) // int(meta["world"])
        missing = [s.name for s in self.layout.slots if s.name not in old]
        if missing or len(old) != len(self.layout.slots):
            raise ValueError(f"checkpoint parameters do not match the model (missing {missing[:3]}, "
                             f"{len(old)} saved vs {len(self.layout.slots)})")
        self._invalidate_arena()
        for c in range(self.layout.n_chunks):
            for state in SAVED_STATES:
                home = self.store.get(state, c, read=False)
                home.zero_()
                for s in self.my_slots[c]:
                    chunk, offset, numel, shape = old[s.name]
                    if tuple(shape) != s.shape:
                        raise ValueError(f"checkpoint {s.name} has shape {tuple(shape)}, the model {s.shape}")
                    r = offset // old_shard
                    src = get(r)[0][f"{state}/{chunk}"]
                    start = offset - r * old_shard
                    home[s.shard_offset(self.shard): s.shard_offset(self.shard) + numel].copy_(src[start: start + numel])
                self.store.put(state, c, dirty=True)
        self.store.flush()
        self.step_count = int(meta["step"])
        self.norms, self.clip_coef = {}, None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter (fp32, on CPU) by name, on every rank."""
        self.store.flush()
        out: dict[str, torch.Tensor] = {}
        for c in range(self.layout.n_chunks):
            shard = self.store.get("param", c)
            full = torch.empty(self.layout.chunk_elems, dtype=torch.float32)
            if self.world > 1:
                dist.all_gather_into_tensor(full, shard.clone(), group=self.group)
            else:
                full.copy_(shard)
            self.store.put("param", c, dirty=False)
            for s in self.chunk_slots[c]:
                out[s.name] = full[s.offset: s.offset + s.numel].view(s.shape).clone()
        return {n: out[n] for n in self.names}

    # ---- moments: make chunks resident ------------------------------------------------------------
    def _moment(self, key: tuple, needs: list[int]) -> None:
        t = self.t
        if self.trace is not None and self.diverged_at is None:
            expected = self.trace.moments[t].key if t < len(self.trace) else None
            if expected != key:
                self.diverged_at = t
                self._expected_key = expected
                self.policy.fall_back_to_lru()
        self.live.add(key, needs, len(self.grad_slot))
        pinned = set(needs) | (set(self.prev_needs) if key[0] == "U" else set())
        self.pins = pinned
        for c in needs:
            if c not in self.resident and c not in self.fetching:
                self._fetch(c, pinned)
        for c in needs:
            self._finish_fetch(c)
        self.policy.touch(needs, t)
        self._prefetch(t, pinned)
        self.prev_needs = tuple(needs)
        self.t += 1

    def _pre_forward(self, op_index: int):
        def hook(module, args):
            self._moment(("F", op_index), self.op_chunks[op_index])
        return hook

    def _post_forward(self, module, args, output) -> None:
        self.pins = set()

    def _release_pins(self) -> None:
        self.pins, self.prev_needs = set(), ()

    def _take_slot(self, owner: tuple, pinned: set[int]) -> int:
        if self.arena.free_slots() == 0:
            movable = [c for c in self.resident if c not in self.fetching]
            victim = self.policy.victim(movable, pinned, self.t)
            if victim is None:
                raise RuntimeError(
                    f"placement.device_bytes: the arena's {self.arena.n_slots} slots are all pinned at moment "
                    f"{self.t} ({len(self.grad_slot)} gradient chunks open) (fix: raise placement.device_bytes to at "
                    f"least {(self.arena.n_slots + 1) * self.arena.slot_bytes})")
            self._evict(victim)
        return self.arena.alloc(owner)

    def _evict(self, chunk: int) -> None:
        slot = self.resident.pop(chunk)
        for s in self.chunk_slots[chunk]:
            self.params[s.index].data = self._placeholder.expand(s.shape)
        self.arena.release(slot)
        self.evictions += 1

    def _fetch(self, chunk: int, pinned: set[int]) -> None:
        slot = self._take_slot(("param", chunk), pinned)
        self.resident[chunk] = slot
        dst = self.arena.view(slot)
        shard = self.store.get("param", chunk)
        release = lambda: self.store.put("param", chunk, dirty=False)  # noqa: E731
        self.fetches += 1
        if self.world == 1:
            handle = self.copier.copy(dst[: self.shard], shard, "host", "device", what=f"chunk {chunk}")
            self.fetching[chunk] = _Fetch(handle, None, release)
        else:
            src = shard
            if self.device.type == "cuda":
                src = dst[self.rank * self.shard: (self.rank + 1) * self.shard]
                self.copier.wait_on_compute(self.copier.copy(src, shard, "host", "device", what=f"chunk {chunk}"))
            else:
                self.copier.count("host", "device", self.shard * 4)
            work = dist.all_gather_into_tensor(dst, src, group=self.group, async_op=True)
            self._count_network((self.world - 1) * self.shard * 4)
            self.fetching[chunk] = _Fetch(None, work, release)

    def _count_network(self, nbytes: int) -> None:
        self.network_bytes += nbytes

    def _finish_fetch(self, chunk: int) -> None:
        f = self.fetching.pop(chunk, None)
        if f is not None:
            t0 = time.perf_counter()
            if f.handle is not None:
                self.copier.wait_on_compute(f.handle)
            else:
                f.work.wait()
                self.copier._add_stall(time.perf_counter() - t0)
            if f.release is not None:
                f.release()
        view = self.arena.view(self.resident[chunk])
        for s in self.chunk_slots[chunk]:
            self.params[s.index].data = view[s.offset: s.offset + s.numel].view(s.shape)

    def _prefetch(self, t: int, pinned: set[int]) -> None:
        depth = self.cfg.prefetch_chunks
        if not depth or not self.policy.belady:
            return
        reserve = self.trace.max_grads_open() + (1 if self.world > 1 else 0)
        nu = self.policy.next_use
        for c in self.policy.prefetch_plan(t, depth):
            if c in self.resident:
                continue
            if self.arena.free_slots() > reserve:
                self._fetch(c, pinned)
                continue
            movable = [r for r in self.resident if r not in self.fetching]
            victim = self.policy.victim(movable, pinned, t)
            if victim is None or nu.after(victim, t) <= nu.after(c, t):
                return  # never evict a chunk needed before the one fetched
            self._evict(victim)
            self._fetch(c, pinned)

    def _invalidate_arena(self) -> None:
        for c in list(self.fetching):
            self._finish_fetch(c)
        for c in list(self.resident):
            self._evict(c)

    # ---- saved tensors: packed by chunk, rebuilt wherever the chunk is ---------------------------------
    def _pack(self, t: torch.Tensor):
        slot = self.arena.slot_of(t)
        if slot is None:
            return t
        owner = self.arena.owner.get(slot)
        if not owner or owner[0] != "param":
            return t
        base = self.arena.view(slot)
        return _SavedRef(owner[1], t.storage_offset() - base.storage_offset(), t.size(), t.stride())

    def _unpack(self, packed):
        if not isinstance(packed, _SavedRef):
            return packed
        self._moment(("U", packed.chunk), [packed.chunk])
        base = self.arena.view(self.resident[packed.chunk])
        return base.as_strided(packed.size, packed.stride, base.storage_offset() + packed.offset)

    # ---- gradients ------------------------------------------------------------------------------------
    def _grad_hook(self, index: int):
        s = self.layout.slots[index]

        def hook(p: torch.Tensor) -> None:
            c = s.chunk
            if c not in self.grad_slot:
                self._open_grad(c)
            view = self.arena.view(self.grad_slot[c])
            view[s.offset: s.offset + s.numel].copy_(p.grad.reshape(-1))
            p.grad = None
            self.pending[c] -= 1
            if self.pending[c] == 0:
                self._close_grad(c)

        return hook

    def _open_grad(self, chunk: int) -> None:
        slot = self._take_slot(("grad", chunk), self.pins | set(self.prev_needs))
        self.grad_slot[chunk] = slot
        self.arena.view(slot).zero_()
        self.pending[chunk] = sum(1 for s in self.chunk_slots[chunk] if self.params[s.index].requires_grad)

    def _close_grad(self, chunk: int) -> None:
        grads = self.arena.view(self.grad_slot[chunk])[: self.layout.chunk_elems]
        reduce_slot = None
        if self.world > 1:
            reduce_slot = self._take_slot(("reduce", chunk), self.pins | set(self.prev_needs))
            pieces = self.arena.view(reduce_slot)[: self.layout.chunk_elems]
            dist.all_to_all_single(pieces, grads, group=self.group)
            self._count_network((self.world - 1) * self.shard * 4)
            pieces = pieces.view(self.world, self.shard)
        else:
            pieces = grads.view(1, self.shard)
        first, last = self.micro == 0, self.micro == self.micro_count - 1
        home = self.store.get("grad", chunk, read=not first)
        for j in range(pieces.shape[0]):  # rank order: the same sum at every world size
            src = pieces[j] if pieces.device.type == "cpu" else pieces[j].to("cpu")
            if first and j == 0:
                home.copy_(src)
            else:
                home.add_(src)
        self.copier.count("device", "host", pieces.numel() * 4)
        if last:
            home.div_(self.micro_count * self.world)
            mine = [s for s in self.my_slots[chunk] if self.params[s.index].requires_grad]
            views = [home[s.shard_offset(self.shard): s.shard_offset(self.shard) + s.numel].view(s.shape)
                     for s in mine]
            for s, n in zip(mine, torch._foreach_norm(views, 2.0) if views else []):
                self.norms[s.index] = n
        self.store.put("grad", chunk, dirty=True)
        for slot in (self.grad_slot.pop(chunk), reduce_slot):
            if slot is not None:
                self.arena.release(slot)
        self.pending.pop(chunk, None)
        self.closed.add(chunk)

    def _close_remaining(self) -> None:
        """Chunks some of whose parameters got no gradient this micro-batch: close them with zeros there
        (every rank closes every chunk, so the all-to-alls stay matched)."""
        for c in range(self.layout.n_chunks):
            if c not in self.closed:
                if c not in self.grad_slot:
                    self._open_grad(c)
                self.events("placement_unused_params", chunk=c, step=self.step_count + 1)
                self._close_grad(c)

    # ---- per-step bookkeeping -----------------------------------------------------------------------
    def _end_trace(self) -> None:
        if self.trace is not None and self.diverged_at is None and len(self.live) != len(self.trace):
            self.diverged_at = min(len(self.live), len(self.trace))
            self._expected_key = None
        if self.trace is None:
            self.trace = self.live
        elif self.diverged_at is not None:
            got = self.live.moments[self.diverged_at].key if self.diverged_at < len(self.live) else None
            self.events("placement_retrace", step=self.step_count + 1, moment=self.diverged_at,
                        expected=str(self._expected_key), got=str(got), moments=len(self.live))
            self.trace = self.live
        need = min_slots(self.trace, reduce_buffer=1 if self.world > 1 else 0)
        self.last_stats["trace_min_slots"] = need

    def _global_mean(self, losses: torch.Tensor) -> float:
        """Sum in global micro-batch order (k * world + rank), then divide: the same at every world size."""
        if self.world > 1:
            gathered = torch.empty(self.world * losses.numel(), dtype=torch.float64)
            dist.all_gather_into_tensor(gathered, losses.contiguous(), group=self.group)
            per_rank = gathered.view(self.world, -1)
        else:
            per_rank = losses.view(1, -1)
        total = 0.0
        for k in range(per_rank.shape[1]):
            for r in range(self.world):
                total += float(per_rank[r, k])
        return total / per_rank.numel()

    def _stats(self) -> None:
        """This step's figures (forward, backward and optimizer), then the counters start again."""
        stats = self.copier.stats()
        self.last_stats.update({
            "arena_peak_bytes": self.arena.peak_bytes, "arena_bytes": self.arena.allocated_bytes,
            "device_budget_bytes": self.cfg.device_budget, "host_pool_peak_bytes": self.pool.high_water,
            "host_pool_bytes": self.pool.capacity, "chunk_fetches": self.fetches, "chunk_evictions": self.evictions,
            "placement_policy": "belady" if self.policy.belady else "lru", "optimizer_kernel": self.optimizer.kernel,
            "moved_network_bytes": self.network_bytes, **stats})
        self.network_bytes = self.fetches = self.evictions = 0
        self.copier.reset_stats()
        self.arena.reset_peak()

