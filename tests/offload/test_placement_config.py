"""Bad [placement] input fails fast through the CLI (`trainmem config check` and `trainmem plan`): exit 2, one
line naming the key and, where a budget is the problem, the smallest value that works; a good one plans."""

from __future__ import annotations

import json

import pytest

from trainmem.launch.cli import main
from trainmem.offload import PlacementConfig, parse_bytes

BASE = {"model": {"size": "small"}, "train": {"batch_size": 4}, "cluster": {"workers": 2}}


def _toml(tables: dict) -> str:
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def _job(tmp_path, placement: dict, **extra) -> str:
    tables = {**BASE, **extra, "placement": placement}
    path = tmp_path / "job.toml"
    path.write_text(_toml(tables))
    return str(path)


BAD = [
    ({"device_bytes": "2 gigs"}, "placement.device_bytes", "is not a size"),
    ({"device_bytes": "4MiB"}, "placement.device_bytes", "smallest value that works is 18874368"),
    ({"device_bytes": "64MiB", "host_bytes": "100TiB"}, "placement.host_bytes", "largest value that works"),
    ({"device_bytes": "64MiB", "host_bytes": "1MiB"}, "placement.host_bytes", "smallest value that works is"),
    ({"device_bytes": "64MiB", "disk_path": "/tmp"}, "placement.disk_bytes", "disk_path and disk_bytes go together"),
    ({"device_bytes": "64MiB", "disk_path": "/tmp", "disk_bytes": "1000TiB"}, "placement.disk_bytes",
     "largest value that works there"),
    ({"device_bytes": "64MiB", "host_bytes": "60MiB", "disk_path": "/tmp", "disk_bytes": "1MiB"},
     "placement.disk_bytes", "smallest value that works is"),
    ({"device_bytes": "64MiB", "chunk_bytes": 1000}, "placement.chunk_bytes", "multiple of 4096"),
    ({"device_bytes": "64MiB", "chunk_bytes": 4096}, "placement.chunk_bytes", "smallest value that works is"),
    ({"device_bytes": "64MiB", "optimizer": "sgd"}, "placement.optimizer", "must be one of"),
    ({"device_bytes": "64MiB", "micro_batches": 3}, "placement.micro_batches", "must divide train.batch_size=4"),
    ({"device_bytes": "64MiB", "prefetch_chunks": -1}, "placement.prefetch_chunks", "smallest that works: 0"),
    ({"host_bytes": "1GiB"}, "placement.device_bytes", "needs device_bytes"),
    ({"device_byte": "64MiB"}, "placement.device_byte", "unknown key"),
]


@pytest.mark.parametrize("command", ["check", "plan"])
@pytest.mark.parametrize("placement,key,text", BAD, ids=[f"{k}:{t[:20]}" for _, k, t in BAD])
def test_bad_placement_exits_2_naming_the_key(tmp_path, capsys, command, placement, key, text):
    job = _job(tmp_path, placement)
    argv = ["config", "check", job] if command == "check" else ["plan", job]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{key}" in err and text in err, err


def test_placement_with_activation_offload_is_refused(tmp_path, capsys):
    job = _job(tmp_path, {"device_bytes": "64MiB"}, memory={"activations": "recompute"})
    assert main(["config", "check", job]) == 2
    assert "placement.device_bytes" in capsys.readouterr().err


def test_smallest_named_value_then_plans(tmp_path, capsys):
    assert main(["plan", _job(tmp_path, {"device_bytes": "4MiB"})]) == 2
    smallest = int(capsys.readouterr().err.split("smallest value that works is ")[1].split()[0])
    assert main(["plan", _job(tmp_path, {"device_bytes": smallest}), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["device_bytes"] <= smallest and plan["arena_slots"] == plan["min_slots"]


def test_plan_prints_placement(tmp_path, capsys):
    job = _job(tmp_path, {"device_bytes": "40MiB", "host_bytes": "80MiB", "disk_path": str(tmp_path),
                          "disk_bytes": "1GiB"})
    assert main(["plan", job]) == 0
    text = capsys.readouterr().out
    for needle in ("chunk", "waste", "device", "host", "disk", "exp_avg_sq", "moved/step", "host->disk",
                   "disk->host", "host->device"):
        assert needle in text, needle
    assert main(["plan", job, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["homes"]["exp_avg_sq"] == "disk" and plan["homes"]["param"] == "host"
    assert plan["host_bytes"] <= parse_bytes("80MiB", "host_bytes")
    assert 0 <= plan["waste_fraction"] < 0.2
    assert set(plan["moved_per_step"]) >= {"host->device", "device->host", "network", "disk->host", "host->disk"}


def test_sizes_parse():
    assert parse_bytes("2GiB", "k") == 2 << 30 and parse_bytes("1.5GB", "k") == 1_500_000_000
    assert parse_bytes(4096, "k") == 4096
    assert not PlacementConfig().enabled
