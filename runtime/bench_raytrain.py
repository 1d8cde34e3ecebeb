"""The anchor for ``trainmem bench launch``: the same GPT under Ray Train's ``TorchTrainer``.

Run as a child process (``python -m trainmem.runtime.bench_raytrain JOB_JSON OUT_DIR``) so that its
start-up is timed from a cold interpreter, as ours is. Rank 1 SIGKILLs itself at the kill step
of the first attempt; ``FailureConfig(max_failures=1)`` restarts the group, which restores from
Ray Train's own checkpoint (written every ``every_steps`` with ``ray.train.report``).
Timestamps go to OUT_DIR/timeline.jsonl: step completions (rank 0), the kill, and Ray Train's
controller noticing the failure (``UserCallback.after_exception``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .runlog import append_jsonl


def _train_fn(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from .config import DataConfig
    from .data import open_corpus
    from .models import ModelConfig, build, lm_loss
    from .worker import step_seed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    timeline = Path(config["out_dir"]) / "timeline.jsonl"
    torch.set_num_threads(1)
    mcfg = ModelConfig(**config["model"])
    model = build(mcfg, seed=config["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
        if rank == 0:
            append_jsonl(timeline, {"event": "restored", "step": start, "time": time.time()})
    ddp = ray.train.torch.prepare_model(model)
    corpus = open_corpus(DataConfig())
    attempt_marker = Path(config["out_dir"]) / "killed"
    for step in range(start + 1, config["steps"] + 1):
        if rank == config["kill_rank"] and step == config["kill_step"] and not attempt_marker.exists():
            attempt_marker.write_text("1")
            append_jsonl(timeline, {"event": "kill", "step": step, "time": time.time()})
            os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(step_seed(config["seed"], step, rank))
        x, y = corpus.batch(seed=config["seed"], step=step, rank=rank, world=world,
                            batch_size=config["batch_size"], seq_len=mcfg.seq_len)
        loss = lm_loss(ddp(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            append_jsonl(timeline, {"event": "step", "step": step, "time": time.time()})
        if step % config["every_steps"] == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                               os.path.join(d, "state.pt"))
                ray.train.report({"step": step, "loss": loss.item()},
                                 checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def main(job_json: str, out_dir: str) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.callback import UserCallback

    config = json.loads(Path(job_json).read_text())
    timeline = Path(out_dir) / "timeline.jsonl"

    class FailureClock(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            append_jsonl(timeline, {"event": "detected", "ranks": sorted(worker_exceptions), "time": time.time()})

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, config["workers"]), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={**config, "out_dir": out_dir},
        scaling_config=ScalingConfig(num_workers=config["workers"], use_gpu=False),
        run_config=RunConfig(
            name="bench-launch", storage_path=str(Path(out_dir) / "storage"),
            failure_config=FailureConfig(max_failures=1), callbacks=[FailureClock()],
        ),
    )
    trainer.fit()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
