"""A trainer's start-up: what a new rank (or a spare taking one over) loads before its first step."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import tiny_overrides

# In a fresh process, as a Ray worker runs a rank: prewarm, then the rank's optimizers and a first step.
_FIRST_STEP = """
import json, sys
from pathlib import Path
from trainmem.runtime import load_spec
from trainmem.runtime.engines import clip_by_total_norm
from trainmem.runtime.models import lm_loss
from trainmem.runtime.optim import build_optimizer
from trainmem.runtime.worker import Worker

spec = load_spec(None, json.loads(sys.argv[1]))
trainer = Worker.__ray_metadata__.modified_class.__ray_actor_class__  # the class inside the Ray actor
worker = trainer(spec, 1, None, rank=0)  # sends this process's output to the rank's log
worker.prewarm()
params = list(worker.model.parameters())
opt = build_optimizer(worker.model, params, spec.train)
x, y = worker.corpus.batch(seed=0, step=0, rank=0, world=1, batch_size=2, seq_len=spec.model.seq_len)
lm_loss(worker.model(x), y).backward()
clip_by_total_norm(params, 1.0, reduce=False)
opt.step()
opt.zero_grad()
opt.load_state_dict(opt.state_dict())
Path(sys.argv[2]).write_text(json.dumps({"dynamo": "torch._dynamo" in sys.modules}))
"""


def test_a_rank_reaches_its_first_step_without_importing_torch_dynamo(tmp_path):
    overrides = tiny_overrides(tmp_path / "run")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", _FIRST_STEP, json.dumps(overrides), str(out)],
                          capture_output=True, text=True, timeout=300)
    log = tmp_path / "run" / "logs" / "rank-0.log"
    assert proc.returncode == 0, (proc.stderr + (log.read_text() if log.exists() else ""))[-3000:]
    # ~1 CPU-s per rank start (and per spare takeover) that torch's optimizers would spend importing it
    assert json.loads(out.read_text()) == {"dynamo": False}
