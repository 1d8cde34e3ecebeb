"""Stage splits from measured per-layer costs, the simulator on measured costs, the run record and
`trainmem schedule pick --from-run`."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmem.parallel import (Costs, LayerCost, PipelineConfig, SavedBytesMeter, balance_layers, layer_costs_record,
                               layout_for, make_schedule, predict, profile_layers, read_run_costs, simulate, stage_costs)
from trainmem.parallel.cli import main
from trainmem.runtime.models import ModelConfig, build, lm_loss


def _layer(name, f, b, nbytes=0):
    return LayerCost(name=name, forward_s=f, backward_s=b, saved_bytes=nbytes)


def _stage_sums(layers, counts):
    out, start = [], 1
    for s, n in enumerate(counts):
        part = list(layers[start:start + n]) + ([layers[0]] if s == 0 else []) + ([layers[-1]] if s == len(counts) - 1 else [])
        start += n
        out.append((sum(c.forward_s + c.backward_s for c in part), sum(c.saved_bytes for c in part)))
    return out


def _compositions(n, k):
    for cuts in itertools.combinations_with_replacement(range(n + 1), k - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(k)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 5)), min_size=3, max_size=9), st.integers(1, 4))
def test_balance_is_optimal_against_brute_force(raw, n_stages):
    layers = [_layer(f"l{i}", t, t, nb * 1000) for i, (t, nb) in enumerate(raw)]
    counts = balance_layers(layers, n_stages, time_slack=0.0)
    assert len(counts) == n_stages and sum(counts) == len(layers) - 2 and min(counts) >= 0
    every = [(max(t for t, _ in _stage_sums(layers, c)), max(b for _, b in _stage_sums(layers, c)))
             for c in _compositions(len(layers) - 2, n_stages)]
    best_time = min(t for t, _ in every)
    got = _stage_sums(layers, counts)
    assert max(t for t, _ in got) == best_time
    assert max(b for _, b in got) == min(b for t, b in every if t == best_time)


def test_heavy_head_and_embedding_take_blocks_away_from_their_stages():
    blocks = [_layer(f"b{i}", 1.0, 2.0) for i in range(8)]
    even = balance_layers([_layer("embed", 0, 0), *blocks, _layer("head", 0, 0)], 4)
    assert even == [2, 2, 2, 2]
    heavy = balance_layers([_layer("embed", 3.0, 3.0), *blocks, _layer("head", 6.0, 3.0)], 4)
    assert heavy[0] < 2 and heavy[-1] < 2 and sum(heavy) == 8


def test_bytes_break_ties_within_the_time_slack():
    layers = [_layer("embed", 0, 0), _layer("a", 1, 1, 100), _layer("b", 1, 1, 10), _layer("c", 1, 1, 10),
              _layer("head", 0, 0)]
    # times allow [1, 2] and [2, 1] equally; [2, 1] puts the 100-byte block with a 10-byte one
    assert balance_layers(layers, 2, time_slack=0.0) == [1, 2]


def test_stage_costs_and_prediction_match_the_unit_simulator():
    blocks = [_layer(f"b{i}", 1.0, 2.0, 1000) for i in range(4)]
    layers = [_layer("embed", 0, 0), *blocks, _layer("head", 0, 0)]
    per = stage_costs(layers, [1, 1, 1, 1])
    assert per[0].b == 0 and per[0].w == 2.0  # the first stage's backward is all W
    assert [(c.f, c.b, c.w) for c in per[1:]] == [(1.0, 1.0, 1.0)] * 3
    sched = make_schedule("1f1b", 4, 8)
    assert predict(sched, layers, [1, 1, 1, 1]).makespan == pytest.approx(simulate(sched, Costs(f=1, b=1, w=1)).makespan)
    assert max(predict(sched, layers, [1, 1, 1, 1]).peak_mb) == 4 * 1000
    zbv = make_schedule("zb-v", 2, 4)  # 4 stages of 1 block, v = 2: unit costs halve per stage
    assert predict(zbv, layers, [1, 1, 1, 1]).makespan > 0
    with pytest.raises(ValueError, match="layers_per_stage"):
        stage_costs(layers, [1, 1, 1])


def _gpt_layers(n_layer=4):
    model = build(ModelConfig(size="tiny", n_layer=n_layer, seq_len=16), seed=0)
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    layers = [("embed", model.embed)] + [(f"block{i}", b) for i, b in enumerate(model.blocks)] + [("head", model.head)]
    return model, layers, x, y


def test_profile_layers_times_and_counts_a_real_model():
    model, layers, x, y = _gpt_layers()
    costs = profile_layers(layers, lambda: lm_loss(model(x), y), exclude=[x, y], steps=2)
    assert [c.name for c in costs] == ["embed", "block0", "block1", "block2", "block3", "head"]
    assert all(c.forward_s > 0 and c.backward_s > 0 for c in costs)
    with SavedBytesMeter(list(model.parameters()), exclude=[x, y]) as meter:  # one whole forward, counted apart
        loss = lm_loss(model(x), y)
        whole = meter.bytes
    del loss
    assert sum(c.saved_bytes for c in costs) == whole
    assert len({c.saved_bytes for c in costs[1:-1]}) == 1  # identical blocks save identical bytes
    assert all(p.grad is not None for p in model.parameters())


def test_config_split_auto():
    blocks = [_layer(f"b{i}", 1.0, 1.0) for i in range(6)]
    costs = [_layer("embed", 0, 0), *blocks, _layer("head", 4.0, 4.0)]
    cfg = PipelineConfig(schedule="1f1b", stages=2, microbatches=4, split="auto")
    assert layout_for(cfg, 6, costs) == [[(0, 5)], [(1, 1)]]
    assert layout_for(PipelineConfig(schedule="1f1b", stages=2, microbatches=4), 6) == [[(0, 3)], [(1, 3)]]
    with pytest.raises(ValueError, match="needs the model's measured layer costs"):
        layout_for(cfg, 6)
    with pytest.raises(ValueError, match="expected 8"):
        layout_for(cfg, 6, costs[:-1])
    for kwargs, start in [(dict(split="fast"), "split='fast'"),
                          (dict(split="auto", stages=2, layers_per_stage=[1, 1]), "split='auto'")]:
        with pytest.raises(ValueError) as err:
            PipelineConfig(**kwargs)
        assert str(err.value).startswith(start)


def _write_run(run_dir, costs, step_times, schedule="1f1b", p=2, m=4, split=None):
    run_dir.mkdir()
    record = {"time": 0.0, "event": "layer_costs",
              **layer_costs_record(costs, schedule=schedule, stages=p, microbatches=m, layers_per_stage=split,
                                   microbatch_size=2, seq_len=16, device="cpu")}
    (run_dir / "events.jsonl").write_text(json.dumps({"time": 0.0, "event": "start"}) + "\n" + json.dumps(record) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0, "step_time_s": t}) + "\n"
                                                   for i, t in enumerate(step_times)))


def test_pick_from_run_uses_measured_costs_and_reports_prediction_vs_measurement(tmp_path, capsys):
    model, layers, x, y = _gpt_layers()
    costs = profile_layers(layers, lambda: lm_loss(model(x), y), exclude=[x, y], steps=2)
    predicted = predict(make_schedule("1f1b", 2, 4), costs, [2, 2]).makespan
    _write_run(tmp_path / "run", costs, [9.0] + [predicted * 1.25] * 5, split=[2, 2])
    back = read_run_costs(tmp_path / "run")
    assert back.layers == costs and back.pipeline["layers_per_stage"] == [2, 2] and len(back.measured_step_s) == 5
    budget = 10 * sum(c.saved_bytes for c in costs)
    assert main(["pick", "--from-run", str(tmp_path / "run"), "--budget-bytes", str(budget), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["unit"] == "bytes" and res["peak_bytes"] and max(res["peak_bytes"]) <= budget
    assert sum(res["layers_per_stage"]) == 4 and res["predicted_step_s"] > 0
    assert res["run"]["schedule"] == "1f1b" and res["run"]["predicted_step_s"] == pytest.approx(predicted)
    assert res["run"]["error"] == pytest.approx(1 / 1.25 - 1)
    assert any("simulator predicts" in line for line in out)
    # no offloaded candidates without a measured copy bandwidth
    assert main(["pick", "--from-run", str(tmp_path / "run"), "--budget-bytes", "1"]) == 1


@pytest.mark.parametrize("argv,why", [
    (["pick", "--from-run", "RUN", "--budget", "3"], "--budget-bytes"),
    (["pick", "--budget-bytes", "3", "-p", "2", "-m", "4"], "--from-run"),
    (["pick", "--budget", "3"], "-p and -m"),
    (["pick", "--from-run", "MISSING", "--budget-bytes", "3"], "no events.jsonl"),
    (["pick", "--from-run", "EMPTY", "--budget-bytes", "3"], "no layer_costs record"),
])
def test_pick_from_run_usage_errors(tmp_path, capsys, argv, why):
    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "events.jsonl").write_text("")
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "events.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    argv = [str(tmp_path / a) if a in ("RUN", "MISSING", "EMPTY") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]
