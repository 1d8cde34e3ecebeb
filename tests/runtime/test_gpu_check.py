"""`make gpu-check`: without CUDA it says "no CUDA", prints its JSON line and exits 0. The device checks it runs
on a GPU are run here on CPU (same code, same references; the CUDA-only measurements are skipped by the checks
themselves), and a check that raises is reported as a failure while the others still run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from trainmem.runtime import gpu_check

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_make_gpu_check_without_cuda_says_so_and_exits_0():
    proc = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"cuda": False, "passed": None, "checks": {}}


def test_activation_offload_check_on_cpu():
    r = gpu_check.check_activation_offload(CPU)
    assert r["pass"], r
    assert r["grads_bitwise_equal"] and r["figure"] > 0


def test_placement_check_on_cpu():
    r = gpu_check.check_placement(CPU)
    assert r["pass"], r
    assert r["arena_peak_bytes"] <= r["budget_bytes"] and r["moved_host_to_device_bytes"] > 0
    assert "disk" in r["state_homes"] and r["moved_host_to_disk_bytes"] > 0
    assert r["losses"] == r["plain_losses"]  # same host AdamW kernel on CPU: bitwise


def test_snapshot_capture_check_on_cpu():
    r = gpu_check.check_snapshot_capture(CPU)
    assert r["pass"] and r["bitwise_equal"], r


def test_memory_layer_check_on_cpu():
    r = gpu_check.check_memory_layer(CPU)
    assert r["pass"] and r["same_slots"], r


def test_a_raising_check_fails_and_the_others_still_run(capsys):
    def broken():
        raise RuntimeError("no such kernel")

    results = gpu_check.run_checks({"broken": broken, "fine": lambda: {"pass": True, "figure": 1, "unit": "x"}})
    assert results["broken"]["pass"] is False and "no such kernel" in results["broken"]["error"]
    assert results["fine"]["pass"] is True
    assert "broken: FAIL" in capsys.readouterr().err

