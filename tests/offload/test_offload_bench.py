"""`trainmem bench activations --quick --json` runs every policy and ends with one JSON object."""

from __future__ import annotations

import json

import pytest

from trainmem.offload.activations import bench


@pytest.mark.slow
def test_quick_json(capsys):
    assert bench.main(["--quick", "--json", "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    policies = {r["policy"] for r in result["rows"]}
    assert policies == {"none", "checkpoint", "save_on_cpu", "ours@50%", "ours@25%"}
    assert {"rows", "extra_vs_recompute_50", "budget_respected"} <= set(result)
    assert result["budget_respected"] is True
    for r in result["rows"]:
        assert {"policy", "seq_len", "peak_bytes", "step_s"} <= set(r)
    by = {(r["size"], r["policy"]): r for r in result["rows"]}
    # full recompute re-runs every block's forward; our 50% plan recomputes less
    assert by[("small", "checkpoint")]["recomputed_flops"] > by[("small", "ours@50%")]["recomputed_flops"]
    assert by[("small", "ours@25%")]["peak_bytes"] < 0.3 * by[("small", "none")]["peak_bytes"]
