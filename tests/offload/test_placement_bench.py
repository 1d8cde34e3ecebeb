"""`trainmem bench placement --quick --json` runs every side in its own 2-rank child and ends with one JSON
object carrying the issue's keys; the same GPT, data and seed give the same losses on every fp32 side."""

from __future__ import annotations

import json

import pytest

from trainmem.offload.params import bench


@pytest.mark.slow
def test_quick_json(capsys):
    # fsdp2, ours_fused, ours_disk and ZeRO-Infinity run in the full bench only (each side is a 2-rank child,
    # ~35 s here); the disk tier's arithmetic is checked in test_placement_engine
    assert bench.main(["--quick", "--json", "--sides", "ours"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("step_ratio_vs_deepspeed", "host_bytes_per_param_ratio_vs_deepspeed", "max_params_ratio_vs_deepspeed",
                "bytes_moved_vs_min", "loss_max_rel_diff"):
        assert key in result
    sides = result["sides"]
    assert {"ours", "deepspeed"} == set(sides)
    assert all("error" not in r for r in sides.values()), {k: r.get("error") for k, r in sides.items()}
    assert result["loss_max_rel_diff"] <= 1e-6
    assert result["bytes_moved_vs_min"] >= 1.0  # nothing moves less than the trace's optimum
    assert sides["ours"]["arena_peak_bytes"] <= result["device_budget_bytes"]

