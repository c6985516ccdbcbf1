"""DPO (method `dpo`): the generated script raises reward accuracy and margin on the tiny preference data,
and one big batch, gradient accumulation and two data-parallel processes give the same run."""

from __future__ import annotations

import math

import pytest

from conftest import mean, train_tiny


def test_dpo_reward_margin_and_accuracy_rise(kb, tiny, tmp_path):
    metrics = train_tiny(kb, "dpo", tiny, tmp_path, ["--max_steps", "25", "--learning_rate", "1e-3"])
    margins = [m["rewards/margin"] for m in metrics]
    accuracy = [m["rewards/accuracy"] for m in metrics]
    losses = [m["loss"] for m in metrics]
    assert abs(losses[0] - math.log(2)) < 1e-4  # policy == reference at step 1: every margin is 0
    assert mean(margins[-5:]) > mean(margins[:3]) + 0.5, margins
    assert mean(accuracy[-5:]) >= 0.9, accuracy
    assert mean(losses[-5:]) < math.log(2) - 0.2, losses


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path, method):
    """Global batch 8: 1 process x 8; 1 process x 4 x accumulation 2; 2 processes x 4 (gloo). Same losses."""
    common = ["--max_steps", "4", "--learning_rate", "1e-3"]
    big = train_tiny(kb, method, tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 4
        for a, b in zip(big, run):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6), (big, run)
