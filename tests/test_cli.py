"""The `ptcompile` command line: compile, list, show, diff, validate, and its errors."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from ptcompile.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dpo_for_llama3_8b_names_the_model_paper_and_sourced_beta(capsys):
    code, out, err = run_cli(capsys, "dpo", "--model", "llama3-8b")
    assert code == 0, err
    tree = ast.parse(out)
    assert "meta-llama/Meta-Llama-3-8B" in out
    assert "2305.18290" in out
    args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
    fields = {n.target.id: n for n in args.body if isinstance(n, ast.AnnAssign)}
    assert ast.literal_eval(fields["beta"].value) == 0.1
    # the docstring right under `beta` names its source
    index = args.body.index(fields["beta"])
    doc = args.body[index + 1].value.value
    assert "rafailov2023direct" in doc and "Appendix B" in doc


def test_output_file_is_not_overwritten_without_force(capsys, tmp_path):
    target = tmp_path / "train_dpo.py"
    target.write_text("# my edits\n")
    code, _, err = run_cli(capsys, "dpo", "--model", "llama3-8b", "-o", str(target))
    assert code == 2 and "--force" in err
    assert target.read_text() == "# my edits\n"
    code, _, err = run_cli(capsys, "dpo", "--model", "llama3-8b", "-o", str(target), "--force")
    assert code == 0, err
    ast.parse(target.read_text())


@pytest.mark.parametrize(
    "setting, message",
    [
        ("beta=abc", "expected a float"),
        ("beta=5", "outside the range"),
        ("beta=nan", "expected a float"),
        ("per_device_train_batch_size=2.5", "expected a int"),
        ("lr_scheduler_type=exponential", "not one of"),
        ("betta=0.2", "did you mean beta"),
        ("beta", "name=value"),
    ],
)
def test_set_is_type_and_range_checked(capsys, setting, message):
    code, _, err = run_cli(capsys, "dpo", "--model", "tiny", "--set", setting)
    assert code == 2
    assert message in err


def test_set_value_reaches_the_script_and_says_so(capsys):
    code, out, _ = run_cli(capsys, "dpo", "--model", "tiny", "--set", "beta=0.25")
    assert code == 0
    assert "beta: float = 0.25" in out
    assert "Compiled with --set beta=0.25; default 0.1" in " ".join(out.split())


@pytest.mark.parametrize("argv, wanted", [(["dpp"], "'dpo'"), (["dpo", "--model", "llama3-8"], "'llama3-8b'"), (["dpo", "--peft", "lorra"], "'lora'")])
def test_unknown_names_list_the_closest(capsys, argv, wanted):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "did you mean" in err and wanted in err


def test_list_json_and_text(capsys, kb):
    for kind, table in (("methods", kb.methods), ("models", kb.models), ("papers", kb.papers), ("datasets", kb.datasets)):
        code, out, _ = run_cli(capsys, "list", kind, "--json")
        assert code == 0
        records = json.loads(out)
        assert len(records) == len(table)
        code, out, _ = run_cli(capsys, "list", kind)
        assert f"{len(table)} {kind}" in out


def test_show_prints_sources_and_the_command(capsys):
    code, out, _ = run_cli(capsys, "show", "dpo")
    assert code == 0
    assert "beta = 0.1" in out and "source: rafailov2023direct, Appendix B" in out
    assert "Eq. 7" in out and "https://arxiv.org/abs/2305.18290" in out
    assert "ptcompile dpo --model" in out


def test_diff_shows_only_the_algorithmic_difference(capsys):
    code, out, _ = run_cli(capsys, "diff", "sft", "sft")
    assert code == 0 and out == ""
    code, out, _ = run_cli(capsys, "diff", "dpo", "dpo", "--model", "llama3-8b")
    assert out == ""


def test_validate_reports_counts(capsys, kb):
    code, out, _ = run_cli(capsys, "validate")
    assert code == 0 and f"{len(kb.methods)} methods" in out


def test_console_script_runs_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ptcompile.cli", "dpo", "--model", "llama3-8b"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ast.parse(result.stdout)
