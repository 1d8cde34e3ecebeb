"""Consolidation: merges with provenance, exactly-once across a SIGKILL, concurrent writes survive,
distillation writes consolidated values into only the rows their keys read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainmem.memory_services import (
    ConsolidationConfig,
    ConsolidationJob,
    CronScheduler,
    MemoryStore,
    ProductKeyConfig,
    load_layer,
    new_layer,
    top1_accuracy,
)
from trainmem.memory_services.distill import read_rows

from memsvc_data import clustered, representation

DIM = 32
LAYER = ProductKeyConfig(d_model=DIM, heads=2, n_keys=32, k_dim=32, topk=8, gated=False)
REPO = Path(__file__).resolve().parents[2]


def _seed_store(path: Path) -> tuple[MemoryStore, list[str], list[int]]:
    texts, vecs, groups = clustered(dim=DIM)
    store = MemoryStore(path, DIM)
    ids = [e.id for e in store.add(texts, vecs, [{"group": g} for g in groups])]
    return store, ids, groups


def test_merges_near_duplicates_once_and_keeps_provenance(tmp_path):
    store, ids, groups = _seed_store(tmp_path / "s.parquet")
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
    # New duplicates of an already consolidated fact fold into it, provenance flattened.
    c0 = store.get(result.consolidated_ids[0])
    (late,) = store.add(["late dup"], c0.embedding[None, :])
    third = job.run_once()
    assert third.clusters == 1 and representation(store) == {i: 1 for i in ids + [late.id]}


def test_writes_landing_during_the_job_survive(tmp_path):
    store, ids, groups = _seed_store(tmp_path / "s.parquet")
    other = MemoryStore(tmp_path / "s.parquet", DIM)  # a second writer with its own handle
    member = ids[groups.index(0)]

    def concurrent_write(phase: str) -> None:
        if phase.startswith("clusters"):
            other.add(["arrived mid-job"], np.eye(DIM)[:1], ids=["late"])
            other.update(member, text="edited mid-job")

    result = ConsolidationJob(store, ConsolidationConfig(), on_phase=concurrent_write).run_once()
    assert result.conflicts == 1 and result.clusters == 19
    assert store.get("late").text == "arrived mid-job" and not store.get("late").deleted
    assert store.get(member).text == "edited mid-job" and not store.get(member).deleted
    ConsolidationJob(store, ConsolidationConfig()).run_once()  # the skipped cluster merges next run
    assert representation(store) == {i: 1 for i in ids + ["late"]}
    assert store.get(member).deleted  # merged now, with its edit
    merged = [e for e in map(store.get, store.live().column("id").to_pylist()) if member in e.metadata.get("consolidated_from", [])]
    assert len(merged) == 1 and "edited mid-job" in merged[0].metadata["variants"]


def test_distillation_writes_consolidated_values_and_leaves_other_rows(tmp_path):
    store, _, _ = _seed_store(tmp_path / "s.parquet")
    cfg = ConsolidationConfig(distill=True, distill_steps=150, distill_lr=0.05)
    result = ConsolidationJob(store, cfg, layer_cfg=LAYER).run_once()
    assert result.layer_path and store.kv()["layer.default"] == result.layer_path
    layer = load_layer(result.layer_path)
    keys = torch.from_numpy(np.stack([store.get(c).embedding for c in result.consolidated_ids]))
    assert top1_accuracy(layer, keys, keys) >= 0.95
    fresh = new_layer(LAYER)
    rows = read_rows(fresh, keys)
    untouched = torch.ones(LAYER.n_slots, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(layer.values.weight[untouched], fresh.values.weight[untouched])
    assert not torch.equal(layer.values.weight[rows], fresh.values.weight[rows])
    for name in ("query.weight", "keys"):
        assert torch.equal(layer.state_dict()[name], fresh.state_dict()[name])


def test_cron_scheduler_runs_on_ticks(tmp_path):
    store, ids, _ = _seed_store(tmp_path / "s.parquet")
    sched = CronScheduler(ConsolidationJob(store), "* * * * * */1", log=lambda _: None)  # every second
    assert 0 < sched.next_time() - time.time() <= 1.01
    sched.run(max_runs=1)
    assert sched.runs[0].clusters == 20 and representation(store) == {i: 1 for i in ids}
    with pytest.raises(ValueError, match="schedule="):
        CronScheduler(ConsolidationJob(store), "not a cron")


def _write_toml(tmp_path: Path, steps: int) -> Path:
    toml = tmp_path / "memory.toml"
    toml.write_text(
        f"""
[services]
store_path = "{tmp_path / 's.parquet'}"
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


def _consolidate(toml: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainmem.launch.cli", "consolidate", str(toml), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_exactly_once(tmp_path):
    store, ids, _ = _seed_store(tmp_path / "s.parquet")
    before = (tmp_path / "s.parquet").read_bytes()
    toml = _write_toml(tmp_path, steps=100_000)  # distillation far longer than the wait below
    proc = _consolidate(toml, "--once")
    deadline = time.monotonic() + 120
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "consolidate: distill" in line:
            time.sleep(0.5)  # well inside the distillation steps, before the commit
            break
        assert time.monotonic() < deadline, f"consolidation never reached distill: {seen}"
    else:
        pytest.fail(f"consolidation exited before distill: {seen}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (tmp_path / "s.parquet").read_bytes() == before  # the killed run changed nothing
    assert representation(store) == {i: 1 for i in ids}

    rerun = _consolidate(_write_toml(tmp_path, steps=30), "--once", "--json")
    out, _ = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["clusters"] == 20 and representation(store) == {i: 1 for i in ids}
    assert store.kv()["layer.default"] == result["layer_path"]
    third = _consolidate(toml, "--once", "--json")
    out, _ = third.communicate(timeout=180)
    assert json.loads(out.strip().splitlines()[-1])["clusters"] == 0
    assert representation(store) == {i: 1 for i in ids}


def test_cli_usage_errors_exit_2(tmp_path):
    from trainmem.launch import consolidate_cmd

    for argv in ([str(tmp_path / "none.toml"), "--once"], [str(_write_toml(tmp_path, 5)), "--schedule", "nope"]):
        assert consolidate_cmd.main(argv) == 2
    with pytest.raises(SystemExit) as e:
        consolidate_cmd.main(["--once", "--schedule", "* * * * *"])
    assert e.value.code == 2
