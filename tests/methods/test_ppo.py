"""PPO-RLHF (method `ppo-rlhf`): the generated script raises a learned reward model's score on the tiny
"polite" task, and one big minibatch, gradient accumulation and two data-parallel processes give the same run.

Setup (tests/online_helpers.py): the tiny model warm-started to describe an animal with an adjective drawn
uniformly from polite and rude ones, and a tiny Bradley-Terry reward model trained by the generated
reward-model script on the bundled preference data hardened with degenerate rejected replies (polite about
+6, rude or degenerate about -6); PPO loads it through its ptcompile_scorer.json, the RLHF pipeline end to end.
"""

from __future__ import annotations

import math

import pytest

from conftest import mean, train_tiny
from online_helpers import cached, fit, polite_args, polite_fraction, polite_policy_examples, train_reward_model


@pytest.fixture(scope="module")
def policy(tiny, tmp_path_factory):
    return fit(tiny, cached(tmp_path_factory, "polite-policy"), polite_policy_examples(), steps=100)


@pytest.fixture(scope="module")
def reward_model(kb, tiny, tmp_path_factory):
    return train_reward_model(kb, tiny, cached(tmp_path_factory, "reward-model"))


def ppo_args(policy, tiny, reward_model) -> list[str]:
    return polite_args(policy, tiny) + ["--reward_model_path", str(reward_model), "--max_completion_length", "10", "--missing_eos_penalty", "5", "--num_mini_batches", "2", "--num_ppo_epochs", "2", "--learning_rate", "1e-3"]


def test_ppo_raises_the_reward_model_score(kb, tiny, tmp_path, policy, reward_model):
    metrics = train_tiny(kb, "ppo-rlhf", tiny, tmp_path, ppo_args(policy, tiny, reward_model) + ["--max_steps", "15"])
    scores = [m["score"] for m in metrics]
    assert len(scores) == 15
    assert abs(metrics[0]["kl"]) < 1e-4  # the first rollout is sampled by the reference itself
    assert mean(scores[:3]) < 2.5, scores  # about half the warm start's answers are rude (score -4.4)
    assert mean(scores[-3:]) > mean(scores[:3]) + 1.5, scores
    assert metrics[-1]["kl"] > 0.1  # the policy moved away from the reference to get there
    assert polite_fraction(tmp_path / "run" / "final") >= polite_fraction(policy) + 0.2  # the warm start is polite about half the time


def test_ppo_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path, policy, reward_model):
    """Minibatch 8, rollout batch 16, 2 PPO epochs: 1 process x 8; 1 x 4 x accumulation 2; 2 processes x 4."""
    common = ppo_args(policy, tiny, reward_model) + ["--max_steps", "3"]
    big = train_tiny(kb, "ppo-rlhf", tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, "ppo-rlhf", tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, "ppo-rlhf", tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 3
        for a, b in zip(big, run):
            for key in ("score", "kl", "loss", "loss/value", "clipfrac"):
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, big, run)


def test_ppo_resume_continues_exactly(kb, tiny, tmp_path, policy, reward_model):
    """Stopped after its iteration-2 checkpoint and resumed, a run gives the uninterrupted run's numbers: the
    value head, optimiser and schedule come back with the policy, and rollouts are seeded by iteration."""
    import shutil

    from conftest import FAST, generated_script, read_metrics, run_script, tiny_args

    flags = tiny_args(kb, "ppo-rlhf", tiny) + FAST + ppo_args(policy, tiny, reward_model) + ["--max_steps", "4"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_script(generated_script("ppo-rlhf"), flags + ["--output_dir", str(whole)], cwd=tmp_path)
    run_script(generated_script("ppo-rlhf"), flags + ["--output_dir", str(resumed), "--save_steps", "2"], cwd=tmp_path)
    shutil.rmtree(resumed / "final")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (resumed / "metrics.jsonl").read_text().splitlines()[:2]))
    run_script(generated_script("ppo-rlhf"), flags + ["--output_dir", str(resumed), "--save_steps", "2", "--resume_from_checkpoint", "latest"], cwd=tmp_path)
    for key in ("score", "loss", "loss/value"):
        assert [m[key] for m in read_metrics(resumed)] == pytest.approx([m[key] for m in read_metrics(whole)], rel=1e-6, abs=1e-7), key
