"""Native ops, built once per machine instead of on a job's first use.

DeepSpeed JIT-compiles its CPU ops (CPU Adam, the async-I/O swapper behind NVMe offload, the
shared-memory all-reduce), and the product-key selection kernel is compiled the same way; on two
cores each build takes 20-140 s. All of them are cached in one directory, inside the virtual
environment unless TORCH_EXTENSIONS_DIR names another. ``python -m trainmem.native`` (a step of
``make install``) fills that cache, the way DeepSpeed's ``DS_BUILD_OPS=1`` pre-builds at install.
A build that fails is reported and skipped, not fatal: each op has a slower path at runtime, and
a job retries the build when it needs the op.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# DeepSpeed's CPU builds that trainmem's paths load (offload/params, parallel/deepspeed_engine).
DEEPSPEED_OPS = ("CPUAdamBuilder", "AsyncIOBuilder", "ShareMemCommBuilder")


def extensions_dir() -> str:
    """Where JIT-built ops are cached; set in the environment so that child processes share it."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def import_deepspeed():
    """``import deepspeed``, minus its hold on the default process group.

    DeepSpeed's ``TorchBackend.barrier`` and ``monitored_barrier`` take ``GroupMember.WORLD`` as a
    default argument, bound when deepspeed is first imported. Imported after ``init_process_group``
    (where the engines load it), that default keeps the gloo group alive past
    ``destroy_process_group``; its worker threads then drop their last collectives while the
    interpreter shuts down, take the GIL, and the process aborts ("terminate called without an
    active exception", SIGABRT, about 1 exit in 10 here). Both methods read None as WORLD, so None
    is the same default without the reference.
    """
    import torch.distributed as dist

    _cache_cpu_info()
    import deepspeed
    from deepspeed.comm.torch import TorchBackend

    for fn in vars(TorchBackend).values():
        defaults = getattr(fn, "__defaults__", None)
        if defaults and any(isinstance(d, dist.ProcessGroup) for d in defaults):
            fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in defaults)
    return deepspeed


def _cache_cpu_info() -> None:
    """One py-cpuinfo probe per process instead of three.

    ``cpuinfo.get_cpu_info`` runs a Python subprocess on every call (~0.4 CPU-s); DeepSpeed calls it
    three times to construct CPU Adam (the op's architecture and SIMD flags, then the vendor check).
    The CPU does not change under a running process, so the first answer serves the rest (copied:
    callers may edit the dict).
    """
    import copy
    import functools

    import cpuinfo

    if getattr(cpuinfo.get_cpu_info, "cached_per_process", False):
        return
    probe = functools.cache(cpuinfo.get_cpu_info)

    def get_cpu_info() -> dict:
        return copy.deepcopy(probe())

    get_cpu_info.cached_per_process = True
    cpuinfo.get_cpu_info = get_cpu_info  # DeepSpeed imports it from the package at each call


def _build_deepspeed_op(name: str) -> None:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    if builder is None:
        raise RuntimeError(f"{get_accelerator().device_name()} accelerator has no {name}")
    if not builder.is_compatible(verbose=False):
        raise RuntimeError(f"{name} is not buildable here (DeepSpeed's compatibility check failed; "
                           "AsyncIOBuilder needs libaio-dev: make system-deps)")
    builder.load(verbose=False)


def _build_pk_select() -> None:
    from trainmem.memory_services.layers.pk_select import kernel

    if kernel() is None:
        raise RuntimeError("the product-key kernel did not build (see the warning above)")


def build_all(report=print) -> dict[str, str]:
    """Build (or find cached) every op; ``{op: "ok" | reason}``, one ``report`` line per op."""
    extensions_dir()
    steps = [(name, lambda n=name: _build_deepspeed_op(n)) for name in DEEPSPEED_OPS]
    steps.append(("pk_select", _build_pk_select))
    results = {}
    for i, (name, build) in enumerate(steps, 1):
        t0 = time.monotonic()
        try:
            build()
            results[name] = "ok"
        except Exception as e:  # a missing compiler or library: the runtime falls back
            results[name] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        report(f"[{i}/{len(steps)}] {name}: {results[name]} ({time.monotonic() - t0:.1f} s)")
    return results


def main() -> int:
    print(f"trainmem: building native ops into {extensions_dir()} (cached; first time 2-4 min on 2 cores)",
          flush=True)
    results = build_all(lambda line: print(line, flush=True))
    failed = [n for n, r in results.items() if r != "ok"]
    if failed:
        print(f"trainmem: {', '.join(failed)} not built; those paths fall back to slower code", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
