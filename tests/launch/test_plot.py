from __future__ import annotations

from trainmem.launch.cli import main
from trainmem.runtime.runlog import append_jsonl


def test_plot_draws_a_png_of_a_run(tmp_path):
    for step in range(1, 6):
        append_jsonl(tmp_path / "metrics.jsonl", {"step": step, "loss": 5.0 - step * 0.1, "tokens_per_s": 1000.0,
                                                   "peak_mem_bytes": 2**30, "attempt": int(step > 3),
                                                   "step_time_s": 0.1, "time": 100.0 + step})
    append_jsonl(tmp_path / "events.jsonl", {"event": "failure_detected", "time": 103.5})
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_an_empty_run_is_a_usage_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl has no steps" in capsys.readouterr().err
