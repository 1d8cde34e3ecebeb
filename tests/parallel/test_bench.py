"""`trainmem bench pipeline --quick --json` runs our executor beside torch's schedules at p=2 and p=4."""

from __future__ import annotations

import json

from trainmem.parallel.bench import VARIANTS, main


def test_quick_json(capsys):
    assert main(["--quick", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("step_ratio_1f1b_vs_torch", "vhalf_peak_ratio", "step_ratio_1f1b_vs_torch_p4", "vhalf_peak_ratio_p4",
                "vmin_peak_ratio_p4", "sim_step_error_p4", "offload_peak_ratio_p4", "offload_step_ratio_p4"):
        assert res[key] > 0, key
    for p in (2, 4):
        part = res[f"p{p}"]
        for name in VARIANTS[p]:
            assert len(part["peak_bytes_per_rank"][name]) == p and min(part["peak_bytes_per_rank"][name]) > 0
        # same model, same data, same split: every variant computes the same loss
        losses = list(part["loss_last_stage"].values())
        assert len(losses) == len(VARIANTS[p]) and max(losses) - min(losses) < 1e-5
    p4 = res["p4"]
    assert set(p4["predicted_step_s"]) == set(VARIANTS[4]) - {"ours_1f1b_offload"} and p4["send_latency_s"] > 0
    # selective offload chose some stashes from the measured bandwidth, and they left the device
    assert p4["offload"]["copy_bytes_per_s"] > 0 and p4["offload"]["offloaded_stashes"] > 0
    assert res["offload_peak_ratio_p4"] < 1
    # the V-shapes hold less than 1F1B's first rank at p=4, as the schedules promise
    assert res["vmin_peak_ratio_p4"] < res["vhalf_peak_ratio_p4"] < 1


def test_bad_args_exit_2(capsys):
    assert main(["--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainmem bench pipeline" in err[0]
