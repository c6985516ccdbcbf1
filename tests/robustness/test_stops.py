"""A NaN or inf stops training before the update with a message naming the last good checkpoint, which loads;
an existing output directory is never written into unless asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import FAST, generated_script, read_metrics, run_script, tiny_args
from harness import RESUMABLE, RESUMABLE_METHODS

# The learning rate warms up linearly over 4 steps to a value that blows the weights up. Step 1 has rate 0
# (a no-op), so there is always a genuinely good checkpoint before the blow-up.
DIVERGE = ["--max_steps", "8", "--save_steps", "1", "--save_total_limit", "3", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.5"]


def stopped(kb, method, tiny, tmp_path, learning_rate, name="run", extra=()) -> tuple[str, Path]:
    output_dir = tmp_path / name
    args = tiny_args(kb, method, tiny) + FAST + DIVERGE + ["--learning_rate", learning_rate, "--output_dir", str(output_dir), *extra]
    result = run_script(generated_script(method), args, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return output, output_dir


@pytest.mark.parametrize("method", RESUMABLE_METHODS)
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(kb, tiny, tmp_path, method):
    output, output_dir = stopped(kb, method, tiny, tmp_path, "1e12", extra=RESUMABLE[method])
    found = re.search(r"error: the (loss|gradient norm) became (nan|inf|-inf) at step (\d+); stopped before the update\. Last good checkpoint: (\S+)\.", output)
    assert found, output[-3000:]
    bad_step, checkpoint = int(found.group(3)), Path(found.group(4))
    if not checkpoint.is_absolute():
        checkpoint = tmp_path / checkpoint
    assert bad_step >= 2 and checkpoint == output_dir / f"checkpoint-{bad_step - 1}"
    assert not (output_dir / f"checkpoint-{bad_step}").exists() and not (output_dir / "final").exists()
    assert [row["step"] for row in read_metrics(output_dir)] == list(range(1, bad_step)), "the bad step must not be logged"

    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == bad_step - 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    # It loads: resuming from it replays the same (deterministic) blow-up at the same step.
    again, _ = stopped(kb, method, tiny, tmp_path, "1e12", extra=[*RESUMABLE[method], "--resume_from_checkpoint", str(checkpoint)])
    assert f"resumed from {checkpoint} at step {bad_step - 1}" in again, again[-3000:]
    assert f"at step {bad_step}; stopped before the update" in again, again[-3000:]


def test_a_non_finite_gradient_with_a_finite_loss_also_stops(kb, tiny, tmp_path):
    output, output_dir = stopped(kb, "sft", tiny, tmp_path, "1e8")
    assert re.search(r"error: the gradient norm became (nan|inf) at step \d+; stopped before the update\. Last good checkpoint: \S+checkpoint-\d+\.", output), output[-3000:]


def test_an_existing_output_directory_is_never_overwritten_unless_asked(kb, tiny, tmp_path):
    output_dir = tmp_path / "run"
    base = tiny_args(kb, "sft", tiny) + FAST + ["--save_steps", "1", "--output_dir", str(output_dir)]
    run_script(generated_script("sft"), base + ["--max_steps", "4"], cwd=tmp_path)
    before = {p.relative_to(output_dir): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}

    refused = run_script(generated_script("sft"), base + ["--max_steps", "2"], cwd=tmp_path, check=False)
    assert refused.returncode == 1 and f"error: output directory {output_dir} exists and is not empty" in refused.stderr, refused.stderr[-2000:]
    assert {p.relative_to(output_dir): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before

    run_script(generated_script("sft"), base + ["--max_steps", "2", "--overwrite_output_dir", "true"], cwd=tmp_path)
    assert [row["step"] for row in read_metrics(output_dir)] == [1, 2], "the old run's metrics must not be mixed in"
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1"], "the old run's checkpoints must go"

    (tmp_path / "a-file").write_text("x")
    clash = run_script(generated_script("sft"), tiny_args(kb, "sft", tiny) + FAST + ["--max_steps", "1", "--output_dir", str(tmp_path / "a-file")], cwd=tmp_path, check=False)
    assert clash.returncode == 1 and "exists and is a file" in clash.stderr and "Traceback" not in clash.stderr


def test_parameters_that_went_non_finite_are_never_checkpointed(kb, tiny, tmp_path):
    """Adam with epsilon 0 divides 0 by 0 for embedding rows no token of the batch used: the parameters turn
    NaN while loss and gradient stay finite. The save refuses to write them."""
    output_dir = tmp_path / "run"
    args = tiny_args(kb, "sft", tiny) + FAST + ["--max_steps", "3", "--save_steps", "1", "--adam_epsilon", "0", "--output_dir", str(output_dir)]
    result = run_script(generated_script("sft"), args, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "error: parameter model.embed_tokens.weight holds NaN/inf values at step 1; this checkpoint is not saved. Last good checkpoint: none yet." in output, output[-3000:]
    assert not list(output_dir.glob("checkpoint-*")) and not list(output_dir.glob(".checkpoint-*"))
