"""Consolidation: merges with provenance, concurrent writes survive, one run at a time (the lease),
a watermark that never moves back, distillation whose layer holds exactly the committed clusters
and answers held-out members, and SIGKILLs at every phase of a real `trainmem consolidate`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainmem.memory_services import (
    ConsolidationConfig,
    ConsolidationJob,
    CronScheduler,
    LayerStore,
    Lease,
    LeaseHeld,
    MemoryStore,
    ProductKeyConfig,
    new_layer,
    normalize,
)
from trainmem.memory_services.consolidation import LeaseLost
from trainmem.memory_services.layers.distill import read_rows

from memsvc_data import clustered, representation

DIM = 32
LAYER = ProductKeyConfig(d_model=DIM, heads=2, n_keys=32, k_dim=32, topk=8, gated=False)
REPO = Path(__file__).resolve().parents[2]


def _seed_store(path: Path, **kw) -> tuple[MemoryStore, list[str], list[int]]:
    texts, vecs, groups = clustered(dim=DIM, **kw)
    store = MemoryStore(path, DIM)
    ids = [e.id for e in store.add(texts, vecs, [{"group": g} for g in groups])]
    return store, ids, groups


def test_merges_near_duplicates_once_and_keeps_provenance(tmp_path):
    store, ids, groups = _seed_store(tmp_path / "s")
    job = ConsolidationJob(store, ConsolidationConfig(similarity=0.9))
    result = job.run_once()
    assert result.clusters == 20 and result.merged == sum(g >= 0 for g in groups)
    assert representation(store) == {i: 1 for i in ids}
    for entry in (store.get(c) for c in result.consolidated_ids):
        members = entry.metadata["consolidated_from"]
        assert len({groups[ids.index(m)] for m in members}) == 1  # a cluster never mixes groups
    before = store.stats()
    again = job.run_once()
    assert (again.scanned, again.clusters) == (0, 0) and store.stats()["live"] == before["live"]
    c0 = store.get(result.consolidated_ids[0])
    (late,) = store.add(["late dup"], c0.embedding[None, :])  # folds into the consolidated entry
    third = job.run_once()
    assert third.clusters == 1 and representation(store) == {i: 1 for i in ids + [late.id]}


def test_namespaces_never_merge(tmp_path):
    store = MemoryStore(tmp_path / "s", DIM)
    v = normalize(np.random.default_rng(0).standard_normal((1, DIM)))
    store.add(["a", "b"], np.repeat(v, 2, 0), namespace=["alice", "bob"])
    assert ConsolidationJob(store).run_once().clusters == 0


def test_writes_landing_during_the_job_survive(tmp_path):
    store, ids, groups = _seed_store(tmp_path / "s")
    other = MemoryStore(tmp_path / "s", DIM)  # a second writer with its own handle
    member = ids[groups.index(0)]

    def concurrent_write(phase: str) -> None:
        if phase.startswith("clusters"):
            other.add(["arrived mid-job"], np.eye(DIM)[:1], ids=["late"])
            other.update(member, text="edited mid-job")

    result = ConsolidationJob(store, ConsolidationConfig(), on_phase=concurrent_write).run_once()
    assert result.conflicts == 1 and result.clusters == 19
    assert store.get("late").text == "arrived mid-job"
    assert store.get(member).text == "edited mid-job"
    ConsolidationJob(store, ConsolidationConfig()).run_once()  # the skipped cluster merges next run
    assert representation(store) == {i: 1 for i in ids + ["late"]}
    merged = [e for e in store.list_entries(limit=1000)[0] if member in e.metadata.get("consolidated_from", [])]
    assert len(merged) == 1 and "edited mid-job" in merged[0].metadata["variants"]


def test_the_watermark_never_moves_back(tmp_path):
    store, _, _ = _seed_store(tmp_path / "s")
    job = ConsolidationJob(store)

    def stale(phase: str) -> None:  # a later watermark lands while this run works (e.g. restored state)
        if phase.startswith("clusters"):
            with store.transaction() as txn:
                txn.kv[job.watermark_key] = "10000"

    job.on_phase = stale
    assert job.run_once().watermark == 10000 and store.kv()[job.watermark_key] == "10000"


def test_one_run_at_a_time_and_the_holder_is_named(tmp_path):
    store, ids, _ = _seed_store(tmp_path / "s")
    inside, release = threading.Event(), threading.Event()

    def hold(phase: str) -> None:
        if phase.startswith("clusters"):
            inside.set()
            release.wait(30)

    first = ConsolidationJob(store, on_phase=hold, kind="cron")
    results: list = []
    t = threading.Thread(target=lambda: results.append(first.run_once()))
    t.start()
    assert inside.wait(30)
    with pytest.raises(LeaseHeld, match=r"held by cron:") as e:
        ConsolidationJob(MemoryStore(tmp_path / "s", DIM), kind="http").run_once()
    assert e.value.holder["pid"] == os.getpid()
    release.set()
    t.join(30)
    assert results[0].clusters == 20 and representation(store) == {i: 1 for i in ids}
    assert not any(k.startswith("lease.") for k in store.kv())  # released


def test_a_dead_holders_lease_is_free_and_a_lost_lease_cannot_commit(tmp_path):
    store, _, _ = _seed_store(tmp_path / "s")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = Lease(store, "consolidation.default", "cli")._record()
    with store.transaction() as txn:
        txn.kv["lease.consolidation.default"] = json.dumps({**record, "owner": "cli:gone", "pid": int(dead.stdout)})
    assert ConsolidationJob(store).run_once().clusters == 20  # taken over at once: its pid is gone

    store2, ids2, _ = _seed_store(tmp_path / "s2")
    before = store2.stats()

    def steal(phase: str) -> None:
        if phase == "commit":
            with store2.transaction() as txn:
                txn.kv["lease.consolidation.default"] = json.dumps({**record, "owner": "cli:thief"})

    with pytest.raises(LeaseLost, match="cli:thief"):
        ConsolidationJob(store2, on_phase=steal).run_once()
    assert store2.stats()["live"] == before["live"] and representation(store2) == {i: 1 for i in ids2}


def _probes(vecs: np.ndarray, groups: list[int], seed: int, per: int = 3):
    """Held-out members: fresh noisy copies of each cluster (never stored, never trained on)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in sorted({g for g in groups if g >= 0}):
        base = vecs[[j for j, g in enumerate(groups) if g == c]].mean(axis=0)
        out += [(c, normalize((base + 0.05 * rng.standard_normal(DIM))[None])[0]) for _ in range(per)]
    return out


def _ranked_first(layer, store: MemoryStore, probes, want: dict[int, str]) -> float:
    """Fraction of probes whose layer output is closest to their cluster's entry among ALL live entries."""
    live = store.list_entries(limit=10_000)[0]
    emb = F.normalize(torch.from_numpy(np.stack([e.embedding for e in live])), dim=-1)
    with torch.no_grad():
        out = F.normalize(layer(torch.from_numpy(np.stack([p for _, p in probes]))), dim=-1)
    best = (out @ emb.T).argmax(1)
    return float(np.mean([live[b].id == want[c] for b, (c, _) in zip(best.tolist(), probes)]))


def test_distilled_layer_answers_held_out_members_and_keeps_earlier_memories(tmp_path):
    texts, vecs, groups = clustered(n_clusters=20, n_single=40, dim=DIM, seed=0)
    store = MemoryStore(tmp_path / "s", DIM)
    ids = [e.id for e in store.add(texts, vecs)]
    cfg = ConsolidationConfig(distill=True, distill_steps=150, distill_lr=0.05)
    job = ConsolidationJob(store, cfg, layer_cfg=LAYER)
    first = job.run_once()
    assert first.clusters == 20 and first.layer_version == 1
    entry_of = {g: next(c for c in first.consolidated_ids if ids[groups.index(g)] in store.get(c).metadata["consolidated_from"])
                for g in set(groups) if g >= 0}
    probes1 = _probes(vecs, groups, seed=1)
    layers = LayerStore(tmp_path / "s" / "layer")
    layer1 = layers.load_layer(job.current_chain())
    assert _ranked_first(layer1, store, probes1, entry_of) >= 0.9
    assert _ranked_first(new_layer(LAYER), store, probes1, entry_of) < 0.2  # the fresh layer knows nothing

    # A second batch of facts, consolidated by a second run into a second version.
    texts2, vecs2, groups2 = clustered(n_clusters=10, n_single=10, dim=DIM, seed=7)
    ids2 = [e.id for e in store.add([t + " (2)" for t in texts2], vecs2)]
    second = job.run_once()
    assert second.clusters == 10 and second.layer_version == 2
    entry2 = {g: next(c for c in second.consolidated_ids if ids2[groups2.index(g)] in store.get(c).metadata["consolidated_from"])
              for g in set(groups2) if g >= 0}
    probes2 = _probes(vecs2, groups2, seed=2)
    layer2 = layers.load_layer(job.current_chain())
    assert _ranked_first(layer2, store, probes2, entry2) >= 0.9
    assert _ranked_first(layer2, store, probes1, entry_of) >= 0.9  # the first run's memories survive
    # Only rows the second run's keys (or the earlier keys replayed beside them) read have moved.
    moved = (layer2.values.weight != layer1.values.weight).any(1)
    keys2 = torch.from_numpy(np.stack([vecs2[j] for j, g in enumerate(groups2) if g >= 0]))
    assert set(moved.nonzero().flatten().tolist()) <= set(read_rows(layer1, keys2).tolist())
    for name in ("query.weight", "keys"):
        assert torch.equal(layer2.state_dict()[name], new_layer(LAYER).state_dict()[name])


def test_the_layer_holds_exactly_the_committed_clusters(tmp_path):
    store, ids, groups = _seed_store(tmp_path / "s")
    member = ids[groups.index(3)]
    other = MemoryStore(tmp_path / "s", DIM)
    edited = []

    def edit_during_distill(phase: str) -> None:
        if phase == "distill" and not edited:
            edited.append(other.update(member, text="changed while distilling"))

    cfg = ConsolidationConfig(distill=True, distill_steps=40)
    job = ConsolidationJob(store, cfg, layer_cfg=LAYER, on_phase=edit_during_distill)
    result = job.run_once()
    assert result.conflicts == 1 and result.clusters == 19
    layers = LayerStore(tmp_path / "s" / "layer")
    chain = job.current_chain()
    _, sources = layers.pairs(chain)
    committed = {s for c in result.consolidated_ids for s in store.get(c).metadata["consolidated_from"]}
    assert set(sources) == committed and member not in sources
    assert {p.name for p in (tmp_path / "s" / "layer").glob("*.safetensors")} == chain.files()  # attempts removed
    # Rows the dropped cluster's keys alone would read are untouched by the committed version.
    fresh = new_layer(LAYER)
    layer = layers.load_layer(chain)
    vecs = clustered(dim=DIM)[1]
    changed = (layer.values.weight != fresh.values.weight).any(1).nonzero().flatten()
    trained = read_rows(fresh, torch.from_numpy(np.stack([vecs[ids.index(s)] for s in sources])))
    assert set(changed.tolist()) <= set(trained.tolist())


def test_cron_scheduler_runs_on_ticks_and_skips_while_leased(tmp_path):
    store, ids, _ = _seed_store(tmp_path / "s")
    logs: list[str] = []
    sched = CronScheduler(ConsolidationJob(store, kind="cron"), "* * * * * */1", log=logs.append)  # every second
    lease = Lease(MemoryStore(tmp_path / "s", DIM), "consolidation.default", "http").acquire()
    sched.run(max_runs=1)
    lease.release()
    assert sched.skipped == [lease.owner] and "tick skipped" in logs[-1]
    sched.run(max_runs=1)
    assert sched.runs[0].clusters == 20 and representation(store) == {i: 1 for i in ids}
    with pytest.raises(ValueError, match="schedule="):
        CronScheduler(ConsolidationJob(store), "not a cron")


def _write_toml(tmp_path: Path, steps: int) -> Path:
    toml = tmp_path / "memory.toml"
    toml.write_text(
        f"""
[services]
store_path = "{tmp_path / 's'}"
embedding_dim = {DIM}
[services.retriever]
embedder = "none"
[services.consolidation]
distill = true
distill_steps = {steps}
[services.memory_layer]
d_model = {DIM}
n_keys = 32
topk = 8
"""
    )
    return toml


def _consolidate(toml: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainmem.launch.cli", "consolidate", str(toml), "--once", "--json",
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=240)


def _state(store_dir: Path) -> tuple:
    store = MemoryStore(store_dir, DIM)
    kv = {k: v for k, v in store.kv().items() if not k.startswith("lease.")}
    return store.stats(), kv


@pytest.mark.slow
def test_sigkill_at_every_phase_then_rerun_is_exactly_once(tmp_path):
    store, ids, _ = _seed_store(tmp_path / "s")
    toml = _write_toml(tmp_path, steps=30)
    start = None
    for point in ("consolidate.before_plan", "consolidate.distill", "store.commit:consolidation"):
        proc = _consolidate(toml, "--inject-kill", point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stdout[-2000:], proc.stderr[-2000:])
        state = _state(tmp_path / "s")
        start = start or state
        assert state == start, point  # killed before its commit: nothing of it is visible
        assert representation(store) == {i: 1 for i in ids}
    proc = _consolidate(toml, "--inject-kill", "consolidate.after_commit")
    assert proc.returncode == -signal.SIGKILL
    assert representation(store) == {i: 1 for i in ids}
    merged = MemoryStore(tmp_path / "s", DIM).stats()
    assert merged["live"] < start[0]["live"]  # the commit landed before the kill
    rerun = _consolidate(toml)  # the dead holder's lease is taken over at once
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["clusters"] == 0
    assert representation(store) == {i: 1 for i in ids}
    chain = ConsolidationJob(MemoryStore(tmp_path / "s", DIM)).current_chain()
    assert chain.version == 1
    assert {p.name for p in (tmp_path / "s" / "layer").glob("*.safetensors")} == chain.files()


def test_cli_usage_errors_and_lease_held_exit_codes(tmp_path):
    from trainmem.launch import consolidate_cmd

    for argv in ([str(tmp_path / "none.toml"), "--once"], [str(_write_toml(tmp_path, 5)), "--schedule", "nope"],
                 [str(_write_toml(tmp_path, 5)), "--once", "--inject-kill", "nowhere"]):
        assert consolidate_cmd.main(argv) == 2
    with pytest.raises(SystemExit) as e:
        consolidate_cmd.main(["--once", "--schedule", "* * * * *"])
    assert e.value.code == 2
    store, _, _ = _seed_store(tmp_path / "s")
    lease = Lease(store, "consolidation.default", "http").acquire()
    try:
        assert consolidate_cmd.main([str(_write_toml(tmp_path, 5)), "--once"]) == consolidate_cmd.LEASE_HELD
    finally:
        lease.release()
