"""The torchft anchor for ``trainmem bench launch``: the same GPT as 2 torchft replica groups.

HSDP-style torchft on CPU: each replica group is one process with torchft's reconfigurable
``ProcessGroupGloo``, ``DistributedDataParallel`` and ``OptimizerWrapper`` under a ``Manager``
(synchronous quorum, ``min_replica_size=1``). A ``LighthouseServer`` bound to 127.0.0.1 forms
the quorums. Replica 1 SIGKILLs itself at the start of the kill step of its first life; the
supervisor here restarts it (what torchelastic/torchx would do), and its Manager heals it live
from the healthy peer's ``state_dict`` over the process group (torchft's ``PGTransport``); no
disk checkpoint. Meanwhile the healthy replica keeps training alone (min_replicas=1).

Run as a child process so start-up is timed from a cold interpreter::

    python -m trainmem.runtime.bench_torchft JOB_JSON OUT_DIR            # supervisor + lighthouse
    python -m trainmem.runtime.bench_torchft --replica I JOB_JSON OUT_DIR LIGHTHOUSE_ADDR

Each replica appends to OUT_DIR/replica_I.jsonl: ``start`` (pid), ``kill``, ``healed`` (the step
loaded from the peer), ``step`` (step, time, loss, participants, pid) and ``done`` (params sha256).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from .runlog import append_jsonl, read_jsonl

REPLICAS = 2
KILL_REPLICA = 1
# Lighthouse: a replica that misses heartbeats this long leaves the quorum (torchft's default is 5 s;
# 1 s is as close to our 0.5 s health poll as its 100 ms heartbeats allow without false alarms).
HEARTBEAT_TIMEOUT_MS = 1000
# How long the lighthouse waits for heartbeating replicas to join a quorum once min_replicas have.
JOIN_TIMEOUT_MS = 2000
# Every torchft RPC, collective and checkpoint transfer (Manager ``timeout``/``quorum_timeout``).
OP_TIMEOUT = timedelta(seconds=60)
# Interpreter start, imports and Manager start-up of both replicas (the gang start).
START_TIMEOUT_S = 180.0
# The whole run; the supervisor names the replica it was waiting on when this runs out.
RUN_TIMEOUT_S = 600.0


def _replica_log(out_dir: Path, replica: int) -> Path:
    return out_dir / f"replica_{replica}.jsonl"


def _train_replica(replica: int, job: dict, out_dir: Path, lighthouse: str) -> int:
    import torch
    from torch.distributed import TCPStore
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    from .config import DataConfig
    from .data import open_corpus
    from .models import ModelConfig, build, lm_loss
    from .worker import state_sha256, step_seed

    log = _replica_log(out_dir, replica)
    append_jsonl(log, {"event": "start", "pid": os.getpid(), "time": time.time()})
    torch.set_num_threads(1)
    mcfg = ModelConfig(**job["model"])
    model = build(mcfg, seed=job["seed"])
    inner_opt = torch.optim.AdamW(model.parameters(), lr=job["lr"])

    def load_state(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner_opt.load_state_dict(state["optim"])

    def save_state() -> dict:
        return {"model": model.state_dict(), "optim": inner_opt.state_dict()}

    # A replica group of one process still needs its own store: the Manager publishes its address there.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=OP_TIMEOUT)
    pg = ProcessGroupGloo(timeout=OP_TIMEOUT)
    manager = Manager(
        pg=pg, load_state_dict=load_state, state_dict=save_state, min_replica_size=1,
        use_async_quorum=False,  # heal before the forward pass, so the batch is chosen by the healed step
        timeout=OP_TIMEOUT, quorum_timeout=OP_TIMEOUT, connect_timeout=OP_TIMEOUT,
        rank=0, world_size=1, store_addr="127.0.0.1", store_port=store.port,
        lighthouse_addr=lighthouse, replica_id=f"replica_{replica}", hostname="127.0.0.1",
        checkpoint_transport=PGTransport(pg, timeout=OP_TIMEOUT, device=torch.device("cpu")),
        init_sync=False,  # build() gives every replica bitwise the same initial parameters
        max_retries=3,
    )
    append_jsonl(log, {"event": "ready", "pid": os.getpid(), "time": time.time()})
    first_life = not (out_dir / "killed").exists()
    if first_life:
        _wait_for_peers(out_dir)
    ddp = DistributedDataParallel(manager, model)
    opt = Optimizer(manager, inner_opt)
    corpus = open_corpus(DataConfig())
    world = 0
    # Past ``steps`` a replica goes on until its peer is back (both in the quorum): otherwise a fast
    # healthy replica could finish alone before the restart, and no recovery would be measured.
    while manager.current_step() < job["steps"] or world < REPLICAS:
        before = manager.current_step()
        if replica == KILL_REPLICA and first_life and before + 1 >= job["kill_step"]:
            (out_dir / "killed").write_text("1")
            append_jsonl(log, {"event": "kill", "step": before + 1, "pid": os.getpid(), "time": time.time()})
            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad(set_to_none=True)  # the quorum, and healing from the peer if behind
        if manager.current_step() != before:
            append_jsonl(log, {"event": "healed", "step": manager.current_step(), "from_step": before,
                               "time": time.time()})
        step = manager.current_step() + 1
        rank, world = manager.participating_rank(), manager.num_participants()
        torch.manual_seed(step_seed(job["seed"], step, rank or 0))
        x, y = corpus.batch(seed=job["seed"], step=step, rank=rank or 0, world=max(world, 1),
                            batch_size=job["batch_size"], seq_len=mcfg.seq_len)
        loss = lm_loss(ddp(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()  # commits only if every participant's allreduce succeeded
        if manager.current_step() == step:
            append_jsonl(log, {"event": "step", "step": step, "time": time.time(), "loss": loss.item(),
                               "participants": world, "pid": os.getpid()})
    append_jsonl(log, {"event": "done", "step": manager.current_step(), "time": time.time(),
                       "params_sha256": state_sha256(model.state_dict()), "pid": os.getpid()})
    manager.shutdown(wait=False)
    return 0


def _wait_for_peers(out_dir: Path) -> None:
    """Gang start: both Managers heartbeat before either asks for a quorum.

    Otherwise the lighthouse (min_replicas=1) lets the first one up train alone from step 1 and the
    other join later by healing, which would make the first steps (and the kill step) a race.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        missing = [i for i in range(REPLICAS)
                   if not any(r["event"] == "ready" for r in read_jsonl(_replica_log(out_dir, i)))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"torchft replica(s) {missing} did not start their Manager within "
                               f"{START_TIMEOUT_S:.0f} s (see {out_dir}/replica_N.stderr)")
        time.sleep(0.05)


def _spawn(replica: int, job_json: Path, out_dir: Path, lighthouse: str) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # gloo's pairs on loopback, never a public interface
    cmd = [sys.executable, "-m", "trainmem.runtime.bench_torchft", "--replica", str(replica),
           str(job_json), str(out_dir), lighthouse]
    with open(out_dir / f"replica_{replica}.stderr", "ab") as stderr:  # the child keeps its own copy
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def _stderr_tail(out_dir: Path, replica: int) -> str:
    path = out_dir / f"replica_{replica}.stderr"
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(line for line in lines[-6:])[-800:]


def supervise(job_json: Path, out_dir: Path) -> int:
    """Lighthouse + replicas; restart a replica that dies once (as torchx's max_retries=1 would)."""
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=JOIN_TIMEOUT_MS,
                                  heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS)
    # address() names the host (e.g. http://vm:PORT); the replicas dial loopback explicitly.
    addr = f"http://127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}"
    procs = {i: _spawn(i, job_json, out_dir, addr) for i in range(REPLICAS)}
    restarts = {i: 0 for i in range(REPLICAS)}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while procs:
            for i, proc in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                if rc == 0:
                    del procs[i]
                elif restarts[i] == 0:
                    restarts[i] += 1
                    append_jsonl(out_dir / "supervisor.jsonl",
                                 {"event": "restart", "replica": i, "rc": rc, "time": time.time()})
                    procs[i] = _spawn(i, job_json, out_dir, addr)
                else:
                    print(f"torchft replica {i} failed again (exit {rc}): {_stderr_tail(out_dir, i)}",
                          file=sys.stderr)
                    return 1
            if time.monotonic() > deadline:
                print(f"torchft: timed out after {RUN_TIMEOUT_S:.0f} s waiting on replica(s) {sorted(procs)}: "
                      + "; ".join(f"{i}: {_stderr_tail(out_dir, i)}" for i in procs), file=sys.stderr)
                return 1
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=30)
        lighthouse.shutdown()
    return 0


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if r["event"] == "step"]


def summarize(job: dict, out_dir: Path, t0: float) -> dict:
    """Figures from the replicas' own timestamps (see the module docstring)."""
    healthy = read_jsonl(_replica_log(out_dir, 0))
    victim = read_jsonl(_replica_log(out_dir, KILL_REPLICA))
    kill = next(r for r in victim if r["event"] == "kill")
    lives = [r["pid"] for r in victim if r["event"] == "start"]
    first_life = [r for r in _steps(victim) if r["pid"] == lives[0]]
    second_life = [r for r in _steps(victim) if r["pid"] != lives[0]]
    rejoined = next(r for r in second_life if r["participants"] == REPLICAS)
    healed = next((r for r in victim if r["event"] == "healed" and r["time"] > kill["time"]), None)
    # When the healthy replica first ran a step without its peer: the lighthouse dropped the dead one.
    solo = [r for r in _steps(healthy) if r["participants"] < REPLICAS and r["time"] > kill["time"]]
    healthy_times = [r["time"] for r in _steps(healthy) if r["step"] >= kill["step"] - 1]
    healthy_times = [t for t in healthy_times if t <= rejoined["time"]]
    gaps = [b - a for a, b in zip(healthy_times, healthy_times[1:])]
    done = {i: next(r for r in read_jsonl(_replica_log(out_dir, i)) if r["event"] == "done")
            for i in range(REPLICAS)}
    last_before_kill = first_life[-1]["step"] if first_life else 0
    healed_step = healed["step"] if healed else 0
    all_steps = _steps(healthy) + _steps(victim)
    return {
        "first_step_s": min(r["time"] for r in all_steps) - t0,
        # Observable as the first solo step's start is not logged; its end bounds detection from above.
        "detect_s": (solo[0]["time"] - kill["time"]) if solo else None,
        "recover_s": rejoined["time"] - kill["time"],
        "stall_s": max(gaps) if gaps else 0.0,
        "restored_step": healed_step,
        "solo_steps": len(solo),
        # Steps the restarted replica redid that its peer had already done: none when it healed live
        # at the peer's step; before the kill it had finished ``last_before_kill``.
        "lost_steps": max(0, last_before_kill - healed_step),
        "victim_last_step_before_kill": last_before_kill,
        "victim_pids": lives,
        "healthy_pids": sorted({r["pid"] for r in healthy if "pid" in r}),
        "params_equal": done[0]["params_sha256"] == done[KILL_REPLICA]["params_sha256"],
        "final_step": [done[i]["step"] for i in range(REPLICAS)],
        "wall_s": max(r["time"] for r in done.values()) - t0,
    }


def run_torchft(job: dict, work: Path) -> dict:
    """The torchft side of the bench: figures, or ``{"error": ...}`` naming what failed."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "trainmem.runtime.bench_torchft",
                               str(work / "job.json"), str(work)],
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        return {"error": f"torchft supervisor did not finish in {RUN_TIMEOUT_S + 60:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"torchft run failed ({proc.returncode}): {proc.stderr.strip()[-800:]}"}
    try:
        return summarize(job, work, t0)
    except (StopIteration, KeyError, IndexError) as e:
        return {"error": f"torchft run left incomplete timelines in {work} ({type(e).__name__}: {e})"}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--replica"]:
        replica, job_json, out_dir, lighthouse = int(argv[1]), Path(argv[2]), Path(argv[3]), argv[4]
        return _train_replica(replica, json.loads(job_json.read_text()), out_dir, lighthouse)
    return supervise(Path(argv[0]), Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
