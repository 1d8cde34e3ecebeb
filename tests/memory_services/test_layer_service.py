"""Serving the memory layer a run trained: equal to the run's own layer, sharded (rows and columns)
equal to unsharded with 1/N of the value bytes per shard, one version per lookup while consolidation
writes, a SIGKILLed shard replica answered by retryable errors, never wrong numbers, then replaced;
and a second run initialised from the served version. One Ray cluster and one trained run per module."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch
from ray import serve

from trainmem.checkpoint import DurableStore
from trainmem.checkpoint.state import restore_training_state
from trainmem.memory_services import (
    ConsolidationConfig,
    ConsolidationJob,
    HttpConfig,
    LayerChain,
    LayerClient,
    LayerServiceConfig,
    LayerStore,
    MemoryClient,
    MemoryStore,
    MemoryUnavailable,
    RetrieverConfig,
    ServicesConfig,
    layer_sha256,
    normalize,
    plan_memory_init,
    serve_app,
    shutdown_services,
)
from trainmem.runtime import Controller, load_spec
from trainmem.runtime.models import build
from trainmem.runtime.runlog import read_jsonl

from serve_proc import serve_processes_env

pytestmark = pytest.mark.slow

D = 64  # the tiny GPT's width: the layer's input, and the entries' embedding width for distillation


def _run(spec):
    """What `trainmem launch` does: the resolved spec beside the run, then the controller."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    return Controller(spec).run()


def _job(run_dir, steps=10, **model):
    return load_spec(None, {
        "model": {"size": "tiny", "memory_layers": [1], **model},
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "seed": 7, "run_dir": str(run_dir)},
        "cluster": {"workers": 2, "hang_timeout_s": 30.0},
        "checkpoint": {"every_steps": 5},
    })


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    tmp = tmp_path_factory.mktemp("layer")
    spec = _job(tmp / "run")
    result = _run(spec)
    assert result.steps == 10
    cfg = ServicesConfig(
        store_path=str(tmp / "store"), embedding_dim=D,
        retriever=RetrieverConfig(kind="flat", embedder="none", threads=1),
        consolidation=ConsolidationConfig(schedule="0 0 1 1 *", distill=True, distill_steps=60),
        http=HttpConfig(port=0, max_batch=512, token_file=str(tmp / "secret-token")),
        memory_layer=LayerServiceConfig(from_run=str(spec.run_dir), layer=1, shard_timeout_s=3.0),
    )
    (tmp / "secret-token").write_text("tok-" + os.urandom(12).hex())
    (tmp / "secret-token").chmod(0o600)
    served = serve_app(cfg, schedule=False)
    try:
        yield {"tmp": tmp, "spec": spec, "cfg": cfg, "served": served, "token": (tmp / "secret-token").read_text()}
    finally:
        shutdown_services()
        ray.shutdown()


def _reference_layer(spec):
    """The run's own layer: the GPT rebuilt from its newest checkpoint by the runtime's own restore."""
    model = build(spec.model, seed=spec.train.seed)
    ckpt = DurableStore(spec.checkpoint_dir).load()
    restore_training_state(model, None, ckpt.tensors, ckpt.meta)
    return model.blocks[1].mlp.eval(), ckpt.step


def _x(n=300, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _redeploy(cluster, **layer):
    """Serve the layer with these memory_layer fields (kept if the running deployment already has them)."""
    if cluster.get("deployed") == layer:
        return
    # The running port: serve.run replaces the app in place, Serve's controller and proxy stay up.
    cfg = dataclasses.replace(cluster["cfg"], http=dataclasses.replace(cluster["cfg"].http, port=cluster["served"].port),
                              memory_layer=dataclasses.replace(cluster["cfg"].memory_layer, **layer))
    serve_app(cfg, schedule=False)
    cluster["deployed"] = layer


def _assert_value_bytes_split(layer, shards):
    """Every shard of the running deployment holds ~1/N of the value table, and together all of it."""
    info = serve.get_deployment_handle("MemoryRouter", "trainmem-memory").shard_info.remote().result(timeout_s=60)
    total = layer.values.weight.numel() * 4
    row_bytes = layer.values.weight.shape[1] * 4
    assert len(info) == shards and sum(i["value_bytes"] for i in info) == total
    for i in info:
        assert abs(i["value_bytes"] - total / shards) <= max(row_bytes, layer.values.weight.shape[0] * 4)


def test_served_layer_equals_the_runs_own_layer_through_handle_and_http(cluster):
    layer, step = _reference_layer(cluster["spec"])
    assert cluster["served"].layer_origin["step"] == step == 10
    x = _x()
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    out, version = LayerClient(max_rows=128).lookup(x)
    assert version == 0
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    http = MemoryClient(cluster["served"].url, cluster["token"], max_batch=100)
    got, versions = http.lookup(x)
    assert set(versions) == {0}
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_replicas_on_a_joined_cluster_get_passive_openmp_waits_through_their_runtime_env(cluster):
    env = serve_processes_env(os.getpid(), "OMP_WAIT_POLICY")
    replicas = [value for title, value in env if title.startswith("ray::ServeReplica")]
    assert len(replicas) >= 4 and set(replicas) == {"PASSIVE"}, env


def test_the_token_is_not_in_rays_deployment_metadata(cluster):
    gcs = ray._private.worker.global_worker.gcs_client
    canary = "canary-" + os.urandom(6).hex()  # negative control: an init argument IS stored there

    @serve.deployment
    class Probe:
        def __init__(self, secret: str):
            self.secret = secret

    serve.run(Probe.bind(canary), name="probe", route_prefix="/probe")
    values = b"".join(gcs.internal_kv_get(k, b"serve") or b"" for k in gcs.internal_kv_keys(b"", b"serve"))
    values += b"".join(gcs.internal_kv_get(k, None) or b"" for k in gcs.internal_kv_keys(b"", None))
    serve.delete("probe")
    assert canary.encode() in values
    assert cluster["token"].encode() not in values


def test_sharded_by_columns_equals_unsharded_with_a_share_of_the_value_bytes(cluster):
    """N = 3 by columns here; N = 2 by rows is checked the same way by the next two tests."""
    layer, _ = _reference_layer(cluster["spec"])
    x = _x(400, seed=1)
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    _redeploy(cluster, shards=3, shard_by="columns")
    out, _ = LayerClient().lookup(x)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    _assert_value_bytes_split(layer, 3)


def test_a_killed_shard_replica_gives_retryable_errors_never_wrong_answers(cluster):
    layer, _ = _reference_layer(cluster["spec"])
    x = _x(200, seed=2)
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    _redeploy(cluster, shards=2, shard_by="rows")
    client = LayerClient(timeout_s=30)
    np.testing.assert_allclose(client.lookup(x)[0], want, rtol=1e-6, atol=1e-6)  # 2 shards by rows = unsharded
    _assert_value_bytes_split(layer, 2)
    router = serve.get_deployment_handle("MemoryRouter", "trainmem-memory")
    victim = router.shard_info.remote().result(timeout_s=60)[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    errors, good, deadline = [], 0, time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            out, _ = client.lookup(x)
        except MemoryUnavailable as e:
            errors.append(str(e))
            continue
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)  # any answer at all is a right one
        good += 1
        if errors and good >= 3:
            break
    assert errors and all("shard" in e for e in errors), errors[:3]
    assert good >= 3, "lookups did not resume after the shard was replaced"
    pids = [i["pid"] for i in router.shard_info.remote().result(timeout_s=60)]
    assert victim not in pids  # Serve started a new replica


def test_lookups_during_a_consolidation_each_match_exactly_one_version(cluster):
    cfg = cluster["cfg"]
    _redeploy(cluster, shards=2, shard_by="rows")
    store = MemoryStore(cfg.store_path, D)
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((12, D))
    members = normalize(np.repeat(centres, 3, 0) + 0.03 * rng.standard_normal((36, D)))
    store.add([f"fact {i // 3}" for i in range(36)], members)
    v0 = LayerChain.from_json(store.kv()["layer.default"])
    layers = LayerStore(cfg.layer_dir)
    client = LayerClient()
    answers: list[tuple[int, np.ndarray]] = []
    done = threading.Event()

    def look() -> None:
        while not done.is_set() or len({v for v, _ in answers}) < 2 and len(answers) < 400:
            out, version = client.lookup(members)
            answers.append((version, out))

    t = threading.Thread(target=look)
    t.start()
    result = ConsolidationJob(store, cfg.consolidation, kind="test", layer_dir=cfg.layer_dir).run_once()
    done.set()
    t.join(120)
    assert result.clusters == 12 and result.layer_version == 1
    v1 = LayerChain.from_json(store.kv()["layer.default"])
    with torch.no_grad():
        outs = {0: layers.load_layer(v0)(torch.from_numpy(members)).numpy(),
                1: layers.load_layer(v1)(torch.from_numpy(members)).numpy()}
    assert not np.allclose(outs[0], outs[1], atol=1e-4)
    assert {v for v, _ in answers} == {0, 1}
    for version, out in answers:
        np.testing.assert_allclose(out, outs[version], rtol=1e-6, atol=1e-6)  # exactly its own version
        assert not np.allclose(out, outs[1 - version], atol=1e-4)  # and not a mix with the other
    cluster["v1"] = v1


def test_a_second_run_starts_from_the_served_version(cluster):
    assert "v1" in cluster, "needs the consolidation test's version 1"
    cfg, tmp = cluster["cfg"], cluster["tmp"]
    served = LayerStore(cfg.layer_dir).load_layer(cluster["v1"])
    spec = _job(tmp / "run2", steps=2)
    spec.model.init_memory_from, spec.model.init_memory_step = plan_memory_init(cfg.store_path, spec)
    assert spec.model.init_memory_step == 0
    _run(spec)
    inits = [e for e in read_jsonl(spec.run_dir / "events.jsonl") if e["event"] == "memory_init"]
    assert sorted(e["rank"] for e in inits) == [0, 1]
    for e in inits:  # the digest of block 1's tensors in the model at step 0, read back from the model
        assert e["step"] == 0 and e["version"] == 1 and e["sha256"]["1"] == layer_sha256(served)
    fresh = build(spec.model, seed=spec.train.seed).blocks[1].mlp
    assert layer_sha256(fresh) != layer_sha256(served)
    with pytest.raises(ValueError, match="model.product_key.n_keys=64"):
        plan_memory_init(cfg.store_path, _job(tmp / "run3", product_key={"n_keys": 64}))


def test_launch_refuses_a_bad_memory_source_before_starting(tmp_path, capsys):
    from trainmem.launch import launch_cmd

    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nsize = "tiny"\nmemory_layers = [1]\n[train]\nrun_dir = "{tmp_path / "r"}"\n')
    assert launch_cmd.main([str(job), "--init-memory-from", str(tmp_path / "nothing")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_a_damaged_newest_checkpoint_is_skipped_and_a_config_mismatch_is_named(cluster, tmp_path):
    import shutil

    from trainmem.memory_services import ensure_layer_chain, load_run_layer
    from trainmem.memory_services.layers.from_run import run_layer_config

    run = tmp_path / "run"
    shutil.copytree(cluster["spec"].run_dir, run)
    state = run / "checkpoints" / "step-00000010" / "state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    layer, origin = load_run_layer(run, 1)
    assert origin["step"] == 5 and "step 10" in origin["skipped"][0] and "checksum" in origin["skipped"][0]
    cfg = ServicesConfig(store_path=str(tmp_path / "store"), embedding_dim=D,
                         retriever=RetrieverConfig(embedder="none"),
                         memory_layer=LayerServiceConfig(from_run=str(run), layer=1, n_keys=64))
    with pytest.raises(ValueError, match="memory_layer.n_keys=64 but run .* has n_keys=128"):
        ensure_layer_chain(MemoryStore(cfg.store_path, D), cfg)
    with pytest.raises(ValueError, match="memory_layer.layer=0 is not a memory layer"):
        run_layer_config(run, 0)
