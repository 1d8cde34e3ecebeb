"""The [services] table, the example file, and the serve / bench command lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainmem.launch import serve_cmd
from trainmem.memory_services import ServicesConfig
from trainmem.runtime.spec_loader import ConfigError, build_dataclass, explain

REPO = Path(__file__).resolve().parents[2]


def test_example_memory_toml_parses():
    cfg = serve_cmd.load_services(str(REPO / "examples" / "memory.toml"))
    assert isinstance(cfg, ServicesConfig)
    assert cfg.http.host == "127.0.0.1" and cfg.retriever.kind == "hnsw" and cfg.consolidation.distill
    assert cfg.http.auth == "token" and ServicesConfig(http=cfg.http).http.auth == "token"  # secure by default


@pytest.mark.parametrize(
    "table,needle",
    [
        ({"retriever": {"kind": "annoy"}}, "services.retriever.kind: kind='annoy' must be flat, ivf or hnsw"),
        ({"consolidation": {"schedule": "every tuesday"}}, "services.consolidation.schedule"),
        ({"http": {"prot": 80}}, "services.http.prot: unknown key"),
        ({"embedding_dim": 128}, "services.embedding_dim: embedding_dim=128 must be 384"),
        ({"memory_layer": {"topk": "8"}}, "services.memory_layer.topk"),
        ({"http": {"auth": "none", "host": "0.0.0.0"}}, "services.http.auth: auth='none' is only allowed on a loopback"),
        ({"http": {"auth": "basic"}}, "services.http.auth"),
        ({"memory_layer": {"shard_by": "diagonal"}}, "services.memory_layer.shard_by"),
        ({"memory_layer": {"layer": 1}}, "services.memory_layer.layer: layer=1 needs from_run"),
        ({"retriever": {"replicas": 0}}, "services.retriever.replicas"),
    ],
)
def test_bad_services_table_names_the_key(table, needle):
    with pytest.raises(ConfigError) as e:
        build_dataclass(ServicesConfig, table, "job.toml", "services")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_field_is_documented():
    rows = explain(ServicesConfig, "services")
    assert rows and all(doc for *_, doc in rows), [key for key, *_, doc in rows if not doc]


def test_serve_usage_errors_exit_2(tmp_path, capsys):
    assert serve_cmd.main([str(tmp_path / "missing.toml")]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[services.http]\nport = -1\n")
    assert serve_cmd.main([str(bad)]) == 2
    unset = tmp_path / "token.toml"
    unset.write_text(f'[services]\nstore_path = "{tmp_path / "s"}"\nembedding_dim = 16\n[services.retriever]\n'
                     'embedder = "none"\n[services.memory_layer]\nenabled = false\n'
                     '[services.http]\ntoken_env = "TRAINMEM_TEST_UNSET_TOKEN_VAR"\nport = 0\n')
    assert serve_cmd.main([str(unset)]) == 2
    with pytest.raises(SystemExit) as e:
        serve_cmd.main([])
    assert e.value.code == 2
    assert serve_cmd.main([str(bad), "--from-run", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("trainmem serve: ")]
    assert len(err) == 5, err
    assert "port=-1" in err[1] and "TRAINMEM_TEST_UNSET_TOKEN_VAR" in err[2]


@pytest.mark.slow
def test_bench_quick_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainmem.launch.cli", "bench", "memory", "--quick", "--json", "--seconds", "0.2"],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env={**__import__("os").environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("pkm_fwd_speedup", "pkm_fwd_speedup_bf16", "sparse_vs_dense_step", "retriever_qps_ratio",
                "recall_at_10", "write_speedup_1m", "lookup_handle_ratio", "lookup_http_ratio",
                "lookup_sharded_columns_ratio", "consolidation_entries_per_s"):
        assert result[key] > 0, key
    assert result["lookup_sharded_ratio"] is None, "--quick measures the default layout only: skipped, not faked"
    assert result["recall_at_10"] >= 0.9
