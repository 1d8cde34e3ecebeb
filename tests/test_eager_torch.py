"""trainmem.eager_torch: eager training without importing torch._dynamo, and the same results either way."""

from __future__ import annotations

import json
import subprocess
import sys

# One process per case: whether torch._dynamo is imported is a per-process fact.
_TRAIN = """
import hashlib, json, sys, torch
if {defer}:
    from trainmem.eager_torch import defer_dynamo_import
    patched = defer_dynamo_import()
    assert defer_dynamo_import() == patched  # idempotent
else:
    patched = 0
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opts = [torch.optim.AdamW(model[0].parameters(), lr=1e-2, weight_decay=0.1),
        torch.optim.SGD(model[2].parameters(), lr=1e-2, momentum=0.9)]
for step in range(5):
    x = torch.randn(32, 8)
    loss = model(x).pow(2).mean()
    loss.backward()
    for opt in opts:
        opt.step()
        opt.zero_grad()
    if step == 2:  # a checkpoint round trip through both optimizers
        for opt in opts:
            opt.load_state_dict(opt.state_dict())
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({{"patched": patched, "dynamo": "torch._dynamo" in sys.modules, "sha": digest,
                  "grad_enabled": torch.is_grad_enabled()}}))
"""

_COMPILED = """
import json, sys, torch
if {defer}:
    from trainmem.eager_torch import defer_dynamo_import
    defer_dynamo_import()
from torch._dynamo.testing import CompileCounter
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.randn(2, 4)).sum().backward()

def step(x):
    y = (x * 2).sum()
    opt.step()
    opt.zero_grad()
    return y + 1

counter = CompileCounter()
torch.compile(step, backend=counter)(torch.ones(3))
cached = getattr(torch.optim.Optimizer.zero_grad.__wrapped__, "__dynamo_disable")  # torch's disable wrapper
print(json.dumps({{"frames": counter.frame_count, "ops": counter.op_count, "cached": type(cached).__qualname__}}))
"""


def _run(template: str, defer: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", template.format(defer=defer)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eager_training_imports_no_dynamo_and_is_bitwise_the_same():
    deferred, plain = _run(_TRAIN, True), _run(_TRAIN, False)
    assert plain["dynamo"]  # control: torch's optimizers import it on first use (the cost being removed)
    assert deferred["patched"] >= 5 and not deferred["dynamo"]
    assert deferred["sha"] == plain["sha"]
    assert deferred["grad_enabled"] and plain["grad_enabled"]  # step restores grad mode as torch's does


def test_compiled_code_sees_torchs_graph_breaks():
    # Once torch.compile runs, the patched step and zero_grad take torch's path: the same graphs are cut.
    assert _run(_COMPILED, True) == _run(_COMPILED, False)
