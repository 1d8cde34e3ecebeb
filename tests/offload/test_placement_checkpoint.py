"""[placement] checkpoints: chunk shards as stored + the name -> (chunk, offset) map. Written at world 2 through
per-rank durable stores, restored at world 1 and at another chunk size, the run continues bitwise; `trainmem
export` writes the plain state dict of the newest intact step and walks back past a corrupted one."""

from __future__ import annotations

import pytest
import torch
from placement_helpers import batches, make_engine, run_ranks, train
from safetensors.torch import load_file

from trainmem.checkpoint import DurableStore
from trainmem.launch.cli import main
from trainmem.offload import PlacementConfig
from trainmem.offload.params.layout import smallest_chunk_elems

DEVICE = 300_000
DATA = batches(4)


def write_at_world_2(rank: int, world: int, run_dir: str):
    engine = make_engine(PlacementConfig(device_bytes=2 * DEVICE, optimizer="torch"))
    mine = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in DATA]
    store = DurableStore(f"{run_dir}/checkpoints/rank-{rank}", keep=3)
    out = {}
    for step in (2, 4):
        train(engine, mine[step - 2: step])
        tensors, meta = engine.state_for_checkpoint()
        assert all(t.data_ptr() == engine.store.host[name.split("/")[0], int(name.split("/")[1])].data_ptr()
                   for name, t in tensors.items())  # host shards are handed over as stored: no copy
        store.save(step, tensors, meta)
        out.update({f"step{step}/{k}": v for k, v in engine.full_state_dict().items()})
    return out, {"chunk_bytes": engine.layout.chunk_bytes}


def _reader(run_dir, step):
    def read(r):
        got = DurableStore(run_dir / "checkpoints" / f"rank-{r}").load(step)
        return got.tensors, got.meta
    return read


@pytest.mark.slow
def test_world_2_checkpoint_restores_at_world_1_and_another_chunk_size(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (saved, meta), _ = run_ranks(write_at_world_2, 2, tmp_path / "ranks", str(run_dir))
    names = [k.split("/", 1)[1] for k in saved if k.startswith("step4/")]
    engine = make_engine(PlacementConfig(device_bytes=DEVICE, optimizer="torch", micro_batches=2))
    from trainmem.runtime.models import build

    shapes = [(n, tuple(p.shape)) for n, p in build(engine.model.cfg, 0).named_parameters()]
    other = 3 * smallest_chunk_elems(shapes, 1) * 4
    for chunk_bytes in ("auto", other):
        engine = make_engine(PlacementConfig(device_bytes=max(DEVICE, 4 * other), optimizer="torch", micro_batches=2,
                                             chunk_bytes=chunk_bytes))
        assert engine.layout.chunk_bytes != meta["chunk_bytes"]
        engine.load_checkpoint(_reader(run_dir, 2), saved_world=2)
        assert engine.step_count == 2
        restored = engine.full_state_dict()
        assert all(torch.equal(restored[n], saved[f"step2/{n}"]) for n in names)
        train(engine, DATA[2:4])  # 1 rank x 2 micro-batches = the 2 ranks' arithmetic
        final = engine.full_state_dict()
        for n in names:
            assert torch.equal(final[n], saved[f"step4/{n}"]), (chunk_bytes, n)

    out = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir), str(out)]) == 0
    exported = load_file(str(out))
    assert sorted(exported) == sorted(names)
    assert all(torch.equal(exported[n], saved[f"step4/{n}"]) for n in names)

    shard = run_dir / "checkpoints" / "rank-1" / "step-00000004" / "state.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "skipping step 4" in capsys.readouterr().err
    exported = load_file(str(out))
    assert all(torch.equal(exported[n], saved[f"step2/{n}"]) for n in names)


def test_export_refuses_a_run_without_checkpoints(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no durable checkpoint" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x.safetensors")]) == 2


def test_load_refuses_another_model(tmp_path):
    engine = make_engine(PlacementConfig(device_bytes=DEVICE, optimizer="torch"))
    tensors, meta = engine.state_for_checkpoint()
    meta = {**meta, "params": {("x" + k): v for k, v in meta["params"].items()}}
    with pytest.raises(ValueError, match="do not match the model"):
        engine.load_checkpoint(lambda r: (tensors, meta), saved_world=1)
