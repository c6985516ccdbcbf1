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
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--cases", "sft,dpo", "--shape", "tiny", "--seq", "48",
               "--batch", "2", "--steps", "3", "--warmup", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["date"]
    cases = {c["case"]: c for c in report["cases"]}
    assert set(cases) == {"sft", "dpo"}
    for case in cases.values():
        for side in ("ours", "trl"):
            assert case[side]["seconds_per_step"] > 0 and case[side]["tokens_per_second"] > 0
        assert case["throughput_ratio"] == pytest.approx(case["ours"]["items_per_second"] / case["trl"]["items_per_second"])
    assert "| sft |" in out.with_suffix(".md").read_text()
