"""`trainmem bench pipeline --quick --json` runs our executor beside torch's Schedule1F1B."""

from __future__ import annotations

import json

from trainmem.parallel.bench import main


def test_quick_json(capsys):
    assert main(["--quick", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step_ratio_1f1b_vs_torch"] > 0 and res["vhalf_peak_ratio"] > 0
    for name in ("torch_1f1b", "ours_1f1b", "ours_vhalf"):
        assert len(res["peak_bytes_per_rank"][name]) == 2 and min(res["peak_bytes_per_rank"][name]) > 0
    # same model, same data, same split: the three runs compute the same loss
    losses = list(res["loss_last_stage"].values())
    assert max(losses) - min(losses) < 1e-5


def test_bad_args_exit_2(capsys):
    assert main(["--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainmem bench pipeline" in err[0]
