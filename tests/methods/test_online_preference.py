"""Online and iterative preference methods (family `online-preference`): each generated script makes the tiny
policy measurably better at its task, judged the way the method prescribes, and one big batch, gradient
accumulation and two data-parallel processes give the same run.

Setup (tests/online_helpers.py): the "polite" task. The warm-started policy answers "Describe the cat." with
"The cat is <adjective>.", the adjective drawn uniformly from polite and rude ones (polite about half the
time). The judges: a tiny reward model trained by the generated reward-model script (online-dpo), a tiny
LLM labeller trained on the RLAIF labelling task (rlaif), the policy itself trained on judge data as in Yuan
et al.'s EFT set (iterative-dpo). SPIN needs no judge: it learns from the bundled chat data against its own
generations.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import mean, train_tiny
from online_helpers import (
    LABELLER_TEMPLATE,
    SELF_JUDGE_TEMPLATE,
    cached,
    chat_examples,
    fit,
    labeller_examples,
    polite_args,
    polite_fraction,
    polite_policy_examples,
    self_judge_examples,
    train_reward_model,
)


@pytest.fixture(scope="module")
def policy(tiny, tmp_path_factory):
    return fit(tiny, cached(tmp_path_factory, "polite-policy"), polite_policy_examples(), steps=100)


@pytest.fixture(scope="module")
def reward_model(kb, tiny, tmp_path_factory):
    return train_reward_model(kb, tiny, cached(tmp_path_factory, "reward-model"))


@pytest.fixture(scope="module")
def prompts64(tiny, tmp_path_factory):
    """The first 64 describe-an-animal rows: the round-based methods generate for every prompt each round."""
    path = cached(tmp_path_factory, "describe64.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((tiny / "data" / "preference.jsonl").read_text().splitlines(keepends=True)[:64]))
    return path


def test_online_dpo_raises_the_annotators_score(kb, tiny, tmp_path, policy, reward_model):
    extra = polite_args(policy, tiny) + ["--reward_model_path", str(reward_model), "--max_new_tokens", "10", "--missing_eos_penalty", "5", "--learning_rate", "5e-4", "--max_steps", "30"]
    metrics = train_tiny(kb, "online-dpo", tiny, tmp_path, extra)
    scores = [m["score"] for m in metrics]
    assert len(scores) == 30
    assert mean(scores[-5:]) > mean(scores[:5]) + 1.5, scores  # reward-model scores: polite +6, rude or degenerate -6
    print("online-dpo score", [round(x, 2) for x in scores])
    assert polite_fraction(tmp_path / "run" / "final") >= polite_fraction(policy) + 0.2


@pytest.fixture(scope="module")
def labeller(tiny, tmp_path_factory):
    return fit(tiny, cached(tmp_path_factory, "labeller"), labeller_examples(), steps=300)


def test_rlaif_makes_the_policy_politer(kb, tiny, tmp_path, policy, labeller):
    extra = polite_args(policy, tiny) + [
        "--judge_model", str(labeller), "--judge_template", LABELLER_TEMPLATE, "--max_new_tokens", "10", "--learning_rate", "1e-3", "--max_steps", "30",
    ]
    metrics = train_tiny(kb, "rlaif", tiny, tmp_path, extra)
    assert len(metrics) == 30
    # The labeller is sure about a pair of one polite and one rude answer (confidence |2p - 1| near 1) and unsure
    # about two polite ones (near 0): its confidence falls as the policy stops writing rude answers.
    confidence = [m["preference/confidence"] for m in metrics]
    assert mean(confidence[:5]) > 0.3, confidence
    assert mean(confidence[-5:]) < mean(confidence[:5]) - 0.15, confidence
    assert polite_fraction(tmp_path / "run" / "final") >= polite_fraction(policy) + 0.2


@pytest.fixture(scope="module")
def self_judging_policy(tiny, tmp_path_factory):
    """The polite-task policy that has also learnt to judge (Yuan et al.'s IFT + EFT seed data)."""
    return fit(tiny, cached(tmp_path_factory, "self-judging-policy"), polite_policy_examples() + self_judge_examples(), steps=200)


def test_self_rewarding_rounds_raise_the_self_judged_score(kb, tiny, tmp_path, self_judging_policy, prompts64):
    extra = polite_args(self_judging_policy, tiny) + [
        "--dataset", str(prompts64), "--judge_template", SELF_JUDGE_TEMPLATE, "--max_new_tokens", "10", "--learning_rate", "3e-4",
        "--num_rounds", "2", "--max_steps", "8",
    ]
    metrics = train_tiny(kb, "iterative-dpo", tiny, tmp_path, extra)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and len(metrics) >= 8  # round 2 may find (almost) only ties
    assert rounds[0]["judge/unparsed"] < 0.1  # the judge answers in the rubric's format
    assert rounds[0]["round_pairs"] >= 24  # enough prompts have a best and a worst candidate
    # M2's candidates, judged by M2, score higher than M1's judged by M1 (scores 1 = rude, 5 = polite).
    assert rounds[1]["judge/score"] > rounds[0]["judge/score"] + 0.8, rounds
    assert mean(m["loss"] for m in metrics[5:8]) < math.log(2) - 0.02  # round 1 fits its pairs
    assert mean(m["rewards/accuracy"] for m in metrics[5:8]) > 0.8
    # Measured at the method's own sampling temperature (0.7).
    assert polite_fraction(tmp_path / "run" / "final", samples=8, temperature=0.7) >= polite_fraction(self_judging_policy, samples=8, temperature=0.7) + 0.2


@pytest.fixture(scope="module")
def chat_warm(tiny, tmp_path_factory):
    """A tiny SFT model that has seen the chat data only briefly: the starting point SPIN improves on."""
    return fit(tiny, cached(tmp_path_factory, "chat-warm"), chat_examples(tiny), steps=60)


def test_spin_learns_to_tell_the_data_from_its_own_generations(kb, tiny, tmp_path, chat_warm):
    """Two self-play rounds of 12 steps (32 pairs each) on the bundled chat data. In each round the SPIN loss
    starts at log 2 (the opponent is the round's starting model) and falls as the model raises the data's
    responses over its own; round 2 starts again from log 2 against the round-1 model."""
    extra = ["--model_name_or_path", str(chat_warm), "--per_device_train_batch_size", "32", "--max_new_tokens", "16", "--learning_rate", "1e-3", "--num_rounds", "2", "--max_steps", "12"]
    metrics = train_tiny(kb, "spin", tiny, tmp_path, extra)
    assert len(metrics) == 24
    for round_metrics in (metrics[:12], metrics[12:]):
        assert abs(round_metrics[0]["loss"] - math.log(2)) < 1e-4
        assert mean(m["loss"] for m in round_metrics[-4:]) < math.log(2) - 0.08, [m["loss"] for m in metrics]
        assert mean(m["rewards/accuracy"] for m in round_metrics[-4:]) > 0.7
        assert mean(m["rewards/margin"] for m in round_metrics[-4:]) > 0.2


@pytest.mark.parametrize("method", ["online-dpo", "spin"])
def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path, policy, reward_model, chat_warm, method):
    """Global batch 8: 1 process x 8; 1 process x 4 x accumulation 2; 2 processes x 4 (gloo). Same pairs, same losses."""
    if method == "online-dpo":
        common = polite_args(policy, tiny) + ["--reward_model_path", str(reward_model), "--max_new_tokens", "10", "--learning_rate", "1e-3", "--max_steps", "4"]
    else:
        common = ["--model_name_or_path", str(chat_warm), "--max_new_tokens", "12", "--learning_rate", "1e-3", "--num_rounds", "2", "--max_steps", "2"]
    big = train_tiny(kb, method, tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    keys = ["loss", "rewards/margin"] + (["score"] if method == "online-dpo" else [])
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 4
        for a, b in zip(big, run):
            for key in keys:
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, big, run)


@pytest.mark.parametrize("method", ["online-dpo", "spin"])
def test_resume_continues_exactly(kb, tiny, tmp_path, policy, reward_model, chat_warm, method):
    """A run stopped after a checkpoint and resumed gives the uninterrupted run's losses. For SPIN (2 rounds of
    4 steps, checkpoints at steps 3 and 6) this is checked from inside round 2 (the round's saved pairs are
    reused) and from inside round 1 after losing round 2's pairs (they are written again by the resumed run)."""
    import shutil

    from conftest import FAST, read_metrics, run_script, tiny_args
    from conftest import generated_script as script_of

    if method == "online-dpo":
        flags = polite_args(policy, tiny) + ["--reward_model_path", str(reward_model), "--max_new_tokens", "10", "--learning_rate", "1e-3", "--max_steps", "6"]
    else:
        flags = ["--model_name_or_path", str(chat_warm), "--max_new_tokens", "12", "--learning_rate", "1e-3", "--num_rounds", "2", "--max_steps", "4"]
    flags = tiny_args(kb, method, tiny) + FAST + flags
    script = script_of(method)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_script(script, flags + ["--output_dir", str(whole)], cwd=tmp_path)
    expected = [m["loss"] for m in read_metrics(whole)]
    run_script(script, flags + ["--output_dir", str(resumed), "--save_steps", "3"], cwd=tmp_path)
    checkpoints = sorted(p.name for p in resumed.glob("checkpoint-*"))
    for stop in ([6, 3] if method == "spin" else [3]):
        assert f"checkpoint-{stop}" in checkpoints
        shutil.rmtree(resumed / "final")
        for later in resumed.glob("checkpoint-*"):
            if int(later.name.split("-")[1]) > stop:
                shutil.rmtree(later)
        if method == "spin" and stop == 3:
            (resumed / "rounds" / "round-2.json").unlink()  # lost with the crash: round 2 had not started
        (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (resumed / "metrics.jsonl").read_text().splitlines()[:stop]))
        run_script(script, flags + ["--output_dir", str(resumed), "--save_steps", "3", "--resume_from_checkpoint", "latest"], cwd=tmp_path)
        assert [m["loss"] for m in read_metrics(resumed)] == pytest.approx(expected, rel=1e-6, abs=1e-7)
