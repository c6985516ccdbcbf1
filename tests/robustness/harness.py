"""Helpers for the fault-tolerance tests: start an emitted script as a real subprocess, watch its progress,
kill it, and read what it left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

RESUMABLE: dict[str, tuple[str, ...]] = {
    "sft": (),
    "dpo": (),
    "grpo": ("--max_completion_length", "8", "--num_generations", "4", "--per_device_train_batch_size", "4"),  # short rollouts keep the 16 steps quick
}
"""Methods whose scripts must survive SIGKILL + `--resume_from_checkpoint latest` bitwise on CPU, with the
extra flags their tiny run needs. The comparison is exact (==) for every logged value and final weight."""

RESUMABLE_METHODS = list(RESUMABLE)

VOLATILE = {"step_seconds", "peak_memory_gib"}
"""Logged values that measure the machine, not the run; everything else must match exactly."""


def script_env(**extra: str) -> dict[str, str]:
    """The environment conftest.run_script uses (offline, one thread, no GPU pinning), plus `extra`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def start(script: Path, args: list[str], cwd: Path, wrapper: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python script.py ARGS` (or `python wrapper.py script.py ARGS`) in the background; output to files in cwd."""
    command = [sys.executable, *([str(wrapper)] if wrapper else []), str(script), *args]
    log = cwd / f"{script.stem}.{time.monotonic_ns()}.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env or script_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    process.log_path = log
    return process


def output_of(process: subprocess.Popen) -> str:
    return process.log_path.read_text(errors="replace")


def logged_steps(output_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (a line being written right now is ignored)."""
    path = output_dir / "metrics.jsonl"
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return steps


def wait_until(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the script ended (code {process.returncode}) before {what}:\n{output_of(process)[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{output_of(process)[-4000:]}")
        time.sleep(0.002)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.returncode


def trajectory(output_dir: Path) -> list[dict]:
    """metrics.jsonl rows without the wall-clock fields."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


def final_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((output_dir / "final").glob("*.safetensors"))
    assert files, f"no safetensors in {output_dir / 'final'}"
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors
