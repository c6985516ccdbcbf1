"""The benchmark harness runs end to end on CPU with the tiny model and writes the fields the report needs.
(Timings are not asserted: on a CPU they mean nothing; the GPU run is benchmarks/README.md's command.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_harness_writes_side_by_side_results(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--cases", "sft,dpo,grpo,sft-packed", "--shape", "tiny", "--seq", "48",
               "--batch", "2", "--steps", "3", "--warmup", "1", "--grpo-prompts", "2", "--grpo-generations", "2",
               "--grpo-prompt", "16", "--grpo-completion", "8", "--work", str(tmp_path / "work"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["date"]
    cases = {c["case"]: c for c in report["cases"]}
    assert set(cases) == {"sft", "dpo", "grpo", "sft-packed"}
    for case in cases.values():
        for side in ("ours", "trl"):
            assert case[side]["seconds_per_step"] > 0 and case[side]["tokens_per_second"] > 0
        assert case["throughput_ratio"] == pytest.approx(case["ours"]["tokens_per_second"] / case["trl"]["tokens_per_second"])
    assert "| sft |" in out.with_suffix(".md").read_text() and "s/step" in out.with_suffix(".md").read_text()
    # GRPO: both sides sampled every completion to the same length (a random model never stops early)
    ours_lengths = [json.loads(line)["completion_length"] for line in (tmp_path / "work" / "ours_grpo_run" / "metrics.jsonl").read_text().splitlines()]
    assert ours_lengths == [8.0, 8.0, 8.0]
    assert "2 prompts x 2 generations" in cases["grpo"]["setting"]
    padding = cases["sft-packed"]["padding"]
    assert padding["real_tokens"] > 0 and 0 <= padding["packed"] <= padding["unpacked"] < 1


def test_padding_fractions_count_the_positions_padding_fills():
    """Worked by hand: lengths 3, 5, 3, 5 as one micro-batch of 4 rows: padded to 5, 20 positions hold 16
    real tokens. The sft script's best-fit-decreasing pack() into rows of 8 makes [5+3], [5+3]: no padding."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import padding_fractions, script_function, ultrachat_like_lengths

    pack = script_function("sft", "pack")
    result = padding_fractions([3, 5, 3, 5], batch=4, seq=8, pack=pack)
    assert result["real_tokens"] == 16 and result["packed_rows"] == 2
    assert result["unpacked"] == pytest.approx(4 / 20) and result["packed"] == pytest.approx(0.0)
    lengths = ultrachat_like_lengths(4000, seq=4096)
    assert 1300 < sum(lengths) / len(lengths) < 1600 and max(lengths) == 4096  # the bundled mean, a long tail cut at seq
    assert ultrachat_like_lengths(50, seq=4096) == lengths[:50]  # seeded


@pytest.mark.slow
def test_gpu_memory_check_runs_the_scripts_and_writes_the_estimator_table(tmp_path):
    """benchmarks/gpu_memory_check.py end to end on the tiny shape: the scripts run, the estimate sits beside
    each row, and without CUDA the measured column says so instead of inventing a number."""
    out = tmp_path / "memory.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_memory_check.py"), "--configs", "tiny", "--steps", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["method"], r["shape"]) for r in report["rows"]] == [("sft", "tiny"), ("dpo", "tiny")]
    for row in report["rows"]:
        assert row["estimated_gib"] > 0 and row["measured_gib"] is None and row["error"] is None
    assert "n/a (no CUDA)" in out.with_suffix(".md").read_text()
