"""``ActivationPolicy``: wraps each transformer block's forward, measures a warm-up step, plans, and
runs every later step with each block's saved tensors kept, offloaded (alpha of its tokens) or recomputed.

Worker loop::

    policy = ActivationPolicy(cfg, model.blocks)          # DDP: ddp.module.blocks (see find_blocks)
    plan = policy.plan(lambda: lm_loss(model(x), y).backward())
    for step ...:
        with policy.step():
            loss = lm_loss(model(x), y)
            loss.backward()
        metrics.update(policy.last_stats)                 # peak_saved_bytes, ...
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.autograd.graph import saved_tensors_hooks

from ..tiers import ALIGN, HostPool
from .config import ActivationConfig
from .meter import SavedBytesMeter
from .planner import (KEEP, OFFLOAD, RECOMPUTE, BlockProfile, Choice, CostModel, Plan, build_plan, plan_blocks)
from .recompute import recompute
from .split import Probe, is_splittable, split_forward
from .stores import KeepStore, OffloadEngine

_REGIONS_PER_BLOCK = 64  # generous bound on saved tensors per block, for alignment padding
_VERIFY_TOKENS = 32  # prefix length used to check that the split reproduces the block


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``blocks`` ModuleList of a GPT, looking through DDP/compile wrappers (``.module``/``._orig_mod``)."""
    seen = model
    for _ in range(4):
        if hasattr(seen, "blocks"):
            return seen.blocks
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if seen is None:
            break
    raise ValueError(f"{type(model).__name__} has no 'blocks' ModuleList (fix: pass the blocks explicitly)")


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ActivationPolicy:
    """Per-block activation policy over ``blocks`` (the GPT's ``model.blocks``; with DDP pass
    ``find_blocks(ddp_model)``: the wrappers sit on the shared block modules, so DDP's hooks are untouched).

    ``plan(step_fn)`` once, then every step inside ``with policy.step():``. Outside ``step()`` (or with
    autograd off) the blocks run their own forward untouched. ``plan_`` is the chosen :class:`Plan`,
    ``last_stats`` the last step's meter figures, ``meter`` the live meter.
    """

    def __init__(self, cfg: ActivationConfig, blocks: nn.ModuleList | list[nn.Module]):
        if not isinstance(cfg, ActivationConfig):
            raise TypeError(f"cfg={cfg!r} must be an ActivationConfig")
        self.cfg = cfg
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("blocks=[] is empty: the policy wraps each transformer block")
        self.meter = SavedBytesMeter()
        self.keep = KeepStore(self.meter)
        self.engine: OffloadEngine | None = None
        self.pool: HostPool | None = None
        self.plan_: Plan | None = None
        self.profiles: list[BlockProfile] = []
        self.choices: list[Choice] = [Choice(KEEP)] * len(self.blocks)
        self.last_stats: dict[str, int] = {}
        self._mode = "off"
        self._probes: dict[int, dict] = {}
        self._splittable = [is_splittable(b) for b in self.blocks]
        self._originals = []
        for i, block in enumerate(self.blocks):
            original = block.forward
            self._originals.append(original)
            block.forward = self._wrap(i, original)  # instance attribute: DDP and nn.Module.__call__ use it

    def remove(self) -> None:
        """Restore the blocks' own forwards and stop the copy thread."""
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        if self.engine is not None:
            self.engine.close()

    # ---- the wrapped forward -------------------------------------------------------------------
    def _wrap(self, i: int, original: Callable) -> Callable:
        def forward(x: torch.Tensor, *args, **kwargs):
            if self._mode == "off" or not torch.is_grad_enabled():
                return original(x, *args, **kwargs)
            if self._mode == "measure":
                return self._measure_block(i, original, x, args, kwargs)
            return self._run_block(i, original, x, args, kwargs)

        return forward

    def _run_block(self, i, original, x, args, kwargs):
        choice, block = self.choices[i], self.blocks[i]
        fn = (lambda xx: original(xx, *args, **kwargs)) if (args or kwargs) else original
        if choice.decision == KEEP:
            with saved_tensors_hooks(self.keep.pack, self.keep.unpack):
                return fn(x)
        if choice.decision == RECOMPUTE:
            return recompute(fn, [x], self.keep.pack, self.keep.unpack, self.meter)
        engine = self.engine
        engine.begin_block(i)
        try:
            with saved_tensors_hooks(engine.pack, engine.unpack):
                if choice.alpha >= 1.0 or not self._splittable[i] or args or kwargs:
                    return fn(x)
                s = round(choice.alpha * x.shape[0] * x.shape[1])
                return split_forward(block, x, s, run_recompute=self._offloaded_recompute)
        finally:
            engine.end_block()

    def _offloaded_recompute(self, fn, inputs):
        return recompute(fn, inputs, self.engine.pack, self.engine.unpack, self.meter)

    # ---- warm-up measurement -------------------------------------------------------------------
    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _measure_block(self, i, original, x, args, kwargs):
        split = self._splittable[i] and not args and not kwargs
        if split and not self._verify_split(i, original, x):
            self._splittable[i] = split = False
        probe = Probe(self.meter, i, self._sync)
        self._sync()
        t0 = time.perf_counter()
        with saved_tensors_hooks(self.keep.pack, self.keep.unpack):
            if split:
                out = split_forward(self.blocks[i], x, x.shape[0] * x.shape[1], probe=probe)
            else:
                self.meter.tag = (i, "all")
                try:
                    out = original(x, *args, **kwargs)
                finally:
                    self.meter.tag = None
        self._sync()
        self._probes[i] = {
            "forward_s": time.perf_counter() - t0,
            "input_bytes": x.numel() * x.element_size(),
            "token_forward_s": probe.per_token_s,
            "split_inputs": dict(probe.input_bytes),
            "device": x.device,
        }
        return out

    def _verify_split(self, i, original, x) -> bool:
        """Check once, on a short prefix, that the split forward reproduces this block."""
        n = min(_VERIFY_TOKENS, x.shape[1])
        devices = [x.device.index or 0] if x.is_cuda else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            state = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            ref = original(x[:, :n])
            torch.set_rng_state(state[0])
            for d, s in zip(devices, state[1]):
                torch.cuda.set_rng_state(s, d)
            got = split_forward(self.blocks[i], x[:, :n], x.shape[0] * n // 2, run_recompute=lambda fn, ins: fn(*ins))
        return bool(torch.allclose(ref, got, rtol=1e-4, atol=1e-5))

    def _measure_bandwidth(self, device: torch.device, nbytes: int) -> float:
        nbytes = int(min(max(nbytes, 4 << 20), 256 << 20))
        cuda = device.type == "cuda"
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        dst.copy_(src)  # first touch of the destination pages is not bandwidth
        best = float("inf")
        for _ in range(3):
            self._sync()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=cuda)
            self._sync()
            best = min(best, time.perf_counter() - t0)
        return nbytes / max(best, 1e-9)

    def measure(self, step_fn: Callable[[], object]) -> tuple[list[BlockProfile], int, float, float]:
        """Run ``step_fn`` (one forward, with or without backward) measuring every block."""
        self._refresh_ignored()
        self.meter.reset_peak()
        self._probes.clear()
        self._mode = "measure"
        try:
            self._sync()
            t0 = time.perf_counter()
            step_fn()
            self._sync()
            step_s = time.perf_counter() - t0
        finally:
            self._mode = "off"
            self.meter.tag = None
        missing = [i for i in range(len(self.blocks)) if i not in self._probes]
        if missing:
            raise RuntimeError(f"the warm-up step never ran blocks {missing} with autograd enabled")
        tags = self.meter.bytes_by_tag
        profiles = []
        for i, m in sorted(self._probes.items()):
            tok_a, tok_b = tags.get((i, "token_a"), 0), tags.get((i, "token_b"), 0)
            core, whole = tags.get((i, "core"), 0), tags.get((i, "all"), 0)
            inp = m["split_inputs"]
            profiles.append(BlockProfile(
                index=i, saved_bytes=tok_a + tok_b + core + whole, input_bytes=m["input_bytes"],
                forward_s=m["forward_s"], splittable=self._splittable[i], token_bytes=tok_a + tok_b, core_bytes=core,
                split_input_bytes=inp["token_a"] + inp["token_b"], token_forward_s=m["token_forward_s"],
                recompute_bytes=max(tok_a - inp["token_a"], tok_b - inp["token_b"], 0),
            ))
        no_policy_peak = self.meter.peak
        device = self._probes[0]["device"]
        bandwidth = self._measure_bandwidth(device, max(p.saved_bytes for p in profiles))
        return profiles, no_policy_peak, step_s, bandwidth

    # ---- planning ------------------------------------------------------------------------------
    def host_capacity(self) -> int:
        if self.cfg.host_pool_bytes:
            return self.cfg.host_pool_bytes
        return int(self.cfg.host_pool_max_fraction * total_ram_bytes())

    def plan(self, step_fn: Callable[[], object]) -> Plan:
        """Measure one warm-up step, choose per block, size the host pool once. Raises PlanInfeasible.

        ``step_fn`` runs one forward (a backward too is fine: it also warms kernels up, but leaves
        gradients on the parameters, so zero them before the first real step). The budget fraction
        is of the peak measured here.
        """
        profiles, peak, step_s, bandwidth = self.measure(step_fn)
        self.profiles = profiles
        cuda = self._probes[0]["device"].type == "cuda"
        cost = CostModel(bandwidth=bandwidth, cuda=cuda)
        # every pool region may lose up to ALIGN bytes to alignment: keep that much of the pool spare
        capacity = max(0, self.host_capacity() - _REGIONS_PER_BLOCK * ALIGN * len(profiles))
        budget = self.cfg.budget_bytes(peak)
        choices = plan_blocks(profiles, mode=self.cfg.activations, budget=budget, host_capacity=capacity,
                              cost=cost, alpha=self.cfg.alpha, alpha_steps=self.cfg.alpha_steps)
        plan = build_plan(profiles, choices, mode=self.cfg.activations, budget=budget, no_policy_peak=peak,
                          cost=cost, host_capacity=capacity, baseline_step_s=step_s)
        unsplit = [p.index for p in profiles if not p.splittable]
        if unsplit and self.cfg.activations in ("offload", "auto"):
            plan.notes.append(f"blocks {unsplit} are not token-splittable: offloaded whole (alpha=1) or recomputed")
        self._install(plan, choices)
        return plan

    def install(self, plan: Plan, choices: list[Choice], *, host_pool_bytes: int) -> None:
        """Run with ``choices`` planned by the caller (a pipeline plans each rank over its own stages
        and in-flight microbatches) and, if any block offloads, a host pool of ``host_pool_bytes``,
        allocated once (the caller carves it per microbatch; see :meth:`OffloadEngine.use_pool`)."""
        self._install(plan, choices, host_pool_bytes)

    @staticmethod
    def padding_bytes(n_blocks: int) -> int:
        """Host bytes one forward's regions of ``n_blocks`` blocks may lose to alignment."""
        return _REGIONS_PER_BLOCK * ALIGN * n_blocks

    def _install(self, plan: Plan, choices: list[Choice], size: int | None = None) -> None:
        self.plan_, self.choices = plan, choices
        if not any(c.decision == OFFLOAD for c in choices):
            return
        # room for every region's alignment padding, then never more than the capacity
        size = size or self.cfg.host_pool_bytes or min(self.host_capacity(),
                                                       plan.host_bytes + self.padding_bytes(len(choices)))
        if self.pool is None or self.pool.capacity != size:
            if self.engine is not None:
                self.engine.close()
            device = self._probes[0]["device"]
            self.pool = HostPool(size, pin=device.type == "cuda")
            self.engine = OffloadEngine(self.pool, self.meter, min_bytes=self.cfg.offload_min_bytes,
                                        prefetch_blocks=self.cfg.prefetch_blocks)
        plan.notes.append(f"host pool: {size} bytes{' pinned' if self.pool.pinned else ''}, allocated once")

    def _refresh_ignored(self) -> None:
        ignored = {p.untyped_storage().data_ptr() for b in self.blocks for p in b.parameters()}
        if self.pool is not None:
            ignored.add(self.pool.storage_ptr)
        self.meter.ignored = ignored

    # ---- training steps ------------------------------------------------------------------------
    @contextmanager
    def step(self) -> Iterator["ActivationPolicy"]:
        """Wrap one forward + backward. Afterwards ``last_stats`` holds this step's meter figures."""
        if self.plan_ is None and self.cfg.activations != "none":
            raise RuntimeError("ActivationPolicy.step() before plan(): call policy.plan(warmup_step) first")
        self._refresh_ignored()
        if self.engine is not None:
            self.engine.begin_step()
            self.engine.copier.reset_stats()
        self.meter.reset_peak()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._mode = "run"
        try:
            yield self
        finally:
            self._mode = "off"
            if self.engine is not None:
                self.engine.finish_forward()
            self.last_stats = self.meter.snapshot()
            if self.pool is not None:
                self.last_stats["host_pool_used_bytes"] = self.pool.high_water
            if self.engine is not None:
                self.last_stats.update(self.engine.copier.stats())
