"""GKD (method `gkd`): the generated script pulls a student's next-token distributions towards a frozen
teacher's on a mix of its own samples and the dataset's responses, and one big batch, gradient accumulation and
two data-parallel processes give the same run.

Setup (tests/online_helpers.py): the teacher is the tiny model fitted on the bundled chat data (repeat and
reverse the words); the student is the random-init tiny model, which shares the teacher's tokenizer.
"""

from __future__ import annotations

import math

import pytest

from conftest import mean, train_tiny
from online_helpers import cached, chat_examples, fit, response_nll


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    return fit(tiny, cached(tmp_path_factory, "chat-teacher"), chat_examples(tiny), steps=150)


def test_gkd_divergence_to_the_teacher_falls(kb, tiny, tmp_path, teacher):
    """40 steps from the random-init student. The generalised JSD (β = 0.5) is at most log 2 = 0.69 per token and
    starts near it (a uniform student against a confident teacher); it must fall on both kinds of steps."""
    extra = ["--teacher_model", str(teacher), "--lmbda", "0.5", "--max_new_tokens", "16", "--learning_rate", "3e-3", "--max_steps", "40"]
    metrics = train_tiny(kb, "gkd", tiny, tmp_path, extra)
    assert len(metrics) == 40
    on_policy = [m["on_policy"] for m in metrics]
    assert 8 <= sum(on_policy) <= 32  # lmbda = 0.5: both kinds of steps occur
    for kind in (0.0, 1.0):  # on the dataset's responses and on the student's own samples alike
        losses = [m["loss"] for m in metrics if m["on_policy"] == kind]
        assert mean(losses[-3:]) < mean(losses[:3]) - 0.08, (kind, losses)
    # The student moved towards the teacher's data too: its loss on the real responses fell.
    assert response_nll(tmp_path / "run" / "final", chat_examples(tiny)) < 0.8 * response_nll(tiny / "model", chat_examples(tiny))


def test_gkd_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path, teacher):
    """Global batch 8 with on-policy and dataset steps: 1 process x 8; 1 x 4 x accumulation 2; 2 processes x 4."""
    common = ["--teacher_model", str(teacher), "--lmbda", "0.5", "--max_new_tokens", "12", "--learning_rate", "3e-3", "--max_steps", "4"]
    big = train_tiny(kb, "gkd", tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, "gkd", tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, "gkd", tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    assert {m["on_policy"] for m in big} == {0.0, 1.0}
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 4
        for a, b in zip(big, run):
            assert a["on_policy"] == b["on_policy"]
            for key in ("loss", "completion_length"):
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, big, run)


def test_gkd_resume_continues_exactly(kb, tiny, tmp_path, teacher):
    """Stopped after its step-3 checkpoint and resumed, a run makes the same on-policy choices and losses."""
    import shutil

    from conftest import FAST, generated_script, read_metrics, run_script, tiny_args

    flags = tiny_args(kb, "gkd", tiny) + FAST + ["--teacher_model", str(teacher), "--lmbda", "0.5", "--max_new_tokens", "12", "--learning_rate", "3e-3", "--max_steps", "6"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_script(generated_script("gkd"), flags + ["--output_dir", str(whole)], cwd=tmp_path)
    run_script(generated_script("gkd"), flags + ["--output_dir", str(resumed), "--save_steps", "3"], cwd=tmp_path)
    shutil.rmtree(resumed / "final")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (resumed / "metrics.jsonl").read_text().splitlines()[:3]))
    run_script(generated_script("gkd"), flags + ["--output_dir", str(resumed), "--save_steps", "3", "--resume_from_checkpoint", "latest"], cwd=tmp_path)
    for key in ("loss", "on_policy"):
        assert [m[key] for m in read_metrics(resumed)] == pytest.approx([m[key] for m in read_metrics(whole)], rel=1e-6, abs=1e-7), key
