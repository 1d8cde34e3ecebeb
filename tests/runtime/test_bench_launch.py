import json

import pytest

from trainmem.launch.cli import main

pytestmark = pytest.mark.slow


def test_bench_launch_quick_prints_json_beside_ray_train(capsys):
    assert main(["bench", "launch", "--quick", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("first_step_s", "detect_s", "recover_s"):
        assert result[key] > 0 and result[f"raytrain_{key}"] > 0
    # Detection is a health poll (0.5 s) plus actor-death notice, far under the 60 s hang timeout.
    assert result["detect_s"] < 10
    assert result["replacement"] == {"cold": "cold", "spare": "spare"} and result["restored_tier"] == "memory"
    assert result["lost_steps"] == 0, "snapshots every step: nothing lost, cold or spare"
    # the mpirun-launched and DeepSpeed-engine runs of the same job, each timed to its first finished step
    for key in ("first_step_s_mpirun", "first_step_s_deepspeed"):
        assert 0 < result[key] < 300 and result[f"ratio_{key}"] > 0
    assert result["deepspeed_zero_stage"] == 2
    for key in ("recover_s_spare", "recover_s_cold", "raytrain_recover_s", "raytrain_lost_steps"):
        assert key in result
