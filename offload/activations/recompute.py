"""Drop a function's saved tensors in forward and recompute them on first use in backward.

Like ``torch.utils.checkpoint(use_reentrant=False)`` (one graph, so DDP's hooks fire once per
parameter), with two differences we need: the inputs are packed by the enclosing store (kept on
the device, or offloaded to the host pool), and the recomputed tensors are metered while autograd
holds them, so the measured peak includes the recompute transient. RNG state (CPU and the
inputs' CUDA devices) and autocast state are captured and replayed, so dropout masks match.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.graph import saved_tensors_hooks

from .meter import SavedBytesMeter


class _RngState:
    def __init__(self, tensors: list[torch.Tensor]):
        self.devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.autocast = {
            dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda")
        }

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)


class _Slot:
    __slots__ = ("frame", "index")

    def __init__(self, frame: "_Frame", index: int):
        self.frame, self.index = frame, index

    def __del__(self) -> None:
        self.frame.drop(self.index)


class _Frame:
    def __init__(self, fn: Callable, packed_inputs: list, grads: list[bool], unpack: Callable, meter: SavedBytesMeter):
        self.fn, self.packed_inputs, self.grads, self.unpack_input, self.meter = fn, packed_inputs, grads, unpack, meter
        self.rng: _RngState | None = None
        self.count = 0
        self.recomputed: dict[int, tuple[torch.Tensor, object]] | None = None

    def pack(self, t: torch.Tensor) -> _Slot:
        slot = _Slot(self, self.count)
        self.count += 1
        return slot

    def unpack(self, slot: _Slot) -> torch.Tensor:
        if self.recomputed is None:
            self._recompute()
        return self.recomputed[slot.index][0]

    def drop(self, index: int) -> None:
        if self.recomputed is not None and index in self.recomputed:
            _, key = self.recomputed.pop(index)
            self.meter.release(key)

    def _recompute(self) -> None:
        inputs = [
            self.unpack_input(p).detach().requires_grad_(g) if isinstance(g, bool) else p
            for p, g in zip(self.packed_inputs, self.grads)
        ]
        harvested: dict[int, tuple[torch.Tensor, object]] = {}

        def harvest(t: torch.Tensor) -> None:
            t = t.detach()
            harvested[len(harvested)] = (t, self.meter.add(t))

        with torch.random.fork_rng(devices=self.rng.devices), torch.enable_grad():
            self.rng.restore()
            (cpu_on, cpu_dt), (cuda_on, cuda_dt) = self.rng.autocast["cpu"], self.rng.autocast["cuda"]
            with torch.autocast("cpu", dtype=cpu_dt, enabled=cpu_on), torch.autocast(
                "cuda", dtype=cuda_dt, enabled=cuda_on and torch.cuda.is_available()
            ), saved_tensors_hooks(harvest, _never):
                self.fn(*inputs)
        if len(harvested) != self.count:
            raise RuntimeError(
                f"recompute saved {len(harvested)} tensors but forward saved {self.count}: the function is not "
                "deterministic in its graph (data-dependent control flow?)"
            )
        self.recomputed = harvested


def _never(_):
    raise RuntimeError("a recomputed graph was used for backward; only its saved tensors should be")


def recompute(fn: Callable, inputs: list, store_pack: Callable, store_unpack: Callable, meter: SavedBytesMeter):
    """Run ``fn(*inputs)`` keeping only its inputs (through the enclosing store); recompute the rest.

    ``inputs`` may contain None (passed through). Returns ``fn``'s output, attached to the graph.
    """
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    packed = [store_pack(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    grads = [x.requires_grad if isinstance(x, torch.Tensor) else None for x in inputs]
    frame = _Frame(fn, packed, grads, store_unpack, meter)
    frame.rng = _RngState(tensors)
    with saved_tensors_hooks(frame.pack, frame.unpack):
        return fn(*inputs)
