"""Shared fixtures: the knowledge base, the embedded tiny model and data, compiling and running scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def kb():
    from ptcompile.knowledge_base import KnowledgeBase

    return KnowledgeBase.load()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, kb) -> Path:
    """DIR with DIR/model (the embedded tiny model) and DIR/data/*.jsonl, written once per test process."""
    from ptcompile.tiny import materialise

    directory = tmp_path_factory.mktemp("tiny")
    materialise(kb.model("tiny"), directory)
    return directory


def compile_script(kb, method: str, model: str = "tiny", peft: str | None = None, overrides: list[str] | None = None, dataset: str | None = None) -> str:
    from ptcompile.recipe import resolve
    from ptcompile.render import render_script

    return render_script(resolve(kb, method, model, peft, overrides or [], dataset))


def run_script(script: Path, args: list[str], cwd: Path, timeout: int = 600, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run an emitted script as a user would: `python script.py ...` or `accelerate launch` on CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if processes == 1:
        command = [sys.executable, str(script), *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(script), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
