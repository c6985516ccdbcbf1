"""Interruption: a training script killed with SIGKILL and started again with --resume_from_checkpoint latest
continues from its last complete checkpoint and reproduces the uninterrupted run bitwise on CPU (every logged
value but the wall-clock ones, and the final weights). A kill in the middle of a checkpoint save leaves the
previous checkpoint as `latest`. The methods come from harness.RESUMABLE (SFT, DPO and GRPO; another method is one line there)."""

from __future__ import annotations

import random
import re

import pytest
import torch

from conftest import FAST, generated_script, run_script, tiny_args
from harness import HERE, RESUMABLE, RESUMABLE_METHODS, final_weights, logged_steps, script_env, sigkill, start, trajectory, wait_until

STEPS, SAVE_EVERY = 16, 4
RUN = ["--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--save_total_limit", "2", "--learning_rate", "1e-3"]


def flags(kb, method, tiny, output_dir) -> list[str]:
    return tiny_args(kb, method, tiny) + FAST + RUN + list(RESUMABLE[method]) + ["--output_dir", str(output_dir)]


@pytest.fixture(scope="module")
def uninterrupted(kb, tiny, tmp_path_factory):
    """One uninterrupted run per method, shared by the tests below."""
    runs = {}

    def get(method):
        if method not in runs:
            workdir = tmp_path_factory.mktemp(f"uninterrupted-{method}")
            run_script(generated_script(method), flags(kb, method, tiny, workdir / "run"), cwd=workdir)
            runs[method] = workdir / "run"
        return runs[method]

    return get


def assert_same_run(reference, resumed) -> None:
    expected, got = trajectory(reference), trajectory(resumed)
    assert [row["step"] for row in got] == list(range(1, STEPS + 1)), got
    for a, b in zip(expected, got):
        assert a == b, f"step {a['step']}: {a} != {b}"  # bitwise: floats compared with ==
    a, b = final_weights(reference), final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"final weight {name} differs"


def resume(kb, method, tiny, workdir, output_dir) -> str:
    result = run_script(generated_script(method), flags(kb, method, tiny, output_dir) + ["--resume_from_checkpoint", "latest"], cwd=workdir)
    return result.stdout + result.stderr


@pytest.mark.parametrize("method", RESUMABLE_METHODS)
def test_sigkill_at_a_random_step_then_resume_reproduces_the_run(kb, tiny, tmp_path, method, uninterrupted):
    kill_at = random.Random(f"sigkill-{method}").randint(SAVE_EVERY + 1, STEPS - SAVE_EVERY)  # seeded choice
    output_dir = tmp_path / "run"
    process = start(generated_script(method), flags(kb, method, tiny, output_dir), cwd=tmp_path)
    wait_until(lambda: any(step >= kill_at for step in logged_steps(output_dir)), process, 300, f"step {kill_at}")
    sigkill(process)
    killed_after = max(logged_steps(output_dir))
    assert not (output_dir / "final").exists(), "the run finished before it could be killed"
    assert killed_after < STEPS

    log = resume(kb, method, tiny, tmp_path, output_dir)
    resumed_from = int(re.search(r"resumed from \S+checkpoint-(\d+) at step (\d+)", log).group(2))
    assert resumed_from % SAVE_EVERY == 0 and SAVE_EVERY <= resumed_from <= killed_after, (resumed_from, killed_after)
    assert_same_run(uninterrupted(method), output_dir)


@pytest.mark.parametrize("method", RESUMABLE_METHODS)
def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint(kb, tiny, tmp_path, method, uninterrupted):
    """The save of checkpoint 8 hangs after writing half of its state (tests/robustness/stall_save.py); the
    process is killed there. checkpoint-4 must stay `latest`, load, and resume to the same run."""
    stalled, previous = 2 * SAVE_EVERY, SAVE_EVERY
    output_dir, marker = tmp_path / "run", tmp_path / "stalled"
    env = script_env(PTCOMPILE_TEST_STALL_STEP=str(stalled), PTCOMPILE_TEST_STALL_MARKER=str(marker))
    process = start(generated_script(method), flags(kb, method, tiny, output_dir), cwd=tmp_path, wrapper=HERE / "stall_save.py", env=env)
    wait_until(marker.exists, process, 300, f"the save of checkpoint {stalled}")
    sigkill(process)

    partial = output_dir / f".checkpoint-{stalled}.tmp"
    assert (partial / "state.pt").is_file() and not (partial / "complete.json").exists()
    assert not (output_dir / f"checkpoint-{stalled}").exists()
    assert (output_dir / f"checkpoint-{previous}" / "complete.json").is_file()

    log = resume(kb, method, tiny, tmp_path, output_dir)
    assert f"checkpoint-{previous} at step {previous}" in log, log[-3000:]
    assert not partial.exists(), "the stale temporary directory should be replaced by the re-done save"
    assert_same_run(uninterrupted(method), output_dir)


def test_latest_ignores_temporary_and_incomplete_checkpoints(tmp_path):
    """The selection rule itself, on a hand-made directory (the script's own find_checkpoint)."""
    from conftest import load_script_module

    script = load_script_module(generated_script("sft"), "emitted_sft_latest")
    run = tmp_path / "run"
    for name, complete in [("checkpoint-4", True), ("checkpoint-12", True), ("checkpoint-16", False), (".checkpoint-20.tmp", True), ("checkpoint-old", True)]:
        (run / name).mkdir(parents=True)
        (run / name / "state.pt").write_bytes(b"x")
        if complete:
            (run / name / "complete.json").write_text("{}")
    (run / "checkpoint-99").write_text("a file, not a checkpoint")
    args = script.parse_args(["--output_dir", str(run), "--resume_from_checkpoint", "latest"])
    assert script.find_checkpoint(args) == run / "checkpoint-12"
    assert script.list_checkpoints(run) == [run / "checkpoint-4", run / "checkpoint-12"]
    empty = script.parse_args(["--output_dir", str(tmp_path / "none"), "--resume_from_checkpoint", "latest"])
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        script.find_checkpoint(empty)


def test_resume_trims_metrics_written_after_the_checkpoint(tmp_path):
    """Rows after the checkpoint's step, and a line cut short by the kill, are dropped on resume."""
    from conftest import load_script_module

    script = load_script_module(generated_script("sft"), "emitted_sft_trim")
    run = tmp_path / "run"
    run.mkdir()
    rows = [f'{{"loss": {i}.5, "step": {i}}}' for i in range(1, 7)]
    (run / "metrics.jsonl").write_text("\n".join(rows) + '\n{"loss": 7.5, "st')
    script.prepare_output_dir(script.parse_args(["--output_dir", str(run), "--resume_from_checkpoint", "latest"]), 4)
    assert (run / "metrics.jsonl").read_text() == "\n".join(rows[:4]) + "\n"
