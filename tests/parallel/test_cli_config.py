"""`trainmem schedule` CLI and the [pipeline] config."""

from __future__ import annotations

import json

import pytest

from trainmem.parallel import PipelineConfig, build_schedule, layout_for, stage_layout
from trainmem.parallel.cli import main


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_show_json_and_png(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert main(["show", "1f1b", "-p", "4", "-m", "8", "--json", "--png", str(png)]) == 0
    res = _last_json(capsys)
    assert res["bubble"] == pytest.approx(3 / 11, abs=1e-6)
    assert res["peak_mb"] == [4, 3, 2, 1]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_show_costs_and_csv(tmp_path, capsys):
    csv = tmp_path / "s.csv"
    assert main(["show", "zb-h1", "-p", "2", "-m", "4", "--costs", "1,2,1", "--csv", str(csv), "--json"]) == 0
    res = _last_json(capsys)
    assert res["schedule"] == "zb-h1" and len(res["peak_mb"]) == 2
    assert main(["validate", str(csv), "--layout", "1f1b", "-p", "2", "-m", "4", "--json"]) == 0
    assert _last_json(capsys)["valid"] is True


def test_pick_json(capsys):
    assert main(["pick", "-p", "4", "-m", "8", "--budget", "3", "--costs", "1,1,1", "--json"]) == 0
    res = _last_json(capsys)
    assert max(res["peak_mb"]) <= 3
    assert main(["pick", "-p", "4", "-m", "8", "--budget", "0.1", "--json"]) == 1


@pytest.mark.parametrize("argv", [
    ["show", "nope", "-p", "4", "-m", "8"],
    ["show", "1f1b", "-p", "4"],
    ["show", "1f1b", "-p", "4", "-m", "8", "--costs", "x"],
    ["pick", "-p", "4", "-m", "8"],
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainmem schedule:")


def test_config_checks_name_the_field():
    assert PipelineConfig(schedule="V_Half", stages=4, microbatches=8).schedule == "v-half"
    for kwargs, start in [
        (dict(schedule="nope"), "schedule='nope'"),
        (dict(stages=0), "stages=0"),
        (dict(microbatches=0), "microbatches=0"),
        (dict(schedule="1f1b", chunks=2), "chunks=2"),
        (dict(schedule="interleaved", stages=4, microbatches=6), "microbatches=6"),
        (dict(stages=2, layers_per_stage=[1, 2, 3]), "layers_per_stage=[1, 2, 3]"),
        (dict(timeout_s=0), "timeout_s=0"),
    ]:
        with pytest.raises(ValueError) as err:
            PipelineConfig(**kwargs)
        assert str(err.value).startswith(start)


def test_config_builds_schedule_and_layout():
    cfg = PipelineConfig(schedule="v-half", stages=2, microbatches=4, layers_per_stage=[1, 2, 2, 1])
    sched = build_schedule(cfg)
    assert sched.v == 2 and sched.placement == [[0, 3], [1, 2]]
    assert layout_for(cfg, 6) == [[(0, 1), (3, 1)], [(1, 2), (2, 2)]]
    assert any(a.kind.value == "OFFLOAD" for a in build_schedule(PipelineConfig(stages=2, microbatches=4, offload=True)).ranks[0])
    assert stage_layout("1f1b", 3, 7) == [[(0, 2)], [(1, 3)], [(2, 2)]]
    with pytest.raises(ValueError, match="layers_per_stage"):
        stage_layout("1f1b", 2, 4, layers_per_stage=[1, 1])


def test_mesh_groups_are_pipeline_major_and_cover_every_rank_once():
    from trainmem.parallel import mesh_groups

    pipelines, data = mesh_groups(3, 2)
    assert pipelines == [[0, 2, 4], [1, 3, 5]] and data == [[0, 1], [2, 3], [4, 5]]
    for p, d in [(1, 1), (2, 2), (4, 3), (8, 2)]:
        pipes, groups = mesh_groups(p, d)
        assert sorted(r for g in pipes for r in g) == list(range(p * d)) == sorted(r for g in groups for r in g)
        assert all(pipes[r % d][r // d] == r and r in groups[r // d] for r in range(p * d))
    with pytest.raises(ValueError, match="replicas=0"):
        mesh_groups(2, 0)


def test_job_spec_takes_the_activation_policy_inside_a_pipeline_but_not_beside_pipeline_offload():
    from trainmem.offload import ActivationConfig
    from trainmem.runtime.config import ClusterConfig, JobSpec, TrainConfig

    pipe = dict(schedule="1f1b", stages=2, microbatches=4)
    cluster, train = ClusterConfig(workers=2), TrainConfig(batch_size=8)
    for mode, budget in [("auto", 0.5), ("offload", None), ("recompute", None)]:
        spec = JobSpec(memory=ActivationConfig(activations=mode, activation_budget=budget),
                       pipeline=PipelineConfig(**pipe), cluster=cluster, train=train)
        assert spec.memory.activations == mode
    with pytest.raises(ValueError) as err:
        JobSpec(memory=ActivationConfig(activations="auto", activation_budget=0.5),
                pipeline=PipelineConfig(**pipe, offload="selective"), cluster=cluster, train=train)
    assert str(err.value).startswith("memory.activations='auto' cannot combine with pipeline.offload='selective'")


def test_a_replica_group_is_the_data_parallel_ranks_of_one_stage():
    from trainmem.runtime.config import ClusterConfig, JobSpec, TrainConfig
    from trainmem.runtime.engines import replica_groups

    for stages, workers, groups in [(2, 4, [[0, 1], [2, 3]]), (2, 2, [[0], [1]]), (3, 6, [[0, 1], [2, 3], [4, 5]])]:
        spec = JobSpec(pipeline=PipelineConfig(schedule="1f1b", stages=stages, microbatches=stages),
                       cluster=ClusterConfig(workers=workers), train=TrainConfig(batch_size=6 * stages))
        assert replica_groups(spec) == groups
    assert replica_groups(JobSpec(cluster=ClusterConfig(workers=3))) == [[0, 1, 2]]
