"""The torchft side of ``trainmem bench launch --quick``: a real SIGKILL, a restart, a live heal."""

from trainmem.runtime.bench_launch import _args, _job
from trainmem.runtime.bench_torchft import run_torchft
from trainmem.runtime.runlog import read_jsonl


def test_torchft_side_kills_restarts_and_heals_replica_1_from_its_peer(tmp_path):
    job = _job(_args(["--quick"]))
    result = run_torchft(job, tmp_path)
    assert "error" not in result, result["error"]
    # Read the replicas' own timelines, not the summary built from them.
    healthy = read_jsonl(tmp_path / "replica_0.jsonl")
    victim = read_jsonl(tmp_path / "replica_1.jsonl")
    victim_pids = [r["pid"] for r in victim if r["event"] == "start"]
    assert len(victim_pids) == 2 and victim_pids[0] != victim_pids[1], "replica 1 must have been restarted"
    first_life = [r["step"] for r in victim if r["event"] == "step" and r["pid"] == victim_pids[0]]
    assert first_life and max(first_life) < job["kill_step"], "the first life must die before the kill step"
    restarts = read_jsonl(tmp_path / "supervisor.jsonl")
    assert [(r["replica"], r["rc"]) for r in restarts] == [(1, -9)], "one restart, of replica 1, after SIGKILL"
    assert {r["pid"] for r in healthy if "pid" in r} == {healthy[0]["pid"]}, "replica 0 never restarted"
    healthy_steps = [r["step"] for r in healthy if r["event"] == "step"]
    assert healthy_steps == list(range(1, len(healthy_steps) + 1)), "replica 0 never skipped or redid a step"
    # Live recovery: the restarted replica loads the peer's state at the peer's step instead of step 0.
    second_life = [r for r in victim if r["event"] == "step" and r["pid"] == victim_pids[1]]
    healed = next(r for r in victim if r["event"] == "healed")
    assert healed["from_step"] == 0 and healed["step"] >= job["kill_step"] - 1
    assert second_life[0]["step"] == healed["step"] + 1 and second_life[0]["participants"] == 2
    assert result["lost_steps"] == 0 and result["params_equal"]
    assert 0 < result["recover_s"] < 120 and result["stall_s"] > 0


def test_torchft_side_reports_a_failing_replica_instead_of_crashing_the_bench(tmp_path):
    job = {**_job(_args(["--quick"])), "model": {"size": "no-such-size", "seq_len": 128}}
    result = run_torchft(job, tmp_path)
    # The supervisor restarts a failed replica once, then names it and its last words.
    assert set(result) == {"error"}
    assert "failed again" in result["error"] and "size='no-such-size'" in result["error"]
