"""The durable tier on S3 (a real SeaweedFS server): same protocol as on disk, checksums verified on read."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
import torch

from trainmem.checkpoint import CheckpointCorrupt, DurableStore, Location, disk_candidates, existing_state
from trainmem.checkpoint.storage import s3_filesystem


def _state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"model.w": torch.randn(64, 33, generator=g), "opt.step": torch.tensor([step], dtype=torch.int64)}


def _meta(step: int) -> dict:
    return {"state": {"step": step}, "world": 3, "seed": 0}


@pytest.fixture
def store(s3_server):
    return DurableStore(Location(s3_server.uri(f"t-{secrets.token_hex(4)}"), s3_server.storage), keep=2)


def _data_name(store: DurableStore, step: int) -> str:
    return next(iter(store.read_manifest(step)["files"]))


def test_round_trip_latest_and_pruning_on_s3(store):
    for step in (10, 20, 30):
        store.save(step, _state(step), _meta(step))
    assert store.steps() == [20, 30] and store.latest_step() == 30
    loaded = store.load()
    assert loaded.step == 30 and loaded.meta == _meta(30)
    assert all(torch.equal(loaded.tensors[k], v) for k, v in _state(30).items())
    assert [(c.tier, c.step, c.world) for c in disk_candidates(store.location, world=3)] == [
        ("durable", 30, 3), ("durable", 20, 3)]
    assert existing_state(store.location) == [f"durable checkpoints in {store.location.uri}"]


def test_rewriting_the_latest_step_swaps_manifest_and_data_and_leaves_no_orphan(store):
    store.save(20, _state(20), _meta(20))
    first = _data_name(store, 20)
    store.save(10, _state(10), _meta(10))  # a replay from an older step must not move LATEST back
    assert store.latest_step() == 20
    store.save(20, _state(21), _meta(21))  # the step LATEST names, written again
    second = _data_name(store, 20)
    assert second != first, "a new data object per write: the old manifest never pairs with new bytes"
    assert store.location.child("step-00000020").names() == sorted(["manifest.json", second])
    assert torch.equal(store.load(20).tensors["model.w"], _state(21)["model.w"])


@pytest.mark.parametrize("damage", ["flipped", "half-written"])
def test_a_damaged_object_is_named_by_its_checksum(store, damage):
    store.save(10, _state(10), _meta(10))
    store.save(20, _state(20), _meta(20))
    folder = store.location.child("step-00000020")
    name = _data_name(store, 20)
    data = folder.read_bytes(name)
    bad = bytes(b ^ 0xFF for b in data[:64]) + data[64:] if damage == "flipped" else data[: len(data) // 2]
    folder.write_bytes(name, bad)
    with pytest.raises(CheckpointCorrupt, match=rf"s3://.*/step-00000020/{name}: checksum mismatch"):
        store.load(20)
    assert torch.equal(store.load(10).tensors["model.w"], _state(10)["model.w"]), "the older step still loads"


def test_data_without_its_manifest_is_not_a_step(store):
    store.save(10, _state(10), _meta(10))
    store.location.child("step-00000020").write_bytes("state-x.safetensors", b"partial upload, no manifest")
    assert store.steps() == [10]
    assert [c.step for c in disk_candidates(store.location, 3)] == [10]


def test_wrong_credentials_fail_with_the_s3_error_and_the_bucket_named(s3_server):
    storage = dataclasses.replace(s3_server.storage, secret_access_key="wrong", max_attempts=1)
    with pytest.raises(OSError, match=f"bucket '{s3_server.bucket}'.*(SIGNATURE_DOES_NOT_MATCH|ACCESS_DENIED)"):
        DurableStore(Location(s3_server.uri("denied"), storage)).save(1, _state(1), _meta(1))


def test_storage_config_takes_secrets_from_the_aws_variables(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.storage.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.storage.secret_access_key)
    storage = dataclasses.replace(s3_server.storage, access_key_id="", secret_access_key="")
    s3_filesystem(storage)  # builds from the environment
    store = DurableStore(Location(s3_server.uri("from-env"), storage))
    store.save(3, _state(3), _meta(3))
    assert store.load().step == 3
