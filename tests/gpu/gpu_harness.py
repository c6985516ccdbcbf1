"""Run one generated script on a GPU (or, for the CPU plumbing test, on the CPU) and measure it.

A result records: method, PEFT, family, script, model shape, device name, date, steps, steps/s, tokens/s,
peak GPU memory, the memory the estimator predicts (when ptcompile has one), the objective at start and end,
and whether it moved the right way with every logged number finite.

Before a run that needs another model (gpu_plans.Plan.inputs), the harness trains it with the generated
script of gpu_plans.HELPERS, as a user of ptcompile would, under DIR/helpers/ of the model directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import platform
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpu_plans import BASE, HELPERS, RUN_FLAGS, Plan, plan_for

RESULTS_JSON = "docs/gpu-results.json"


@dataclass
class Result:
    method: str
    peft: str | None
    family: str
    script: str
    shape: str
    device: str
    date: str
    steps: int = 0
    steps_per_second: float | None = None
    tokens_per_second: float | None = None
    peak_memory_gib: float | None = None
    predicted_memory_gib: float | None = None
    objective: str | None = None
    direction: str | None = None
    start: float | None = None
    end: float | None = None
    finite: bool = False
    passed: bool = False
    notes: list[str] = field(default_factory=list)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()})"


def pick_objective(plan: Plan, rows: list[dict]) -> tuple[str, str]:
    logged = set().union(*(row.keys() for row in rows)) if rows else set()
    for key, direction in plan.objectives:
        if key in logged:
            return key, direction
    raise AssertionError(f"none of {[k for k, _ in plan.objectives]} is logged (keys: {sorted(logged)}): fix the row in tests/gpu/gpu_plans.py")


def ends(values: list[float]) -> tuple[list[float], list[float]]:
    """The first (up to 3) and last (up to 5) values, never overlapping when there are two or more: a short
    series (an accuracy table of a few budgets) compares its first entries with its last ones."""
    half = max(1, len(values) // 2)
    return values[: min(3, half)], values[-min(5, half) :]


def judge(plan: Plan, rows: list[dict], result: Result) -> None:
    """Fill the objective fields of `result` from the run's metrics rows."""
    key, direction = pick_objective(plan, rows)
    values = [row[key] for row in rows if key in row]
    head, tail = ends(values)
    result.objective, result.direction = key, direction
    result.start, result.end = sum(head) / len(head), sum(tail) / len(tail)
    result.finite = all(isinstance(v, (int, float)) and math.isfinite(v) for row in rows for v in row.values() if isinstance(v, (int, float)))
    if direction == "down":
        moved = result.end <= result.start - plan.margin * max(1.0, abs(result.start))
    elif direction == "up":
        moved = result.end >= result.start + plan.margin
    else:
        moved = True
    result.passed = moved and result.finite
    if not moved:
        result.notes.append(f"{key} did not move {direction} by the required margin ({plan.margin})")


def throughput(rows: list[dict], result: Result) -> None:
    timed = rows[2:] if len(rows) > 4 else rows  # the first steps include CUDA warm-up and compilation
    seconds = sum(row.get("step_seconds", 0.0) for row in timed)
    result.steps = len(rows)
    if seconds > 0:
        result.steps_per_second = len(timed) / seconds
        if all("num_tokens" in row for row in timed):
            result.tokens_per_second = sum(row["num_tokens"] for row in timed) / seconds
    peaks = [row["peak_memory_gib"] for row in rows if "peak_memory_gib" in row]
    result.peak_memory_gib = max(peaks) if peaks else None


def predicted_memory(kb, method: str, shape: str, peft: str | None) -> float | None:
    """The memory ptcompile's estimator predicts for this run, once the estimator exists (None before)."""
    try:
        from ptcompile import estimate  # type: ignore[attr-defined]
    except ImportError:
        return None
    for name in ("estimate_memory_gib", "estimate_memory", "estimate"):
        function = getattr(estimate, name, None)
        if callable(function):
            try:
                value = function(kb, method, model=shape, peft=peft, batch_size=8)
            except TypeError:
                return None
            value = getattr(value, "total_gib", value)
            return float(value) if isinstance(value, (int, float)) else None
    return None


def common_flags(gpu: bool) -> list[str]:
    """RUN_FLAGS; on CPU everything in float32 (a teacher's default dtype is bf16)."""
    flags = list(RUN_FLAGS)
    if not gpu:
        flags[flags.index("--mixed_precision") + 1] = "no"
        flags += ["--teacher_dtype", "float32"]
    return flags


def run_args(plan: Plan, peft: str | None, gpu: bool) -> list[str]:
    rate = plan.qlora_learning_rate if peft else plan.learning_rate
    return common_flags(gpu) + ["--max_steps", str(plan.steps), "--learning_rate", str(rate)] + list(plan.extra)


@functools.lru_cache(maxsize=None)
def script_options(script: Path) -> frozenset[str]:
    """The command-line options of an emitted script (the fields of its Args dataclass)."""
    from conftest import load_script_module

    module = load_script_module(script, f"gpu_options_{script.stem}_{abs(hash(str(script)))}")
    return frozenset(f"--{f.name}" for f in dataclasses.fields(module.Args))


def accepted(script: Path, flags: list[str]) -> list[str]:
    """`flags` (pairs of --name value) without the options `script` does not have: a family's plan carries
    what any of its methods needs (teacher, generation lengths, group sizes) and each script takes its own."""
    options = script_options(script)
    return [part for name, value in zip(flags[::2], flags[1::2]) if name in options for part in (name, value)]


# --- Helper models ----------------------------------------------------------------------------------------


def write_polite_and_judge(model_dir: Path, path: Path) -> None:
    """Chat rows of the polite task and of judging it (tests/online_helpers.py): replies to "Describe the
    <animal>." with a polite or rude adjective, and 'Score: 5' / 'Score: 1' verdicts on such replies."""
    from online_helpers import polite_policy_examples, self_judge_examples

    rows = [{"messages": prompt + [{"role": "assistant", "content": reply}]} for prompt, reply in polite_policy_examples() + self_judge_examples()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_hardened_preferences(model_dir: Path, path: Path) -> None:
    """The bundled preference rows plus polite-over-degenerate ones (online_helpers.hardened_preference_rows)."""
    from online_helpers import hardened_preference_rows

    path.write_text("".join(json.dumps(row) + "\n" for row in hardened_preference_rows(model_dir)), encoding="utf-8")


def write_noisy_successor(model_dir: Path, path: Path, noise: float = 0.5, seed: int = 0) -> None:
    """The bundled successor task ("What is a plus 1?") as chat rows with a fraction `noise` of the answers
    replaced by a random digit (as tests/pg_helpers.py's warm start): a policy fitted to it answers right
    about half of the time at temperature 1, and only a reward can tell it which half."""
    rng = random.Random(seed)
    rows = []
    for line in (model_dir / "data" / "successor.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answer = row["answer"] if rng.random() >= noise else str(rng.randint(0, 9))
        rows.append({"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_step_preferences(model_dir: Path, path: Path) -> None:
    """The bundled preference pairs in Step-DPO form: "The cat is " as the previous (correct) steps, the
    compared steps the two adjectives."""
    rows = []
    for line in (model_dir / "data" / "preference.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        head, chosen = row["chosen"].rsplit(" ", 1)
        rejected = row["rejected"].rsplit(" ", 1)[1]
        rows.append({"prompt": row["prompt"], "initial_reason_steps": head + " ", "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


WRITTEN_DATA = {
    "polite_and_judge.jsonl": write_polite_and_judge,
    "hardened_preference.jsonl": write_hardened_preferences,
    "noisy_successor.jsonl": write_noisy_successor,
    "step_preference.jsonl": write_step_preferences,
}
"""Data that is not bundled with the tiny model, written under DIR/helpers/data/ from the bundled tiny tasks."""


def data_path(model_dir: Path, name: str) -> Path:
    """A bundled data file (DIR/data/NAME) or one of WRITTEN_DATA, written on first use."""
    if name not in WRITTEN_DATA:
        return model_dir / "data" / name
    path = model_dir / "helpers" / "data" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        WRITTEN_DATA[name](model_dir, path)
    return path


def build_helper(kb, name: str, model_dir: Path, shape: str, gpu: bool):
    """DIR/helpers/NAME/final, trained by the helper's generated script unless it is there already; returns
    (path, the completed process or None when it was already built)."""
    from conftest import generated_script, run_script, tiny_args

    helper = HELPERS[name]
    output = model_dir / "helpers" / name
    if (output / "final").is_dir():
        return output / "final", None
    steps, rate = (helper.tiny_steps, helper.tiny_learning_rate) if shape == "tiny" else (helper.steps, helper.learning_rate)
    flags = common_flags(gpu) + ["--max_steps", str(steps), "--learning_rate", str(rate), "--per_device_train_batch_size", str(helper.batch_size)]
    # A helper whose earlier build failed left its output directory behind: train it again from scratch.
    flags += ["--dataset", str(data_path(model_dir, helper.data)), "--output_dir", str(output), "--overwrite_output_dir", "true"]
    script = generated_script(helper.method)
    process = run_script(script, tiny_args(kb, helper.method, model_dir) + accepted(script, flags), cwd=model_dir, check=False, timeout=1800)
    return output / "final", process


def input_args(kb, plan: Plan, script: Path, model_dir: Path, shape: str, gpu: bool):
    """The flags of the plan's inputs that `script` takes, each helper built first (a family's row names the
    inputs of all its methods); (flags, the failed helper process or None)."""
    flags = []
    for flag, name in plan.inputs:
        if flag not in script_options(script):
            continue
        if name == BASE:
            flags += [flag, str(model_dir / "model")]
            continue
        path, process = build_helper(kb, name, model_dir, shape, gpu)
        if process is not None and process.returncode != 0:
            return flags, process
        flags += [flag, str(path)]
    return flags, None


def read_rows(output_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows; for test-time scaling, which trains nothing, its accuracy.json table
    (one row per budget, smallest first)."""
    from conftest import read_metrics

    if (output_dir / "metrics.jsonl").is_file():
        return read_metrics(output_dir)
    if (output_dir / "accuracy.json").is_file():
        table = json.loads((output_dir / "accuracy.json").read_text(encoding="utf-8"))["table"]
        return sorted(table, key=lambda row: row["budget"])
    return []


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"schema": 1, "runs": []}


def merge_results(path: Path, new: list[Result]) -> dict:
    """Replace the records of the same (method, PEFT) with the new ones; keep the others."""
    data = load_results(path)
    fresh = {(r.method, r.peft) for r in new}
    data["runs"] = [r for r in data["runs"] if (r["method"], r["peft"]) not in fresh] + [asdict(r) for r in new]
    data["runs"].sort(key=lambda r: (r["method"], r["peft"] or ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return data


def new_result(kb, method: str, peft: str | None, script: Path, shape: str) -> Result:
    return Result(
        method=method,
        peft=peft,
        family=kb.methods[method].record.script.family,
        script=script.name,
        shape=shape,
        device=device_name(),
        date=datetime.date.today().isoformat(),
    )


def run_case(kb, method: str, peft: str | None, model_dir: Path, workdir: Path, shape: str, gpu: bool = True, steps: int | None = None, extra: Sequence[str] = ()):
    """Train one method's script (generated/, or compiled with --peft for `shape`) on `model_dir` and return
    (Result, completed process); the process is a helper's when building that helper failed. `extra` flags
    come last (the CPU test shortens runs with them). Nothing is asserted here; the caller decides."""
    from conftest import TINY_DATA, compile_script, generated_script, run_script, tiny_args

    record = kb.methods[method].record
    plan = plan_for(kb, method)
    if steps is not None:
        plan = dataclasses.replace(plan, steps=steps)
    if peft is None:
        script = generated_script(method)
    else:
        script = workdir / f"train_{method.replace('-', '_')}_{peft}.py"
        script.write_text(compile_script(kb, method, shape, peft))
    result = new_result(kb, method, peft, script, shape)
    result.predicted_memory_gib = predicted_memory(kb, method, shape, peft)
    output_dir = workdir / "run"
    inputs, failed = input_args(kb, plan, script, model_dir, shape, gpu)
    if failed is not None:
        result.notes.append(f"a helper model failed to train: {(failed.stderr or failed.stdout).strip().splitlines()[-1:]}")
        return result, failed
    args = tiny_args(kb, method, model_dir)
    if plan.data:
        args += ["--dataset", str(data_path(model_dir, plan.data))]
    elif TINY_DATA.get(record.data_format) is None:
        result.notes.append(f"no bundled data for format {record.data_format}")
    # Later flags win: the plan's over tiny_args (a helper as the policy), the caller's over the plan's.
    args += accepted(script, run_args(plan, peft, gpu) + inputs + list(extra)) + ["--output_dir", str(output_dir)]
    if peft is not None:
        args += ["--model_dtype", "bfloat16" if gpu else "float32"]
    process = run_script(script, args, cwd=workdir, check=False, timeout=1800)
    rows = read_rows(output_dir)
    if process.returncode != 0:
        result.notes.append(f"exit code {process.returncode}: {(process.stderr or process.stdout).strip().splitlines()[-1:]}")
    if rows:
        throughput(rows, result)
        judge(plan, rows, result)
    result.passed = result.passed and process.returncode == 0
    if result.predicted_memory_gib is not None and result.peak_memory_gib is not None and result.peak_memory_gib > 1.1 * result.predicted_memory_gib:
        result.passed = False
        result.notes.append(f"peak memory {result.peak_memory_gib:.2f} GiB exceeds the estimate {result.predicted_memory_gib:.2f} GiB by more than 10%")
    return result, process
