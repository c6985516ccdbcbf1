"""Run one generated script on a GPU (or, for the CPU plumbing test, on the CPU) and measure it.

A result records: method, PEFT, family, script, model shape, device name, date, steps, steps/s, tokens/s,
peak GPU memory, the memory the estimator predicts (when ptcompile has one), the objective at start and end,
and whether it moved the right way with every logged number finite.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpu_plans import PLANS, RUN_FLAGS, Plan

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
    raise AssertionError(f"none of {[k for k, _ in plan.objectives]} is logged (keys: {sorted(logged)}): fix this family's row in tests/gpu/gpu_plans.py")


def judge(plan: Plan, rows: list[dict], result: Result) -> None:
    """Fill the objective fields of `result` from the run's metrics rows."""
    key, direction = pick_objective(plan, rows)
    values = [row[key] for row in rows if key in row]
    head, tail = values[: min(3, len(values))], values[-min(5, len(values)) :]
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


def run_args(plan: Plan, peft: str | None, gpu: bool) -> list[str]:
    flags = list(RUN_FLAGS) + ["--max_steps", str(plan.steps), "--learning_rate", str(plan.qlora_learning_rate if peft else plan.learning_rate)]
    if not gpu:
        flags[flags.index("--mixed_precision") + 1] = "no"
    return flags + list(plan.extra)


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


def run_case(kb, method: str, peft: str | None, model_dir: Path, workdir: Path, shape: str, gpu: bool = True, steps: int | None = None):
    """Train one method's script (generated/, or compiled with --peft for `shape`) on `model_dir` and return
    (Result, completed process). Nothing is asserted here; the caller decides."""
    from conftest import TINY_DATA, compile_script, generated_script, read_metrics, run_script, tiny_args

    record = kb.methods[method].record
    plan = PLANS[record.script.family]
    if steps is not None:
        from dataclasses import replace

        plan = replace(plan, steps=steps)
    if peft is None:
        script = generated_script(method)
    else:
        script = workdir / f"train_{method.replace('-', '_')}_{peft}.py"
        script.write_text(compile_script(kb, method, shape, peft))
    result = new_result(kb, method, peft, script, shape)
    result.predicted_memory_gib = predicted_memory(kb, method, shape, peft)
    output_dir = workdir / "run"
    args = tiny_args(kb, method, model_dir) + run_args(plan, peft, gpu) + ["--output_dir", str(output_dir)]
    if plan.data:
        args += ["--dataset", str(model_dir / "data" / plan.data)]
    elif TINY_DATA.get(record.data_format) is None:
        result.notes.append(f"no bundled data for format {record.data_format}")
    if peft is not None:
        args += ["--model_dtype", "bfloat16" if gpu else "float32"]
    process = run_script(script, args, cwd=workdir, check=False, timeout=1800)
    rows = read_metrics(output_dir) if (output_dir / "metrics.jsonl").is_file() else []
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
