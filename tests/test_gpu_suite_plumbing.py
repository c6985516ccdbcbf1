"""The GPU suite's plumbing, checked on CPU: every family has a plan, every generated script is a method the
suite runs, every plan row runs its scripts end to end (helpers included) and names a key they log, the
harness measures a real run and renders the results page, its verdict can fail, and
`ptcompile tiny DIR --shape PRESET` builds models of real presets' shapes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "gpu"))

from gpu_harness import WRITTEN_DATA, Result, judge, merge_results, read_rows, run_case, script_options  # noqa: E402
from gpu_plans import BASE, HELPERS, PLANS, Plan, plan_for  # noqa: E402


def test_every_family_has_a_gpu_plan(kb):
    from ptcompile.knowledge_base import FAMILY_FORMATS

    families = set(FAMILY_FORMATS) | {e.record.script.family for e in kb.methods.values()}
    assert families <= set(PLANS), f"add a row for {sorted(families - set(PLANS))} to tests/gpu/gpu_plans.py"
    assert set(PLANS) <= families | set(kb.methods), f"rows that are neither a family nor a method: {sorted(set(PLANS) - families - set(kb.methods))}"
    for family, plan in PLANS.items():
        assert plan.objectives and all(direction in ("up", "down", "none") for _, direction in plan.objectives), family
        assert plan.steps > 0 and plan.margin >= 0


def _row_methods(kb) -> dict[str, list[str]]:
    """Each plan row and the methods it runs (a method's own row, else its family's)."""
    rows: dict[str, list[str]] = {}
    for method in sorted(kb.methods):
        rows.setdefault(method if method in PLANS else kb.methods[method].record.script.family, []).append(method)
    return rows


def _representative(row: str, methods: list[str]) -> str:
    """The row's method that takes the most of its inputs (distillation-hard for sft: the teacher helper
    gets built and passed), the first by name among equals."""
    from conftest import generated_script

    inputs = {flag for flag, _ in PLANS[row].inputs}
    return sorted(methods, key=lambda m: -len(inputs & script_options(generated_script(m))))[0]  # stable: by name among equals


def _kb():
    from ptcompile.knowledge_base import KnowledgeBase

    return KnowledgeBase.load()


ROWS = _row_methods(_kb())


def test_every_plan_flag_and_helper_is_used_by_a_script_of_its_row(kb, tiny):
    """The harness passes a script only the flags it has (a family's row serves all its methods), so a
    misspelt flag would silently do nothing: each one must be an option of some script the row runs."""
    from conftest import generated_script

    for row, methods in _row_methods(kb).items():
        plan = PLANS[row]
        options = set().union(*(script_options(generated_script(m)) for m in methods))
        assert len(plan.extra) % 2 == 0, row
        flags = set(plan.extra[::2]) | {flag for flag, _ in plan.inputs}
        assert flags <= options, f"row {row}: no script of {methods} has {sorted(flags - options)}"
        assert all(name == BASE or name in HELPERS for _, name in plan.inputs), row
    data = {p.name for p in (tiny / "data").glob("*.jsonl")} | set(WRITTEN_DATA)
    assert all(helper.method in kb.methods for helper in HELPERS.values())
    assert {h.data for h in HELPERS.values()} | {p.data for p in PLANS.values() if p.data} <= data


def test_the_gpu_suite_runs_every_generated_script(kb):
    from ptcompile.gpu_report import expected_runs
    from ptcompile.recipe import resolve
    from ptcompile.render import default_script_name

    scripts = {p.name for p in (ROOT / "generated").glob("*.py")}
    covered = {default_script_name(resolve(kb, method)) for method, _ in expected_runs(kb)}
    assert scripts == covered, f"generated scripts the GPU suite would not run: {sorted(scripts - covered)}"
    assert {m for m, p in expected_runs(kb) if p == "qlora"} >= {m for m, e in kb.methods.items() if e.record.script.family != "inference"}


def test_the_committed_results_page_says_which_methods_never_ran(kb):
    from ptcompile.gpu_report import expected_runs, load_results, render_gpu_report

    page = (ROOT / "docs" / "gpu-results.md").read_text(encoding="utf-8")
    assert page == render_gpu_report(kb, load_results(ROOT)), "docs/gpu-results.md is stale: run `ptcompile build`"
    ran = {(r["method"], r["peft"]) for r in load_results(ROOT)["runs"]}
    if not ran:
        assert "**No GPU run has happened yet.**" in page
    for method, peft in expected_runs(kb):
        if (method, peft) not in ran:
            assert f"- `{method}`: " in page and (peft or "full fine-tuning") in page.split(f"- `{method}`: ")[1].splitlines()[0]


@pytest.mark.parametrize(
    ("values", "direction", "passed"),
    [([5.0, 4.9, 4.8, 3.0, 2.9, 2.8, 2.7, 2.6], "down", True), ([5.0] * 8, "down", False), ([5.0, 6.0] * 4, "down", False),
     ([0.0, 0.1, 0.2, 0.9, 1.0, 1.1, 1.2, 1.3], "up", True), ([0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1], "up", False),
     # An accuracy table of two budgets: the first against the last, not each against itself.
     ([0.5, 0.9], "up", True), ([0.9, 0.5], "up", False)],
)
def test_the_verdict_can_fail(values, direction, passed):
    plan = Plan((("objective", direction),), margin=0.2)
    result = Result("m", None, "f", "s.py", "shape", "dev", "2025-01-01")
    judge(plan, [{"objective": v, "step": i + 1} for i, v in enumerate(values)], result)
    assert result.passed is passed and result.finite


def test_a_nan_fails_the_verdict():
    plan = Plan((("loss", "down"),), margin=0.2)
    result = Result("m", None, "f", "s.py", "shape", "dev", "2025-01-01")
    judge(plan, [{"loss": v, "step": i} for i, v in enumerate([5.0, 4.0, 3.0, 2.0, math.nan, 1.0, 1.0, 1.0])], result)
    assert not result.finite and not result.passed


def test_a_plan_naming_a_key_the_script_does_not_log_fails():
    plan = Plan((("rewards/margin", "up"),), margin=0.1)
    result = Result("m", None, "f", "s.py", "shape", "dev", "2025-01-01")
    with pytest.raises(AssertionError, match="none of \\['rewards/margin'\\] is logged"):
        judge(plan, [{"loss": 0.7, "step": 1}, {"loss": 0.6, "step": 2}], result)


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(ROWS))
def test_each_plan_row_runs_its_scripts_and_names_a_logged_key(kb, tiny, tmp_path, row):
    """One method per plan row (every family's row, and the rows of methods that differ from their family),
    2 steps on the tiny model on CPU through the GPU harness, its helper models trained first as on the GPU:
    the run finishes, logs the row's first objective key (accuracy.json's table for test-time scaling),
    and every logged number is finite. Fewer prompts keep the generating scripts to seconds."""
    method = _representative(row, ROWS[row])
    result, process = run_case(kb, method, None, tiny, tmp_path, "tiny", gpu=False, steps=2, extra=["--max_prompts", "16"])
    assert process.returncode == 0, (method, process.stdout[-2000:], process.stderr[-3000:])
    key = PLANS[row].objectives[0][0]
    logged = set().union(*(r.keys() for r in read_rows(tmp_path / "run")))
    assert key in logged, f"{method} (row {row}) logs {sorted(logged)}, not {key}: fix the row in tests/gpu/gpu_plans.py"
    assert result.objective == key and result.finite, (result.objective, result.notes)
    assert plan_for(kb, method) is PLANS[row]


def test_the_harness_measures_a_real_run_and_renders_the_page(kb, tiny, tmp_path):
    """The GPU suite's run_case on CPU with the tiny model: every field the page needs is filled."""
    from ptcompile.gpu_report import render_gpu_report

    result, process = run_case(kb, "sft", None, tiny, tmp_path, "tiny", gpu=False, steps=8)
    assert process.returncode == 0, process.stderr[-3000:]
    assert result.steps == 8 and result.objective == "loss" and result.direction == "down" and result.finite
    assert result.steps_per_second > 0 and result.tokens_per_second > 0
    assert result.peak_memory_gib is None  # no CUDA here
    assert math.isfinite(result.start) and math.isfinite(result.end)
    data = merge_results(tmp_path / "gpu-results.json", [result])
    assert json.loads((tmp_path / "gpu-results.json").read_text())["runs"][0]["method"] == "sft"
    page = render_gpu_report(kb, data)
    assert "| sft | full | CPU" in page and "No GPU run has happened yet" not in page
    assert "- `sft`: qlora" in page and "- `dpo`: full fine-tuning, qlora" in page


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "llama3.2-1b", "qwen3-0.6b", "smollm2-135m", "gemma2-2b-it", "phi3-mini-instruct", "mixtral-8x7b-instruct"])
def test_random_init_models_take_the_presets_shape(kb, preset):
    """The config `ptcompile tiny --shape` builds has exactly the preset's parameter count (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptcompile.paths import assets_dir
    from ptcompile.tiny import model_config

    tokenizer = AutoTokenizer.from_pretrained(assets_dir() / "tiny")
    record = kb.model(preset)
    config = model_config(record, tokenizer)
    assert config.model_type == record.architecture.model_type
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == record.num_parameters


def test_the_shape_command_writes_a_loadable_llama_shaped_model(tmp_path):
    """`ptcompile tiny DIR --shape smollm2-135m` (Llama architecture, 135M) end to end; the Qwen2 and other
    shapes share the code path (previous test). The scripts load it like any Hub model."""
    import torch
    from transformers import AutoModelForCausalLM

    target = tmp_path / "shape"
    subprocess.run([sys.executable, "-m", "ptcompile.cli", "tiny", str(target), "--shape", "smollm2-135m"], check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(target / "model", dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134515008
    assert (target / "data" / "chat.jsonl").is_file()
