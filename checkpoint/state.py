"""Training state ⇄ flat ``{name: tensor}`` + JSON-able metadata (no pickle anywhere)."""

from __future__ import annotations

from typing import Any

import torch


def flatten_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model parameters/buffers under ``model.``, optimizer tensors under ``optim.<param>.<key>``."""
    tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"param_groups": [], "scalars": {}}
    if optimizer is not None:
        sd = optimizer.state_dict()
        meta["param_groups"] = sd["param_groups"]
        for idx, state in sd["state"].items():
            for key, value in state.items():
                name = f"optim.{idx}.{key}"
                if torch.is_tensor(value):
                    tensors[name] = value.detach()
                else:
                    meta["scalars"][name] = value
    return tensors, meta


def restore_training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = set(model.state_dict()) - set(model_sd)
    if missing:
        raise ValueError(f"checkpoint lacks model tensors: {sorted(missing)[:5]}")
    model.load_state_dict(model_sd, strict=True)
    if optimizer is None:
        return
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
