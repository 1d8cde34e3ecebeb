import json

import pytest

from trainmem.launch.cli import main

pytestmark = pytest.mark.slow


def test_bench_launch_quick_prints_json_beside_ray_train(capsys):
    # the mpirun, DeepSpeed and torchft runs have their own tests (test_mpirun, test_deepspeed_job,
    # test_bench_torchft, test_s3_durable); here they are skipped to keep the suite short
    assert main(["bench", "launch", "--quick", "--json", "--no-mpirun", "--no-deepspeed", "--no-torchft",
                 "--no-storage"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("first_step_s", "detect_s", "recover_s"):
        assert result[key] > 0 and result[f"raytrain_{key}"] > 0
    # Detection is a health poll (0.5 s) plus actor-death notice, far under the 60 s hang timeout.
    assert result["detect_s"] < 10
    assert result["replacement"] == {"cold": "cold", "spare": "spare"} and result["restored_tier"] == "memory"
    assert result["lost_steps"] == 0, "snapshots every step: nothing lost, cold or spare"
    assert "first_step_s_mpirun" not in result and "first_step_s_deepspeed" not in result  # skipped, not faked
    assert result["torchft_error"].startswith("skipped")
    for key in ("recover_s_spare", "recover_s_cold", "raytrain_recover_s", "raytrain_lost_steps"):
        assert key in result
