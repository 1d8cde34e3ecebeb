"""``trainmem bench NAME [--json]``: each benchmark lives beside the code it measures."""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, str] = {
    "launch": "trainmem.runtime.bench_launch",
    "checkpoint": "trainmem.checkpoint.bench",
    "memory": "trainmem.memory_services.bench",
    "activations": "trainmem.offload.activations.bench",
    "placement": "trainmem.offload.params.bench",
    "pipeline": "trainmem.parallel.bench",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: trainmem bench NAME [--json] [options]\n\nbenchmarks: " + ", ".join(BENCHES))
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHES:
        print(f"trainmem bench: unknown benchmark {name!r} (fix: one of {', '.join(BENCHES)})", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[name]).main(argv[1:]) or 0)
