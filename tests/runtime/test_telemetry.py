"""NVML telemetry on a machine without a GPU: one nvml_unavailable event with NVML's reason, nothing else;
[placement] device_bytes='auto' names the same reason; `trainmem plot` draws GPU memory when a run has it."""

from __future__ import annotations

import struct

import pytest

from trainmem.launch.cli import main
from trainmem.offload import PlacementConfig
from trainmem.runtime.runlog import append_jsonl
from trainmem.runtime.telemetry import GpuTelemetry


def test_without_a_gpu_one_event_names_the_reason_and_nothing_is_recorded():
    events = []
    telemetry = GpuTelemetry(lambda name, **fields: events.append((name, fields)), announce=True)
    assert not telemetry.available
    assert [name for name, _ in events] == ["nvml_unavailable"]
    assert "NVML" in events[0][1]["reason"] or "nvml" in events[0][1]["reason"].lower(), events
    assert telemetry.sample() == {} and len(events) == 1
    quiet = []
    GpuTelemetry(lambda name, **fields: quiet.append(name), announce=False)  # ranks other than 0 stay silent
    assert quiet == []


def test_placement_device_bytes_auto_names_nvml_without_a_gpu():
    with pytest.raises(ValueError, match=r"device_bytes='auto'.*NVML.*fix: give a size"):
        PlacementConfig(device_bytes="auto")


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_plot_adds_a_gpu_memory_panel_when_metrics_carry_gpus(tmp_path):
    for run, gpus in (("cpu", False), ("gpu", True)):
        (tmp_path / run).mkdir()
        for step in range(1, 5):
            record = {"step": step, "loss": 5.0, "tokens_per_s": 1.0, "peak_mem_bytes": 2**30, "attempt": 0,
                      "step_time_s": 0.1, "time": 100.0 + step}
            if gpus:
                record["gpus"] = [{"index": i, "mem_used_bytes": (step + i) * 2**30, "mem_total_bytes": 80 * 2**30,
                                   "util_pct": 90, "power_w": 300.0, "temp_c": 60} for i in range(2)]
            append_jsonl(tmp_path / run / "metrics.jsonl", record)
        assert main(["plot", str(tmp_path / run)]) == 0
    (w_cpu, h_cpu), (w_gpu, h_gpu) = _png_size(tmp_path / "cpu" / "run.png"), _png_size(tmp_path / "gpu" / "run.png")
    assert w_cpu == w_gpu and h_gpu > h_cpu, "a fourth panel (GPU memory) for the run with GPU readings"
