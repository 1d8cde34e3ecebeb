from __future__ import annotations

import pytest
import torch

from trainmem.checkpoint import DurableStore
from trainmem.checkpoint.durable import CheckpointCorrupt
from trainmem.checkpoint.state import flatten_training_state, restore_training_state
from trainmem.runtime.models import ModelConfig, build, lm_loss


def _trained(seed=0):
    model = build(ModelConfig(size="tiny"), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 16))
    lm_loss(model(x), x).backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_and_optimizer_bitwise(tmp_path):
    model, opt = _trained()
    store = DurableStore(tmp_path, keep=2)
    tensors, meta = flatten_training_state(model, opt)
    store.save(3, tensors, meta)
    fresh, fresh_opt = _trained(seed=1)
    loaded = store.load()
    assert loaded.step == 3
    restore_training_state(fresh, fresh_opt, loaded.tensors, loaded.meta)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_keep_prunes_old_steps_and_latest_moves_last(tmp_path):
    model, opt = _trained()
    store = DurableStore(tmp_path, keep=2)
    for step in (5, 10, 15):
        store.save(step, *flatten_training_state(model, opt))
    assert store.steps() == [10, 15] and store.latest_step() == 15


def test_torn_or_corrupted_file_is_named(tmp_path):
    model, opt = _trained()
    store = DurableStore(tmp_path)
    folder = store.save(5, *flatten_training_state(model, opt))
    path = folder / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="state.safetensors: checksum mismatch"):
        store.load()


def test_an_unfinished_save_is_invisible(tmp_path):
    model, opt = _trained()
    store = DurableStore(tmp_path)
    store.save(5, *flatten_training_state(model, opt))
    (tmp_path / ".tmp-step-00000010-999").mkdir()  # a writer killed mid-save leaves only this
    assert store.latest_step() == 5 and store.steps() == [5]
