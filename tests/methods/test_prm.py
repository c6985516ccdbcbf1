"""Process reward model (method `process-reward-model`): the generated script learns to check the steps of the
tiny arithmetic solutions, gives the same run for one big batch, gradient accumulation and two data-parallel
processes, encodes rows as documented, and saves a scorer that scores steps as its card says."""

from __future__ import annotations

import json
import math

import torch

from conftest import generated_script, load_script_module, mean, run_script, tiny_args, train_tiny
from scorer_card import load_scorer, step_input, step_scores


def shown_only_accuracy(rows) -> float:
    """The best accuracy of any rule that looks only at a step's stated result (wrong results overshoot, so
    large results are more often wrong): what a PRM could reach without checking the sum."""
    counts: dict[int, list[int]] = {}
    for row in rows:
        for step, label in zip(row["steps"], row["labels"]):
            shown = int(step.rstrip(".").split()[-1])
            counts.setdefault(shown, [0, 0])[int(label)] += 1
    return sum(max(c) for c in counts.values()) / sum(sum(c) for c in counts.values())


def test_prm_learns_to_check_arithmetic_steps(tiny, tiny_prm):
    """The tiny_prm fixture's run (conftest.TINY_SCORER_FLAGS: 500 steps of 16 rows at lr 2e-3). Half the steps
    are wrong, independently of their position, so guessing gives loss log 2 and accuracy 1/2; a rule on the
    stated result alone reaches about 0.68; the PRM must check the sums to do clearly better."""
    metrics = [json.loads(line) for line in (tiny_prm.parent / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tiny / "data" / "arithmetic_steps.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    accuracy = [m["step_accuracy"] for m in metrics]
    assert len(metrics) == 500
    assert 0.4 < mean(m["label_correct"] for m in metrics) < 0.6
    assert abs(losses[0] - math.log(2)) < 0.05, losses[:5]  # the new head starts near uniform
    assert mean(losses[-50:]) < 0.4, losses[-50:]
    assert mean(accuracy[-50:]) > max(0.85, shown_only_accuracy(rows) + 0.1), accuracy[-50:]


def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path):
    """Global batch 8 rows: 1 process x 8; 1 x 4 x accumulation 2; 2 processes x 4 (gloo). The loss is a mean
    over the labelled steps of the whole step, so all three agree."""
    common = ["--max_steps", "4", "--learning_rate", "3e-3"]
    big = train_tiny(kb, "process-reward-model", tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, "process-reward-model", tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, "process-reward-model", tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 4
        for a, b in zip(big, run):
            for key in ("loss", "step_accuracy", "p_correct"):
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, big, run)


def script_and_tokenizer(tiny, *flags):
    from transformers import AutoTokenizer

    script = load_script_module(generated_script("process-reward-model"))
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    args = script.parse_args(["--model_name_or_path", str(tiny / "model"), "--steps_column", "steps", *flags])
    return script, tokenizer, args


def test_encoding_puts_each_label_on_the_separator_after_its_step(tiny):
    script, tokenizer, args = script_and_tokenizer(tiny)
    row = {"prompt": "What is 1 plus 2 plus 0?", "steps": ["1 plus 2 is 3.", "3 plus 0 is 5."], "labels": [True, False]}
    separator = script.separator_token_ids(tokenizer, args)
    item = script.encode_row(row, "row", script.ChatEncoder(tokenizer), separator, args)
    card = {"kind": "process_reward", "input": "chat_prompt_then_steps", "separator_ids": separator}
    ids, ends = step_input(tokenizer, card, row["prompt"], row["steps"])
    assert item["input_ids"] == ids  # training encodes exactly as the scorer card tells consumers to
    assert [i for i, label in enumerate(item["labels"]) if label != -100] == ends
    assert [item["labels"][i] for i in ends] == [1, 0]
    assert all(item["input_ids"][e - len(separator) + 1 : e + 1] == separator for e in ends)
    # Only whole steps are kept under max_length; the cut step's label goes with it.
    short = script.parse_args(["--model_name_or_path", str(tiny / "model"), "--steps_column", "steps", "--max_length", str(ends[0] + 2)])
    cut = script.encode_row(row, "row", script.ChatEncoder(tokenizer), separator, short)
    assert cut["input_ids"] == ids[: ends[0] + 1] and [label for label in cut["labels"] if label != -100] == [1]
    # Outcome supervision: only the last step's label is kept.
    last = script.parse_args(["--model_name_or_path", str(tiny / "model"), "--steps_column", "steps", "--train_on_last_step_only", "true"])
    outcome = script.encode_row(row, "row", script.ChatEncoder(tokenizer), separator, last)
    assert [i for i, label in enumerate(outcome["labels"]) if label != -100] == ends[-1:]


def test_bad_rows_are_located(kb, tiny, tmp_path):
    rows = [json.loads(line) for line in (tiny / "data" / "arithmetic_steps.jsonl").read_text().splitlines()][:20]
    rows[3]["labels"] = rows[3]["labels"][:1]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = tiny_args(kb, "process-reward-model", tiny) + ["--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    result = run_script(generated_script("process-reward-model"), args, cwd=tmp_path, check=False)
    assert result.returncode != 0 and f"{data}:4: field 'labels' must be a list with one label per step (2)" in result.stderr, result.stderr[-2000:]
    rows[3]["labels"] = [True, "yes"]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_script(generated_script("process-reward-model"), args, cwd=tmp_path, check=False)
    assert f"{data}:4: field 'labels' item 1: expected true/false" in result.stderr, result.stderr[-2000:]


def test_saved_scorer_scores_steps_as_its_card_says(tiny, tiny_prm):
    model, tokenizer, card = load_scorer(tiny_prm)
    assert card["kind"] == "process_reward" and card["model_class"] == "AutoModelForTokenClassification"
    assert card["correct_class"] == 1 and card["labels"] == {"0": "incorrect", "1": "correct"}
    assert card["step_separator"] == "\n" and card["separator_ids"] == tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert model.config.id2label == {0: "incorrect", 1: "correct"}
    rows = [json.loads(line) for line in (tiny / "data" / "arithmetic_steps.jsonl").read_text().splitlines()][:96]
    right, wrong = [], []
    for row in rows:
        for p, label in zip(step_scores(model, tokenizer, card, row["prompt"], row["steps"]), row["labels"]):
            (right if label else wrong).append(p)
    accuracy = (sum(p > 0.5 for p in right) + sum(p <= 0.5 for p in wrong)) / (len(right) + len(wrong))
    assert accuracy > 0.8, accuracy
    assert mean(right) > mean(wrong) + 0.4, (mean(right), mean(wrong))
    # A batch of padded rows scores like single rows (pad_token_id and attention mask are all a consumer needs).
    inputs = [step_input(tokenizer, card, row["prompt"], row["steps"]) for row in rows[:6]]
    width = max(len(ids) for ids, _ in inputs)
    batch = torch.tensor([ids + [card["pad_token_id"]] * (width - len(ids)) for ids, _ in inputs])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in inputs])
    with torch.no_grad():
        probabilities = model(input_ids=batch, attention_mask=mask).logits.softmax(-1)[..., 1]
    for (ids, ends), row_probabilities, row in zip(inputs, probabilities, rows):
        single = step_scores(model, tokenizer, card, row["prompt"], row["steps"])
        assert max(abs(float(row_probabilities[e]) - s) for e, s in zip(ends, single)) < 1e-5
