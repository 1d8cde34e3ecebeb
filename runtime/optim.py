"""The optimizers of a rank: AdamW for dense parameters, plus each memory layer's own value optimizer.

``OptimizerSet`` puts them behind one ``step``/``zero_grad``/``state_dict`` so checkpointing sees a
single optimizer (state indices and param groups are offset per member, and split back on load).
"""

from __future__ import annotations

from typing import Any

import torch

from trainmem.memory_services import memory_layers, value_optimizer

from .config import TrainConfig


class OptimizerSet:
    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for member, opt in enumerate(self.optimizers):
            sd = opt.state_dict()
            for idx, s in sd["state"].items():
                state[idx + offset] = s
            for g in sd["param_groups"]:
                groups.append({**g, "params": [i + offset for i in g["params"]], "member": member})
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        offset = 0
        for member, opt in enumerate(self.optimizers):
            groups = [g for g in sd["param_groups"] if g["member"] == member]
            n = sum(len(g["params"]) for g in groups)
            opt.load_state_dict({
                "state": {i - offset: s for i, s in sd["state"].items() if offset <= int(i) < offset + n},
                "param_groups": [{k: (v if k != "params" else [i - offset for i in v])
                                  for k, v in g.items() if k != "member"} for g in groups],
            })
            offset += n


def build_optimizer(model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: TrainConfig) -> OptimizerSet:
    """AdamW over ``params`` except memory-layer value rows, which get their layer's own optimizer."""
    mine = {id(p) for p in params}
    value_ids: set[int] = set()
    optimizers: list[torch.optim.Optimizer] = []
    for layer in memory_layers(model):
        values = [p for p in layer.value_parameters() if id(p) in mine]
        value_ids |= {id(p) for p in values}
        if values:
            optimizers.append(value_optimizer(values, layer.value_lr, layer.sparse_values))
    dense = [p for p in params if id(p) not in value_ids]
    return OptimizerSet([torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay), *optimizers])
