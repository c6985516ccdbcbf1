"""The GPU suite (`make test-gpu`, i.e. `pytest -m gpu`): skipped where no CUDA device is present, and in
plain CPU runs of the test suite unless the marker expression selects gpu (or PTCOMPILE_GPU_TESTS=1).

Every generated script trains on a GPU: a random-init model of a real preset's shape (gpu_plans.SHAPE,
written by `ptcompile tiny DIR --shape ...` as a user would), bf16 autocast over fp32 master weights, bundled
learnable data, and the helper models a run needs (a teacher, a reward model, a PRM, a warm-started policy:
gpu_plans.HELPERS) trained first by the generated scripts on the same model; the objective moves the right
way, nothing is NaN, and peak memory stays within the estimator's prediction once ptcompile has one. QLoRA runs too (each method compiled with --peft qlora for the
preset). Methods are discovered from the knowledge base, so a new method is covered as soon as it exists.
Results are merged into docs/gpu-results.json and docs/gpu-results.md is re-rendered at the end."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_harness import RESULTS_JSON, merge_results, run_case
from gpu_plans import SHAPE

ROOT = Path(__file__).resolve().parents[2]


def _cases():
    from ptcompile.gpu_report import expected_runs
    from ptcompile.knowledge_base import KnowledgeBase

    return expected_runs(KnowledgeBase.load())


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def gpu_only(request):
    if not _cuda():
        pytest.skip("no CUDA device")
    if "gpu" not in (request.config.getoption("markexpr") or "") and os.environ.get("PTCOMPILE_GPU_TESTS") != "1":
        pytest.skip("the GPU suite runs with `make test-gpu` (pytest -m gpu)")


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("shape") / SHAPE
    subprocess.run([sys.executable, "-m", "ptcompile.cli", "tiny", str(directory), "--shape", SHAPE], check=True, cwd=ROOT)
    return directory


@pytest.fixture(scope="module")
def gpu_results():
    """Collects every run's record; after the module, merges them into the JSON and re-renders the page."""
    results: list = []
    yield results
    if results:
        from ptcompile.gpu_report import write_gpu_report
        from ptcompile.knowledge_base import KnowledgeBase

        merge_results(ROOT / RESULTS_JSON, results)
        write_gpu_report(KnowledgeBase.load(), ROOT)


@pytest.mark.gpu
@pytest.mark.parametrize(("method", "peft"), _cases(), ids=lambda v: v or "full")
def test_generated_script_trains_on_the_gpu(kb, shape_dir, tmp_path, gpu_results, method, peft):
    result, process = run_case(kb, method, peft, shape_dir, tmp_path, SHAPE, gpu=True)
    gpu_results.append(result)
    assert process.returncode == 0, (process.stdout[-2000:], process.stderr[-4000:])
    assert result.finite, "a logged value is NaN or inf"
    assert result.passed, (result.objective, result.start, result.end, result.notes)
