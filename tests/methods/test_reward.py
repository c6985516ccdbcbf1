"""Bradley-Terry reward model (method `reward-model`): the generated script learns to rank the tiny preference
data, applies the margin and centring terms it is asked for, gives the same run for one big batch, gradient
accumulation and two data-parallel processes, and saves a scorer that loads and scores as its card says."""

from __future__ import annotations

import json
import math

import pytest

from conftest import generated_script, mean, tiny_args, train_tiny
from scorer_card import load_scorer, reward_scores


def softplus(x: float) -> float:
    """-log σ(-x), the Bradley-Terry loss of a pair whose reward difference is -x."""
    return math.log1p(math.exp(x))


def test_reward_model_learns_to_rank_chosen_above_rejected(kb, tiny, tmp_path):
    metrics = train_tiny(kb, "reward-model", tiny, tmp_path, ["--max_steps", "30", "--learning_rate", "1e-3"])
    losses = [m["loss"] for m in metrics]
    accuracy = [m["accuracy"] for m in metrics]
    margins = [m["margin"] for m in metrics]
    # The new score head starts near zero (std 0.02), so every pair starts at -log σ(0) = log 2.
    assert abs(losses[0] - math.log(2)) < 0.02, losses[:3]
    assert mean(accuracy[-5:]) >= 0.95, accuracy
    assert mean(margins[-5:]) > 2.0, margins
    assert mean(losses[-5:]) < 0.15, losses


def with_margin(tiny, tmp_path, margin: float):
    """The tiny preference rows with a constant 'margin' column."""
    path = tmp_path / f"preference-margin-{margin}.jsonl"
    rows = [json.loads(line) for line in (tiny / "data" / "preference.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "margin": margin}) + "\n" for row in rows))
    return path


def test_margin_is_subtracted_inside_the_sigmoid(kb, tiny, tmp_path):
    """With m = 3 every pair starts at -log σ(0 - 3) = softplus(3) instead of log 2, and at every step the mean
    loss is at least softplus(3 - mean margin) (Jensen: softplus is convex), a bound the loss without the margin
    falls far below; the margin column is ignored unless use_margin is true."""
    data = with_margin(tiny, tmp_path, 3.0)
    common = ["--dataset", str(data), "--max_steps", "30", "--learning_rate", "1e-3"]
    plain = train_tiny(kb, "reward-model", tiny, tmp_path, common, name="plain")
    margin = train_tiny(kb, "reward-model", tiny, tmp_path, common + ["--use_margin", "true"], name="margin")
    assert abs(plain[0]["loss"] - math.log(2)) < 0.02
    assert abs(margin[0]["loss"] - softplus(3.0)) < 0.05, margin[0]
    for m in margin:
        assert m["loss"] >= softplus(3.0 - m["margin"]) - 1e-5, m
    assert all(m["loss"] < softplus(3.0 - m["margin"]) - 0.05 for m in plain[10:]), plain  # the bound separates the runs
    # Both runs separate the pairs; the margin keeps pushing once the plain loss has flattened.
    assert mean(m["margin"] for m in plain[-5:]) > 2.0
    assert mean(m["margin"] for m in margin[-5:]) > mean(m["margin"] for m in plain[-5:])


def offset_reward_model(tiny, directory, offset: float = 5.0):
    """The tiny model as a reward model whose every reward starts near `offset`: the score head gets an extra
    component along the mean final hidden state. Bradley-Terry is blind to such a shift; centring is not."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForSequenceClassification.from_pretrained(tiny / "model", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [json.loads(line) for line in (tiny / "data" / "preference.jsonl").read_text().splitlines()][:32]
    with torch.no_grad():
        states = []
        for row in rows:
            messages = [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": row["chosen"]}]
            ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
            states.append(model.model(torch.tensor([ids])).last_hidden_state[0, -1])
        direction = torch.stack(states).mean(0)
        model.score.weight += offset * direction / direction.dot(direction)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_centring_pulls_the_mean_reward_to_zero(kb, tiny, tmp_path):
    """From a reward model whose rewards all start near 5, the centring term (η = 0.1) brings the mean reward
    (r_c + r_l)/2 to about 0 within 16 steps, while the plain loss leaves it far from 0."""
    start = offset_reward_model(tiny, tmp_path / "offset-model")
    common = ["--model_name_or_path", str(start), "--max_steps", "24", "--learning_rate", "1e-4"]
    plain = train_tiny(kb, "reward-model", tiny, tmp_path, common, name="plain")
    centred = train_tiny(kb, "reward-model", tiny, tmp_path, common + ["--center_rewards_coefficient", "0.1"], name="centred")
    assert plain[0]["mean_reward"] > 4.0 and centred[0]["mean_reward"] > 4.0
    assert min(m["mean_reward"] for m in plain[16:]) > 2.0, [m["mean_reward"] for m in plain]
    assert max(abs(m["mean_reward"]) for m in centred[16:]) < 0.6, [m["mean_reward"] for m in centred]
    assert mean(m["accuracy"] for m in plain[-5:]) >= 0.95


def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path):
    """Global batch 8: 1 process x 8; 1 process x 4 x accumulation 2; 2 processes x 4 (gloo). Same losses."""
    common = ["--max_steps", "4", "--learning_rate", "1e-3", "--center_rewards_coefficient", "0.1"]
    big = train_tiny(kb, "reward-model", tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, "reward-model", tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, "reward-model", tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 4
        for a, b in zip(big, run):
            for key in ("loss", "margin", "accuracy", "mean_reward"):
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, big, run)


def test_saved_scorer_loads_and_ranks_as_its_card_says(tiny, tiny_reward_model):
    model, tokenizer, card = load_scorer(tiny_reward_model)
    assert card["kind"] == "reward" and card["model_class"] == "AutoModelForSequenceClassification"
    assert card["pad_token_id"] == tokenizer.pad_token_id == model.config.pad_token_id
    assert card["adapter"] is False
    rows = [json.loads(line) for line in (tiny / "data" / "preference.jsonl").read_text().splitlines()][:64]
    chosen = reward_scores(model, tokenizer, card, [(r["prompt"], r["chosen"]) for r in rows])
    rejected = reward_scores(model, tokenizer, card, [(r["prompt"], r["rejected"]) for r in rows])
    accuracy = mean(float(c > r) for c, r in zip(chosen, rejected))
    assert accuracy >= 0.95, accuracy
    # The read position does not depend on padding: left-padded batches and single rows give the same rewards.
    left = reward_scores(model, tokenizer, card, [(r["prompt"], r["chosen"]) for r in rows], padding_side="left")
    single = [reward_scores(model, tokenizer, card, [(r["prompt"], r["chosen"])])[0] for r in rows[:8]]
    assert max(abs(a - b) for a, b in zip(chosen, left)) < 1e-4
    assert max(abs(a - b) for a, b in zip(chosen, single)) < 1e-4


def test_lora_scorer_is_merged_and_matches_training(kb, tiny, tmp_path):
    """With LoRA the final save merges the adapter (and the trained score head) into a plain model."""
    from conftest import compile_script

    script = tmp_path / "train_rm_lora.py"
    script.write_text(compile_script(kb, "reward-model", "qwen2.5-0.5b-instruct", peft="lora"))
    metrics = train_tiny(kb, "reward-model", tiny, tmp_path, ["--max_steps", "20", "--learning_rate", "1e-2"], script=script, name="lora")
    assert mean(m["accuracy"] for m in metrics[-5:]) >= 0.95
    final = tmp_path / "lora" / "final"
    assert not (final / "adapter_config.json").exists()
    model, tokenizer, card = load_scorer(final)
    assert card["adapter"] is False
    rows = [json.loads(line) for line in (tiny / "data" / "preference.jsonl").read_text().splitlines()][:32]
    chosen = reward_scores(model, tokenizer, card, [(r["prompt"], r["chosen"]) for r in rows])
    rejected = reward_scores(model, tokenizer, card, [(r["prompt"], r["rejected"]) for r in rows])
    assert mean(float(c > r) for c, r in zip(chosen, rejected)) >= 0.95


def test_bad_rows_are_located_and_long_pairs_dropped(kb, tiny, tmp_path):
    from conftest import run_script

    rows = [json.loads(line) for line in (tiny / "data" / "preference.jsonl").read_text().splitlines()][:40]
    rows[2]["margin"] = "big"
    for row in rows:
        row.setdefault("margin", 1.0)
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = tiny_args(kb, "reward-model", tiny) + ["--dataset", str(data), "--use_margin", "true", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    result = run_script(generated_script("reward-model"), args, cwd=tmp_path, check=False)
    assert result.returncode != 0 and f"{data}:3: field 'margin' must be a finite number" in result.stderr, result.stderr[-2000:]
    # Pairs over max_length are dropped and reported, never truncated (the reward is read at the last token).
    long_rows = [dict(row, margin=1.0) for row in rows]
    long_rows[5]["chosen"] = "The cat is kind. " * 40
    data.write_text("".join(json.dumps(row) + "\n" for row in long_rows))
    args = tiny_args(kb, "reward-model", tiny) + ["--dataset", str(data), "--max_length", "64", "--output_dir", str(tmp_path / "out2"), "--max_steps", "1"]
    result = run_script(generated_script("reward-model"), args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "39 training items" in result.stdout and f"{data}:6:" in result.stdout and "pair dropped" in result.stdout, result.stdout


@pytest.mark.parametrize("peft", ["prompt-tuning", "prefix-tuning", "p-tuning-v2"])
def test_virtual_token_peft_is_refused_for_scorers(kb, peft):
    from ptcompile.errors import CompileError
    from conftest import compile_script

    for method in ("reward-model", "process-reward-model"):
        with pytest.raises(CompileError, match="cannot be merged"):
            compile_script(kb, method, peft=peft)


def test_resume_continues_exactly(kb, tiny, tmp_path):
    """A run stopped after its step-3 checkpoint and resumed gives the uninterrupted run's losses (the
    sequence-classification head is saved and restored with the rest of the model)."""
    import shutil

    from conftest import FAST, read_metrics, run_script

    flags = tiny_args(kb, "reward-model", tiny) + FAST + ["--max_steps", "6", "--learning_rate", "1e-3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_script(generated_script("reward-model"), flags + ["--output_dir", str(whole)], cwd=tmp_path)
    run_script(generated_script("reward-model"), flags + ["--output_dir", str(resumed), "--save_steps", "3"], cwd=tmp_path)
    shutil.rmtree(resumed / "final")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (resumed / "metrics.jsonl").read_text().splitlines()[:3]))
    run_script(generated_script("reward-model"), flags + ["--output_dir", str(resumed), "--save_steps", "3", "--resume_from_checkpoint", "latest"], cwd=tmp_path)
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(whole)]
