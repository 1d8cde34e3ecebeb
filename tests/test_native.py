"""Native ops are built by ``make install`` into the one cache that every user of them reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trainmem.native import DEEPSPEED_OPS, extensions_dir

# The shared object each op leaves in its build folder (DeepSpeed names the folder after the op).
LIBRARIES = {"CPUAdamBuilder": "cpu_adam/cpu_adam.so", "AsyncIOBuilder": "async_io/async_io.so",
             "ShareMemCommBuilder": "deepspeed_shm_comm/deepspeed_shm_comm.so"}


def test_the_cache_defaults_to_the_venv_and_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert extensions_dir() == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_dir() == str(tmp_path)


def test_install_built_every_op_and_a_rerun_loads_them_without_rebuilding():
    cache = Path(sys.prefix) / "torch_extensions"
    built = [cache / LIBRARIES[name] for name in DEEPSPEED_OPS] + list(cache.glob("trainmem_pk_select_*/*.so"))
    assert len(built) == len(DEEPSPEED_OPS) + 1 and all(p.exists() for p in built), \
        f"make install did not build into {cache}: {[str(p) for p in built if not p.exists()]}"
    before = {p: p.stat().st_mtime_ns for p in built}
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    proc = subprocess.run([sys.executable, "-m", "trainmem.native"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line.split()[1].rstrip(":") for line in lines] == [*DEEPSPEED_OPS, "pk_select"]
    assert all(": ok (" in line for line in lines), proc.stdout
    assert {p: p.stat().st_mtime_ns for p in built} == before, "a cached op was rebuilt"


def test_the_product_key_kernel_is_built_in_the_shared_cache(monkeypatch):
    from trainmem.memory_services.layers.pk_select import kernel

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert kernel() is not None
    assert list((Path(sys.prefix) / "torch_extensions").glob("trainmem_pk_select_*/*.so"))


_GROUP_EXIT = """
import os, sys
import torch.distributed as dist
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
if sys.argv[2] == "ours":
    from trainmem.offload.params.optim import load_deepspeed_adam
    load_deepspeed_adam()
else:
    import deepspeed
dist.barrier()
dist.destroy_process_group()
print(before, threads())
"""


def test_deepspeed_loaded_after_init_process_group_leaves_the_group_free_to_destroy(tmp_path):
    # A group that outlives destroy_process_group keeps gloo threads running into interpreter shutdown,
    # where they abort the process about 1 exit in 10 (what failed `bench placement` in CI). The control
    # shows why the workaround exists: a plain `import deepspeed` there keeps the group's threads alive.
    counts = {}
    for how in ("ours", "plain"):
        proc = subprocess.run([sys.executable, "-c", _GROUP_EXIT, str(tmp_path / f"rendezvous-{how}"), how],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[how] = [int(x) for x in proc.stdout.split()[-2:]]
    before, after = counts["ours"]
    assert after == before, f"the gloo group's threads outlived destroy_process_group ({before} -> {after})"
    assert counts["plain"][1] > counts["plain"][0], "DeepSpeed no longer pins the group: drop import_deepspeed"


_CPU_PROBES = """
import subprocess, sys, torch
probes = []
start = subprocess.Popen.__init__
def counting(self, args, *rest, **kw):
    probes.extend(a for a in (args if isinstance(args, (list, tuple)) else [args]) if "cpuinfo" in str(a))
    return start(self, args, *rest, **kw)
subprocess.Popen.__init__ = counting
if sys.argv[1] == "ours":
    from trainmem.native import import_deepspeed
    import_deepspeed()
from deepspeed.ops.adam import DeepSpeedCPUAdam
DeepSpeedCPUAdam(torch.nn.Linear(4, 4).parameters())
DeepSpeedCPUAdam(torch.nn.Linear(4, 4).parameters())
print(len(probes))
"""


def test_a_process_probes_the_cpu_once_however_often_deepspeed_asks():
    counts = {}
    for how in ("ours", "plain"):
        proc = subprocess.run([sys.executable, "-c", _CPU_PROBES, how], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[how] = int(proc.stdout.split()[-1])
    # plain: a Python subprocess (~0.4 CPU-s) per DeepSpeed call, three for the first optimizer (op flags, vendor)
    assert counts == {"ours": 1, "plain": 4}
