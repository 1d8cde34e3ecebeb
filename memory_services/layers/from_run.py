"""Memory layers and runs: take a trained layer out of a run's checkpoint, and put a served one back in.

A run directory holds ``spec.json`` (the resolved job spec) and durable checkpoints read through
``trainmem.checkpoint.DurableStore``; tensors are named ``model.<state_dict key>``, so block L's
layer is ``model.blocks.L.mlp.*``. The newest intact step is used: a step that fails its
checksum (``CheckpointCorrupt``) is skipped, and the next older one tried.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ProductKeyConfig, ServicesConfig
from ..store import MemoryStore
from .layer_store import LayerChain, LayerStore, chain_key
from .product_key import ProductKeyMemory

SPEC_FILE = "spec.json"


def _spec(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"memory_layer.from_run={str(run_dir)!r} is not a trainmem run directory (no {SPEC_FILE}; "
                         "fix: pass the run_dir a `trainmem launch` wrote)")
    return json.loads(path.read_text())


def run_layer_config(run_dir: str | Path, layer: int = -1) -> tuple[int, ProductKeyConfig]:
    """(block index, layer config) of a run's memory layer; ``layer=-1`` takes the run's only one."""
    run_dir = Path(run_dir)
    spec = _spec(run_dir)
    model = spec.get("model", {})
    memory = list(model.get("memory_layers", []))
    if not memory:
        raise ValueError(f"memory_layer.from_run={str(run_dir)!r}: the run has no memory layers "
                         "(model.memory_layers = [])")
    if layer == -1:
        if len(memory) > 1:
            raise ValueError(f"memory_layer.layer=-1 but run {run_dir} has memory layers {memory} "
                             "(fix: set memory_layer.layer)")
        layer = memory[0]
    if layer not in memory:
        raise ValueError(f"memory_layer.layer={layer} is not a memory layer of run {run_dir} "
                         f"(its memory_layers: {memory})")
    if int(spec.get("pipeline", {}).get("stages", 1)) > 1:
        raise ValueError(f"memory_layer.from_run={str(run_dir)!r} is a pipeline run: its layers are split over per-rank "
                         "checkpoints, which serving does not read yet (fix: serve a data-parallel run)")
    known = {f.name for f in fields(ProductKeyConfig)}
    table = {k: v for k, v in model.get("product_key", {}).items() if k in known}
    return layer, ProductKeyConfig(**{**table, "d_model": int(model["d_model"])})


def newest_intact(run_dir: Path):
    """The newest checkpoint of the run that passes its checksums (older ones are tried in turn)."""
    from trainmem.checkpoint import CheckpointCorrupt, DurableStore

    store = DurableStore(run_dir / "checkpoints")
    skipped = []
    for step in reversed(store.steps()):
        try:
            return store.load(step), skipped
        except CheckpointCorrupt as e:
            skipped.append(f"step {step}: {e}")
    detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    raise ValueError(f"memory_layer.from_run={str(run_dir)!r} has no intact checkpoint{detail} (fix: train with "
                     "checkpoint.every_steps > 0, or point at another run)")


def load_run_layer(run_dir: str | Path, layer: int = -1) -> tuple[ProductKeyMemory, dict[str, Any]]:
    """Block ``layer``'s trained memory layer and its origin {kind, run_dir, layer, step}."""
    run_dir = Path(run_dir).resolve()
    layer, cfg = run_layer_config(run_dir, layer)
    ckpt, skipped = newest_intact(run_dir)
    prefix = f"model.blocks.{layer}.mlp."
    state = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    module = ProductKeyMemory(cfg)
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise ValueError(f"run {run_dir} step {ckpt.step}: block {layer}'s layer does not match its spec "
                         f"(model.product_key): {diff}")
    module.load_state_dict(state)
    return module, {"kind": "run", "run_dir": str(run_dir), "layer": layer, "step": ckpt.step, "skipped": skipped}


def ensure_layer_chain(store: MemoryStore, cfg: ServicesConfig) -> LayerChain:
    """The served layer's committed chain, creating version 0 (from the run, or fresh) if there is none."""
    key = chain_key(cfg.consolidation.job_name)
    layers = LayerStore(cfg.layer_dir)
    raw = store.kv().get(key)
    if raw:
        chain = LayerChain.from_json(raw)
        _check_origin(layers, chain, cfg)
        return chain
    if cfg.memory_layer.from_run:
        layer, origin = load_run_layer(cfg.memory_layer.from_run, cfg.memory_layer.layer)
    else:
        from .distill import new_layer

        layer, origin = new_layer(cfg.memory_layer.layer_config()), {"kind": "fresh", "seed": 0}
    cfg.memory_layer.check_against(layer.cfg, f"run {origin.get('run_dir')}" if origin["kind"] == "run" else "it")
    base = layers.write_base(layer, 0, origin)
    with store.transaction() as txn:
        if txn.kv.get(key):  # another process set it up first: use theirs
            raw = txn.kv[key]
        else:
            raw = txn.kv[key] = LayerChain(0, base, 0, []).to_json()
    chain = LayerChain.from_json(raw)
    if base not in chain.files():
        (layers.dir / base).unlink(missing_ok=True)
    _check_origin(layers, chain, cfg)
    return chain


def _check_origin(layers: LayerStore, chain: LayerChain, cfg: ServicesConfig) -> None:
    layer_cfg, origin = layers.config(chain)
    want_run = str(Path(cfg.memory_layer.from_run).resolve()) if cfg.memory_layer.from_run else ""
    if want_run and (origin.get("kind") != "run" or origin.get("run_dir") != want_run
                     or cfg.memory_layer.layer not in (-1, origin.get("layer"))):
        raise ValueError(f"memory_layer.from_run={cfg.memory_layer.from_run!r} but the store at {cfg.store_path} "
                         f"serves {origin} (fix: use another services.store_path for another layer)")
    cfg.memory_layer.check_against(layer_cfg, f"the served layer in {cfg.store_path}")


def served_chain(store_dir: Path) -> tuple[LayerStore, LayerChain]:
    """The committed layer chain of a memory store directory (its only one, or the default job's)."""
    manifest = json.loads((store_dir / "MANIFEST.json").read_text())
    kv = MemoryStore(store_dir, int(manifest["dim"])).kv()
    chains = {k: v for k, v in kv.items() if k.startswith("layer.")}
    if not chains:
        raise ValueError(f"{store_dir}: this memory store serves no memory layer yet (fix: trainmem serve it first)")
    raw = chains.get(chain_key("default")) or (next(iter(chains.values())) if len(chains) == 1 else None)
    if raw is None:
        raise ValueError(f"{store_dir}: several layer chains ({sorted(chains)}); none is the default job's")
    return LayerStore(store_dir / "layer"), LayerChain.from_json(raw)


def _memory_blocks(model: nn.Module) -> dict[int, ProductKeyMemory]:
    return {i: b.mlp for i, b in enumerate(getattr(model, "blocks", [])) if isinstance(b.mlp, ProductKeyMemory)}


def _check_same(target: ProductKeyConfig, source: ProductKeyConfig, where: str) -> None:
    mismatch = [f for f in ("d_model", "heads", "n_keys", "k_dim", "topk", "v_dim", "gated")
                if getattr(target, f) != getattr(source, f)]
    if mismatch:
        f = mismatch[0]
        raise ValueError(f"model.product_key.{f}={getattr(target, f)} but {where} has {f}={getattr(source, f)} "
                         f"(fix: set model.product_key.{f} = {getattr(source, f)!r})")


def _copy_into(target: ProductKeyMemory, source: ProductKeyMemory, where: str) -> None:
    _check_same(target.cfg, source.cfg, where)
    with torch.no_grad():
        for name, tensor in source.state_dict().items():
            target.state_dict()[name].copy_(tensor)


def init_memory(model: nn.Module, source: str | Path) -> dict[str, Any]:
    """Load memory-layer values into ``model``: every matching block from a run directory, or the
    served layer's latest committed version from a memory store. Returns what was loaded (with a
    sha256 of each block's tensors as they are now in the model)."""
    source = Path(source)
    blocks = _memory_blocks(model)
    if (source / SPEC_FILE).is_file():
        run_blocks = json.loads((source / SPEC_FILE).read_text()).get("model", {}).get("memory_layers", [])
        todo = sorted(set(blocks) & set(run_blocks))
        if not todo:
            raise ValueError(f"--init-memory-from {source}: the run's memory layers {run_blocks} and this model's "
                             f"{sorted(blocks)} share no block (fix: model.memory_layers)")
        origin: dict[str, Any] = {"kind": "run", "run_dir": str(source.resolve())}
        for i in todo:
            layer, info = load_run_layer(source, i)
            _copy_into(blocks[i], layer, f"run {source} block {i}")
            origin["step"] = info["step"]
    elif (source / "MANIFEST.json").is_file():
        layers, chain = served_chain(source)
        _, layer_origin = layers.config(chain)
        i = layer_origin.get("layer")
        if layer_origin.get("kind") != "run" or i not in blocks:
            raise ValueError(f"--init-memory-from {source}: the served layer came from {layer_origin}, which names "
                             f"no memory block of this model (its memory blocks: {sorted(blocks)})")
        todo = [i]
        _copy_into(blocks[i], layers.load_layer(chain), f"the layer served from {source}")
        origin = {"kind": "store", "store": str(source.resolve()), "version": chain.version, "layer": i}
    else:
        raise ValueError(f"--init-memory-from {source}: neither a run directory (spec.json) nor a memory store "
                         "(MANIFEST.json)")
    origin["sha256"] = {str(i): _sha256(blocks[i]) for i in todo}
    return origin


def plan_memory_init(source: str | Path, spec: Any) -> tuple[str, int]:
    """For ``trainmem launch --init-memory-from``: check the source against the job's model (no tensors
    read) and return (absolute source, the step whose restore it follows: 0, or the resumed step)."""
    from trainmem.checkpoint import DurableStore

    path = Path(source).resolve()
    blocks, want = list(spec.model.memory_layers), spec.model.memory_layer_config()
    if not blocks:
        raise ValueError("--init-memory-from: model.memory_layers is empty, so there is no layer to initialise")
    if (path / SPEC_FILE).is_file():
        run_blocks = _spec(path).get("model", {}).get("memory_layers", [])
        common = sorted(set(blocks) & set(run_blocks))
        if not common:
            raise ValueError(f"--init-memory-from {source}: the run's memory layers {run_blocks} and the job's "
                             f"{blocks} share no block (fix: model.memory_layers)")
        for i in common:
            _check_same(want, run_layer_config(path, i)[1], f"run {source} block {i}")
    elif (path / "MANIFEST.json").is_file():
        layers, chain = served_chain(path)
        cfg, origin = layers.config(chain)
        if origin.get("kind") != "run" or origin.get("layer") not in blocks:
            raise ValueError(f"--init-memory-from {source}: the served layer came from {origin}, not from one of "
                             f"the job's memory blocks {blocks}")
        _check_same(want, cfg, f"the layer served from {source}")
    else:
        raise ValueError(f"--init-memory-from {source}: neither a run directory (spec.json) nor a memory store "
                         "(MANIFEST.json)")
    return str(path), DurableStore(spec.checkpoint_dir).latest_step() or 0


def maybe_init_memory(model: nn.Module, model_cfg: Any, restored_step: int) -> dict[str, Any]:
    """The worker's call after restoring: apply ``model_cfg.init_memory_from`` only when the restored
    step is the one the launch started from, so a later restart keeps what training did since."""
    source = getattr(model_cfg, "init_memory_from", "")
    if not source or restored_step != getattr(model_cfg, "init_memory_step", 0):
        return {}
    return init_memory(model, source)


def _sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def layer_sha256(layer: ProductKeyMemory) -> str:
    """The same digest ``init_memory`` reports, for checking a layer from outside."""
    return _sha256(layer)

