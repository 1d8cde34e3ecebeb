"""`[pipeline]` and `[memory]` inside whole jobs: equal math, recovery, budgets."""

from __future__ import annotations

import pytest

from trainmem.parallel import PipelineConfig, build_schedule, order_peak
from trainmem.runtime import Controller, InjectedFailure, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow

PIPE = {"model": {"size": "tiny", "n_layer": 4}, "train": {"steps": 12},
        "pipeline": {"schedule": "1f1b", "stages": 2, "microbatches": 4}}


def _spec(run_dir, **sections):
    return load_spec(None, tiny_overrides(run_dir, **sections))


def _losses(result):
    """Loss per step; a step redone after a restore keeps its last (resumed) value."""
    by_step = {m["step"]: m["loss"] for m in read_jsonl(f"{result.run_dir}/metrics.jsonl")}
    return [by_step[s] for s in sorted(by_step)]


def test_pipeline_job_recovers_bitwise_and_matches_the_unpipelined_model(ray_cluster, tmp_path):
    clean = Controller(_spec(tmp_path / "pp", **PIPE)).run()
    killed_spec = _spec(tmp_path / "pp-kill", **PIPE)
    killed = Controller(killed_spec, inject=InjectedFailure(rank=1, step=8, kind="kill")).run()
    assert killed.restarts == 1 and killed.params_sha256 == clean.params_sha256
    restored = [e for e in read_jsonl(killed_spec.run_dir / "events.jsonl") if e["event"] == "restored"]
    assert restored[0]["step"] == 5
    # One data-parallel replica seeing the same global batch: the losses of the unpipelined model.
    single = Controller(_spec(tmp_path / "single", model=PIPE["model"], train=PIPE["train"],
                              cluster={"workers": 1})).run()
    assert _losses(clean) == pytest.approx(_losses(single), rel=1e-4)
    # peak_mb is measured from the bytes the stashes' saved tensors hold (rank 0 writes metrics);
    # the simulator says 1F1B's rank 0 holds min(p - 0, m) = 2 microbatch-stages at p=2
    sim = order_peak(build_schedule(PipelineConfig(**PIPE["pipeline"])))
    assert sim[0] == 2.0
    peaks = [m["peak_mb"] for m in read_jsonl(clean.run_dir + "/metrics.jsonl")]
    assert max(peaks) == pytest.approx(sim[0])
    saved = [m["peak_saved_bytes"] for m in read_jsonl(clean.run_dir + "/metrics.jsonl")]
    assert min(saved) > 0


PXD = {"model": {"size": "tiny", "n_layer": 4}, "train": {"steps": 10},
       "pipeline": {"schedule": "1f1b", "stages": 2, "microbatches": 4},
       "cluster": {"workers": 4, "cpus_per_worker": 0.5, "hang_timeout_s": 10.0},
       "checkpoint": {"snapshot_every": 1, "every_steps": 5}}


def test_pipeline_times_data_parallel_equals_ddp_and_a_kill_recovers_bitwise(ray_cluster, tmp_path):
    """2 stages x 2 replicas on 4 workers: each replica reads its own batches and each stage's
    gradients are averaged over its 2 replicas, so the losses are those of 2-rank DDP."""
    clean = Controller(_spec(tmp_path / "pxd", **PXD)).run()
    ddp = Controller(_spec(tmp_path / "ddp", model=PXD["model"], train=PXD["train"],
                           cluster={"workers": 2, "cpus_per_worker": 0.5})).run()
    assert _losses(clean) == pytest.approx(_losses(ddp), rel=1e-5)
    # one durable writer per stage: rank 0 for stage 0, rank 2 for stage 1 (pipeline-major mesh)
    ckpt = tmp_path / "pxd" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("rank-*") if any(p.glob("step-*"))) == ["rank-0", "rank-2"]
    spec = _spec(tmp_path / "pxd-kill", **PXD)
    killed = Controller(spec, inject=InjectedFailure(rank=2, step=7, kind="kill")).run()
    events = read_jsonl(spec.run_dir / "events.jsonl")
    assert next(e for e in events if e["event"] == "ranks_replaced")["ranks"] == [2]
    restored = next(e for e in events if e["event"] == "restored")
    assert restored["tier"] == "memory" and restored["step"] == 6  # from stage 1's other replica, rank 3
    assert killed.params_sha256 == clean.params_sha256


def test_memory_policy_respects_its_budget_keeps_the_math_and_recovers(ray_cluster, tmp_path):
    memory = {"activations": "auto", "activation_budget": 0.5}
    train = {"steps": 12}
    plain = Controller(_spec(tmp_path / "plain", train=train, memory={"activations": "none"})).run()
    spec = _spec(tmp_path / "auto", train=train, memory=memory)
    auto = Controller(spec, inject=InjectedFailure(rank=0, step=8, kind="kill")).run()
    events = read_jsonl(spec.run_dir / "events.jsonl")
    plan = next(e for e in events if e["event"] == "activation_plan")
    assert plan["budget_bytes"] == int(0.5 * plan["no_policy_peak"])
    assert any(row["decision"] != "keep" for row in plan["rows"])
    for m in read_jsonl(spec.run_dir / "metrics.jsonl"):
        assert m["peak_saved_bytes"] <= plan["budget_bytes"]
    # Recompute replays the same CPU kernels on the same inputs and offload copies bytes: the math is
    # the plain run's bitwise, so the killed run must end on the plain run's parameters.
    assert auto.restarts == 1 and auto.params_sha256 == plain.params_sha256
    assert _losses(auto) == _losses(plain)


def test_memory_layer_gpt_trains_with_sparse_values_and_recovers_bitwise(ray_cluster, tmp_path):
    sections = {"model": {"size": "tiny", "memory_layers": [1]}, "train": {"steps": 12}}
    clean = Controller(_spec(tmp_path / "pkm", **sections)).run()
    killed = Controller(_spec(tmp_path / "pkm-kill", **sections), inject=InjectedFailure(rank=1, step=8)).run()
    assert killed.restarts == 1 and killed.params_sha256 == clean.params_sha256
    losses = _losses(clean)
    assert losses[-1] < losses[0] - 0.5


def test_a_deterministic_error_stops_after_one_restart(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainmem.runtime import JobFailed

    pq.write_table(pa.table({"tokens": [[300] * 500]}), tmp_path / "ids.parquet")
    spec = _spec(tmp_path / "bad", data={"source": "files", "paths": [str(tmp_path / "ids.parquet")],
                                         "cache_dir": str(tmp_path / "cache")},
                 cluster={"workers": 1})  # one rank shows it: the error is the job's, not a rank's
    with pytest.raises(JobFailed, match=r"not transient.*see .*logs/rank-\d\.log"):
        Controller(spec).run()
    failures = [e for e in read_jsonl(spec.run_dir / "events.jsonl") if e["event"] == "failure_detected"]
    assert len(failures) == 2 and "model.vocab_size" in failures[0]["cause"]
    # The whole remote traceback is in events.jsonl, and in every failed rank's own log file.
    for rank, text in failures[0]["traceback"].items():
        assert 'in _setup' in text and "raise ValueError" in text and "vocab_size" in text and "\x1b[" not in text
        log = failures[0]["logs"][rank]
        assert log.endswith(f"logs/rank-{rank}.log")
        assert "Traceback (most recent call last)" in open(log).read() and "vocab_size" in open(log).read()
