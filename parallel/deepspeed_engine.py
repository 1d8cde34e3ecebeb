"""``DeepSpeedEngine``: DeepSpeed ZeRO (stage 1, 2 or 3, with its CPU offload) inside a trainmem rank.

DeepSpeed runs on the process group the rank already formed (``dist_init_required=False``: its
``comm`` wraps torch.distributed's default group instead of starting one), so trainmem's failure
detection, snapshots and restore apply to ZeRO jobs unchanged.

Checkpoint state is each rank's own ZeRO partition as DeepSpeed holds it: per parameter group the
flat fp32 partition and AdamW's ``exp_avg``/``exp_avg_sq`` over it, plus a table saying which
elements of which parameter each rank holds (``layout``, every rank's, gathered once). Restoring
copies, parameter by parameter, the overlap of the old ranks' pieces with this rank's pieces, so
one format restores at the same world size (each rank reads only its own state) and at any other
(trainmem's reshard; DeepSpeed's universal checkpoint needs its pickled checkpoint files, which
trainmem never reads). Loading makes no collective call (ranks that fail to read a candidate must
not leave the others waiting inside one); the module's own weights are refreshed from the fp32
partitions at the next step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from trainmem.native import import_deepspeed
from trainmem.offload import extensions_dir

from .deepspeed_config import build_deepspeed_json

CHECKPOINT_FORMAT = "trainmem-deepspeed-v1"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
StateReader = Callable[[int], tuple[dict[str, torch.Tensor], dict[str, Any]]]


def _all_gather_json(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's ``obj`` (JSON-able), through the process group as bytes (no pickle)."""
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [json.loads(bytes(o[: int(s.item())].cpu().tolist()).decode()) for o, s in zip(out, sizes)]


class DeepSpeedEngine:
    """The runtime's engine contract over ``deepspeed.initialize`` (see ``trainmem.runtime.engines.Engine``)."""

    def __init__(self, model: nn.Module, deepspeed_config: dict[str, Any], *, batch_size: int, lr: float,
                 weight_decay: float, grad_clip: float, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 device: torch.device):
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine runs on an initialized process group (the rank's own)")
        self.device = torch.device(device)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        extensions_dir()  # DeepSpeedCPUAdam (offloaded optimizer) is JIT-built once and cached there
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # DeepSpeed reads the rank layout from the environment; the group itself is already formed.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0")
        deepspeed = import_deepspeed()

        self.config = build_deepspeed_json(deepspeed_config, batch_size=batch_size, lr=lr,
                                           weight_decay=weight_decay, grad_clip=grad_clip)
        self.ds, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=self.config,
                                           dist_init_required=False)
        self.model, self.loss_fn, self.batch_size = model, loss_fn, batch_size
        self.stage = int(self.ds.zero_optimization_stage())
        self.zero = self.ds.optimizer
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        self.layout = _all_gather_json(self._my_pieces(), self.device if self.device.type == "cuda" else
                                       torch.device("cpu"))
        self._weights_stale = False
        self.last_stats: dict[str, Any] = {"zero_stage": self.stage}

    # ---- the rank's partition -------------------------------------------------------------------
    def _flats(self) -> list[torch.Tensor]:
        """The flat fp32 partition of each parameter (sub)group: what AdamW steps on this rank."""
        if self.stage < 3:
            return list(self.zero.single_partition_of_fp32_groups)
        return list(self.zero.fp32_partitioned_groups_flat)

    def _my_pieces(self) -> dict[str, list[int]]:
        """name -> [group, offset in the group's flat partition, offset in the flattened parameter, numel]."""
        pieces: dict[str, list[int]] = {}
        if self.stage < 3:
            for g, params in enumerate(self.zero.bit16_groups):
                for p in params:
                    m = p._hp_mapping
                    if m is not None and m.lp_fragment_address.numel > 0:
                        pieces[self.names[id(p)]] = [g, m.hp_fragment_address.start, m.lp_fragment_address.start,
                                                     m.lp_fragment_address.numel]
            return pieces
        for p in self.model.parameters():
            g, offset, part = self.zero.grad_position[self.zero.get_param_id(p)]
            start = self.rank * p.partition_numel()
            numel = min(part, p.ds_numel - start)
            if numel > 0:
                pieces[self.names[id(p)]] = [int(g), int(offset), start, numel]
        return pieces

    def _optimizer_state(self, flat: torch.Tensor) -> dict[str, Any]:
        return self.zero.optimizer.state.get(flat, {})

    # ---- the step -------------------------------------------------------------------------------
    def on_new_group(self) -> None:
        raise RuntimeError("DeepSpeed's engine keeps the process groups it was built on and cannot re-form them "
                           "(the controller restarts the whole group instead)")

    @property
    def replica_group_key(self) -> str:
        return f"deepspeed-rank-{self.rank}"  # every rank holds its own ZeRO partition

    @property
    def data_rank_world(self) -> tuple[int, int]:
        return self.rank, self.world

    def _refresh_weights(self) -> None:
        """After a restore: the module's weights from the restored fp32 partitions (stage 1/2 all-gathers)."""
        if not self._weights_stale:
            return
        if self.stage < 3:
            self.zero.update_lp_params()
        self._weights_stale = False

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self._refresh_weights()
        loss = self.loss_fn(self.ds(x), y)
        self.ds.backward(loss)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return mean.item() / self.world

    def clip(self, max_norm: float) -> None:
        """DeepSpeed clips inside its step, to ``gradient_clipping`` (set from train.grad_clip)."""
        if max_norm != self.config["gradient_clipping"]:
            raise ValueError(f"train.grad_clip={max_norm} but DeepSpeed was built with gradient_clipping="
                             f"{self.config['gradient_clipping']}")

    def optimizer_step(self) -> None:
        self.ds.step()

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        steps = []
        for g, flat in enumerate(self._flats()):
            state = self._optimizer_state(flat)
            tensors[f"fp32/{g}"] = flat.detach()
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{key}/{g}"] = state[key] if key in state else torch.zeros_like(flat)
            steps.append(int(state.get("step", 0)))
        meta = {"format": CHECKPOINT_FORMAT, "zero_stage": self.stage, "rank": self.rank, "world": self.world,
                "steps": steps, "global_steps": int(self.ds.global_steps), "shapes": self.shapes,
                "layout": self.layout}
        return tensors, meta

    def load_checkpoint(self, read: StateReader, saved_world: int) -> None:
        cache: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

        def get(r: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            if r not in cache:
                cache[r] = read(r)
                if cache[r][1].get("format") != CHECKPOINT_FORMAT:
                    raise ValueError(f"checkpoint of old rank {r} is not a DeepSpeed-engine checkpoint "
                                     f"(format {cache[r][1].get('format')!r}; was it written by another engine?)")
            return cache[r]

        own = min(self.rank, saved_world - 1)
        meta = get(own)[1]
        old_layout = meta["layout"]
        if int(meta["world"]) != saved_world or len(old_layout) != saved_world:
            raise ValueError(f"checkpoint says world {meta['world']} ({len(old_layout)} layouts), caller says "
                             f"{saved_world}")
        if meta["shapes"] != self.shapes:
            differ = sorted(n for n in set(meta["shapes"]) | set(self.shapes) if meta["shapes"].get(n) != self.shapes.get(n))
            raise ValueError(f"checkpoint parameters do not match the model (differing: {differ[:3]})")
        flats = self._flats()
        fresh = {key: [torch.zeros_like(f) for f in flats] for key in STATES}
        for name, (g, offset, start, numel) in self.layout[self.rank].items():
            copied = 0
            for r, pieces in enumerate(old_layout):
                if name not in pieces:
                    continue
                og, ooffset, ostart, onumel = pieces[name]
                lo, hi = max(start, ostart), min(start + numel, ostart + onumel)
                if lo >= hi:
                    continue
                src = get(r)[0]
                for key in STATES:
                    fresh[key][g][offset + lo - start: offset + hi - start].copy_(
                        src[f"{key}/{og}"][ooffset + lo - ostart: ooffset + hi - ostart])
                copied += hi - lo
            if copied != numel:
                raise ValueError(f"checkpoint holds {copied} of the {numel} elements of {name} this rank needs")
        steps = meta["steps"]
        if len(set(steps)) != 1:
            raise ValueError(f"checkpoint parameter groups were stepped unequally ({steps})")
        self._install(flats, fresh, steps[0])
        self.ds.global_steps = self.ds.micro_steps = int(meta["global_steps"])
        self.ds.global_samples = int(meta["global_steps"]) * self.batch_size * self.world

    def _install(self, flats: list[torch.Tensor], fresh: dict[str, list[torch.Tensor]], step: int) -> None:
        """Write restored partitions into DeepSpeed's own tensors (in place: its views stay valid)."""
        torch_step = isinstance(self.zero.optimizer, (torch.optim.Adam, torch.optim.AdamW))  # DeepSpeedCPUAdam: an int
        for g, flat in enumerate(flats):
            with torch.no_grad():
                flat.copy_(fresh["fp32"][g])
            state = self.zero.optimizer.state.setdefault(flat, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].copy_(fresh[key][g])
                else:
                    state[key] = fresh[key][g].to(flat.device)
            state["step"] = torch.tensor(float(step)) if torch_step else step
            if self.stage == 3:
                self.zero._reassign_or_swap_out_partitioned_parameters(g)  # local: partition -> module shards
        self._weights_stale = self.stage < 3

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter, whole, on every rank."""
        self._refresh_weights()
        if self.stage < 3:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        deepspeed = import_deepspeed()

        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
