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
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), *args]  # on a CPU machine --multi_gpu starts N gloo processes (--cpu would start one)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


TINY_DATA = {
    "chat": "chat.jsonl",
    "instruction": "instruction.jsonl",
    "text": "text.jsonl",
    "preference": "preference.jsonl",
    "unpaired": "unpaired.jsonl",
    "prompt": "math.jsonl",
    "step-labels": "arithmetic_steps.jsonl",  # the PRM data the tiny model learns from (compiler/tiny_data.py)
}

FIELDS = {
    "chat": ["messages"],
    "instruction": ["instruction", "input", "output"],
    "text": ["text"],
    "preference": ["prompt", "chosen", "rejected"],
    "unpaired": ["prompt", "completion", "label"],
    "prompt": ["prompt", "answer"],
    "step-labels": ["prompt", "steps", "labels"],
}

FAST = [
    "--logging_steps", "1", "--save_steps", "0", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
    "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--mixed_precision", "no",
]


def generated_script(method_id: str) -> Path:
    """The checked-in script of a method (generated/, compiled for its default model)."""
    path = ROOT / "generated" / f"train_{method_id.replace('-', '_').replace('.', '_')}.py"
    assert path.is_file(), f"{path} is missing: run `ptcompile build`"
    return path


def tiny_args(kb, method_id: str, tiny: Path, data_format: str | None = None) -> list[str]:
    """Flags that point a script compiled for a real model at the embedded tiny model and bundled data."""
    fmt = data_format or kb.methods[method_id].record.data_format
    args = ["--model_name_or_path", str(tiny / "model"), "--model_dtype", "float32", "--dataset", str(tiny / "data" / TINY_DATA[fmt])]
    for field in FIELDS[fmt]:
        args += [f"--{field}_column", field]
    if fmt == "prompt":
        args += ["--answer_format", "plain"]
    return args


def train_tiny(kb, method_id: str, tiny: Path, workdir: Path, extra: list[str], script: Path | None = None, processes: int = 1, name: str = "run") -> list[dict]:
    """Run a method's generated script on the tiny model and return its logged metrics (one row per step)."""
    output = workdir / name
    run_script(script or generated_script(method_id), tiny_args(kb, method_id, tiny) + FAST + ["--output_dir", str(output)] + extra, cwd=workdir, processes=processes)
    return read_metrics(output)


def load_script_module(path: Path, name: str | None = None):
    """Import an emitted script as a module (its main() is not run) to test its functions directly."""
    import importlib.util

    name = name or f"emitted_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource (used for --help texts) looks the module up here
    spec.loader.exec_module(module)
    return module


# --- Trained tiny scorers, for tests of the scripts that load them (best-of-N, PPO, online DPO, search) ---------

TINY_SCORER_FLAGS = {
    "reward-model": ["--max_steps", "30", "--learning_rate", "3e-3"],
    # Checking sums takes the tiny model longer: 500 steps of 16 rows (about 10 s of CPU).
    "process-reward-model": ["--max_steps", "500", "--learning_rate", "2e-3", "--per_device_train_batch_size", "16", "--num_train_epochs", "100"],
}


def train_tiny_scorer(kb, method_id: str, tiny: Path, workdir: Path) -> Path:
    """Train a method's generated scorer script on the tiny data; returns its final/ directory (model,
    tokenizer and ptcompile_scorer.json, see templates/reward/script.py.j2 for the contract). The run's
    metrics.jsonl is in the directory above it."""
    train_tiny(kb, method_id, tiny, workdir, TINY_SCORER_FLAGS[method_id], name=method_id)
    return workdir / method_id / "final"


@pytest.fixture(scope="session")
def tiny_reward_model(kb, tiny, tmp_path_factory) -> Path:
    """final/ of a Bradley-Terry reward model trained on the tiny preference data (accuracy ~1: chosen
    answers use polite adjectives, rejected ones rude adjectives). Load it as its ptcompile_scorer.json says."""
    return train_tiny_scorer(kb, "reward-model", tiny, tmp_path_factory.mktemp("tiny-reward-model"))


@pytest.fixture(scope="session")
def tiny_prm(kb, tiny, tmp_path_factory) -> Path:
    """final/ of a process reward model trained on the tiny arithmetic steps (a step is correct exactly when
    its sum is right; step accuracy ~0.94 at the end of training). Load it as its ptcompile_scorer.json says."""
    return train_tiny_scorer(kb, "process-reward-model", tiny, tmp_path_factory.mktemp("tiny-prm"))


@pytest.fixture(scope="session")
def tiny_sum_solver(kb, tiny, tmp_path_factory) -> Path:
    """The tiny model after 60 SFT steps on worked solutions of three-term sums (bundled sum_solutions.jsonl),
    trained by the generated SFT script: it solves the bundled sums.jsonl prompts about half of the time at
    temperature 1, which test-time scaling and rejection sampling need (something to select, something to gain)."""
    workdir = tmp_path_factory.mktemp("sum-solver")
    args = tiny_args(kb, "sft", tiny) + FAST + ["--dataset", str(tiny / "data" / "sum_solutions.jsonl"), "--output_dir", str(workdir / "run")]
    args += ["--max_steps", "60", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16"]
    run_script(generated_script("sft"), args, cwd=workdir)
    return workdir / "run" / "final"


@pytest.fixture(scope="session")
def tiny_sum_prm(kb, tiny, tiny_sum_solver, tmp_path_factory) -> Path:
    """final/ of a process reward model trained by the generated PRM script on the bundled sum_steps.jsonl
    (Math-Shepherd-style labels for the errors tiny_sum_solver makes), starting from tiny_sum_solver itself
    (PRMs are usually initialised from the policy; the random-init tiny model learns the checks far slower).
    Step accuracy on its training data reaches ~0.97 in 500 steps of 32."""
    workdir = tmp_path_factory.mktemp("sum-prm")
    flags = ["--model_name_or_path", str(tiny_sum_solver), "--dataset", str(tiny / "data" / "sum_steps.jsonl"), "--max_steps", "500", "--learning_rate", "3e-3"]
    flags += ["--per_device_train_batch_size", "32", "--num_train_epochs", "100", "--warmup_ratio", "0.05", "--lr_scheduler_type", "cosine", "--logging_steps", "100"]
    train_tiny(kb, "process-reward-model", tiny, workdir, flags, name="prm")
    return workdir / "prm" / "final"
