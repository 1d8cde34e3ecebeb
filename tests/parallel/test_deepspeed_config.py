"""[engine] kind = 'deepspeed': the DeepSpeed config is checked key by key, refusals name the key and the fix."""

from __future__ import annotations

import json

import pytest

from trainmem.launch.cli import main
from trainmem.parallel import build_deepspeed_json, check_deepspeed_config


@pytest.mark.parametrize("table,key", [
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "optimizer"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 32}, "train_batch_size"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "bf16.enabled"),
    ({"zero_optimization": {"stage": 2}, "tensorboard": {"enabled": True}}, "tensorboard"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
     "zero_optimization.offload_param.nvme_path"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
     "zero_optimization.offload_optimizer.device"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param.device"),
    ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "zero_optimization.elastic_checkpoint"),
    ({"zero_optimization": {"stage": 2, "zero_hpz_partition_size": 2}}, "zero_optimization.zero_hpz_partition_size"),
])
def test_unsupported_keys_are_refused_by_name(table, key):
    with pytest.raises(ValueError) as e:
        check_deepspeed_config(table)
    assert str(e.value).startswith(f"deepspeed_config.{key}"), str(e.value)
    assert "fix" in str(e.value) or "must be" in str(e.value)


def test_trainmem_sets_batch_optimizer_and_clipping_from_train():
    ds = build_deepspeed_json({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                               "bf16": {"enabled": False}}, batch_size=4, lr=2e-3, weight_decay=0.1, grad_clip=0.5)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5 and "bf16" not in ds
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.1, "betas": [0.9, 0.999],
                                                            "eps": 1e-8, "torch_adam": True}}
    offloaded = build_deepspeed_json({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                                     batch_size=4, lr=1e-3, weight_decay=0.0, grad_clip=1.0)
    assert "torch_adam" not in offloaded["optimizer"]["params"], "offloaded: DeepSpeedCPUAdam, as DeepSpeed requires"


def _job(tmp_path, engine: str) -> str:
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nsize = "tiny"\n[train]\nsteps = 3\nrun_dir = "{tmp_path / "run"}"\n[engine]\n{engine}')
    return str(job)


def test_config_check_reads_the_json_file_and_names_the_bad_key(tmp_path, capsys):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "cpu_offload": True}}))
    assert main(["config", "check", _job(tmp_path, 'kind = "deepspeed"\ndeepspeed_config = "ds.json"')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ds.json" in err and "zero_optimization.cpu_offload" in err, err
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert main(["config", "check", _job(tmp_path, 'kind = "deepspeed"\ndeepspeed_config = "ds.json"')]) == 0
    assert main(["config", "check", _job(tmp_path, 'kind = "deepspeed"\ndeepspeed_config = "missing.json"')]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_inline_table_and_engine_conflicts_are_refused(tmp_path, capsys):
    bad = 'kind = "deepspeed"\n[engine.deepspeed_config]\ngradient_clipping = 1.0\nzero_optimization = {stage = 1}'
    assert main(["config", "check", _job(tmp_path, bad)]) == 2
    assert "engine.deepspeed_config.gradient_clipping" in capsys.readouterr().err
    ok = 'kind = "deepspeed"\ndeepspeed_config = {zero_optimization = {stage = 1}}\n[pipeline]\nstages = 2'
    assert main(["config", "check", _job(tmp_path, ok)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.stages" in err and "deepspeed" in err
