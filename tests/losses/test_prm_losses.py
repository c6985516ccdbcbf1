"""The process-reward-model loss of the emitted script against an independent computation:

    L = -(1/N) Σ_solutions Σ_k log p(c_k | x, s_1..s_k)

the cross-entropy of the 2-way step class at the last separator token after each step, summed over the
labelled positions (the loop divides by N, the labelled steps of the optimizer step). First the named loss
function on random logits with ragged label masks in fp32 and bf16, then the whole compute_loss on the tiny
model with ragged rows, scored one unpadded row at a time from the backbone's hidden states.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import compile_script, generated_script, load_script_module
from script_functions import load_functions


def reference(logits: list[list[list[float]]], labels: list[list[int]]) -> float:
    total = 0.0
    for row_logits, row_labels in zip(logits, labels):
        for position, label in enumerate(row_labels):
            if label == -100:
                continue
            scores = row_logits[position]
            top = max(scores)
            log_norm = top + math.log(sum(math.exp(s - top) for s in scores))
            total += log_norm - scores[label]
    return total


@pytest.fixture(scope="module")
def step_loss(kb):
    return load_functions(compile_script(kb, "process-reward-model"), ["step_classification_loss"])["step_classification_loss"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_loss_matches_the_formula_on_ragged_masks(step_loss, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = (3 * torch.randn(6, 40, 2, generator=generator)).to(dtype)
        labels = torch.randint(0, 2, (6, 40), generator=generator)
        keep = torch.rand(6, 40, generator=generator) < 0.15  # a few labelled positions per row, some rows none
        keep[trial % 6] = False
        labels = torch.where(keep, labels, torch.full_like(labels, -100))
        got = float(step_loss(logits, labels))
        # The function upcasts to fp32, so bf16 inputs differ only by their own rounding: compare with the
        # formula on the bf16 values themselves (relative 1e-5), and bf16 vs fp32 inputs within 1e-2.
        expected = reference(logits.double().tolist(), labels.tolist())
        assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)
        if dtype == torch.bfloat16:
            assert math.isclose(got, float(step_loss(logits.float(), labels)), rel_tol=tolerance)


def test_no_labelled_step_gives_zero(step_loss):
    logits = torch.randn(2, 5, 2, requires_grad=True)
    loss = step_loss(logits, torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum().item() == 0.0


@pytest.mark.parametrize("last_only", [False, True])
def test_compute_loss_on_ragged_rows_matches_unpadded_scoring(tiny, last_only):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(tiny / "model", num_labels=2, dtype=torch.float32).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
        model.score.bias.normal_(0, 1.0)
    script = load_script_module(generated_script("process-reward-model"))
    args = script.parse_args(["--model_name_or_path", str(tiny / "model"), "--steps_column", "steps", "--train_on_last_step_only", str(last_only).lower()])
    rows = [json.loads(line) for line in (tiny / "data" / "arithmetic_steps.jsonl").read_text().splitlines()][:6]
    for i, row in enumerate(rows):  # ragged: 1 to 4 steps per row
        row["steps"], row["labels"] = (row["steps"] * 2)[: 1 + i % 4], (row["labels"] * 2)[: 1 + i % 4]
    encoder = script.ChatEncoder(tokenizer)
    separator = script.separator_token_ids(tokenizer, args)
    items = [script.encode_row(row, f"row {i}", encoder, separator, args) for i, row in enumerate(rows)]
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        loss_sum, metrics = script.compute_loss(model, batch, args, {})
        expected, labelled = 0.0, 0
        for item in items:
            hidden = model.model(input_ids=torch.tensor([item["input_ids"]])).last_hidden_state[0].double()
            logits = hidden @ model.score.weight.double().T + model.score.bias.double()
            expected += reference([logits.tolist()], [item["labels"]])
            labelled += sum(label != -100 for label in item["labels"])
    assert batch["num_items"] == labelled == (len(rows) if last_only else sum(len(r["steps"]) for r in rows))
    assert math.isclose(float(loss_sum), expected, rel_tol=1e-5), (float(loss_sum), expected)
