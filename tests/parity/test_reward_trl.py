"""Parity of the emitted reward-model script with TRL 1.16's RewardTrainer, driven as it is.

TRL's own preprocessing (RewardTrainer._prepare_dataset), collator and compute_loss run on conversational
tiny preference rows; our script encodes the same rows with encode_row/collate and computes compute_loss on
the same tiny sequence-classification model. Compared: the token ids, the mean loss (with and without TRL's
margin column and centring coefficient) and the gradients of every parameter.

Differences on purpose, not tested here: TRL applies a margin whenever the dataset has a 'margin' column, we
only with use_margin true; TRL tokenizes plain-string rows without a chat template (appending EOS), we always
render prompt + response with the chat template (the scorer contract); TRL averages per micro-batch, we
average over all pairs of the optimizer step (equal for equal micro-batches).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import generated_script, load_script_module

pytestmark = pytest.mark.parity
trl = pytest.importorskip("trl")


def conversational_rows(tiny, n: int = 8, with_margin: bool = False) -> list[dict]:
    rows = []
    for i, line in enumerate((tiny / "data" / "preference.jsonl").read_text().splitlines()[:n]):
        row = json.loads(line)
        prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        chosen = row["chosen"] + " Very kind." * (i % 3)  # ragged lengths
        converted = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        if with_margin:
            converted["margin"] = 0.5 * i
        rows.append(converted)
    return rows


def make_trainer(tiny, tmp_path, rows, eta):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny / "model", num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards of order 1, so the margin and centring terms matter
    config = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        center_rewards_coefficient=eta,
        per_device_train_batch_size=len(rows),
        bf16=False,
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        max_length=1024,
    )
    return trl.RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer), tokenizer


def our_batch(tiny, tokenizer, rows, eta, with_margin):
    script = load_script_module(generated_script("reward-model"))
    flags = ["--model_name_or_path", str(tiny / "model"), "--center_rewards_coefficient", str(eta or 0.0)]
    if with_margin:
        flags += ["--use_margin", "true"]
    args = script.parse_args(flags)
    encoder = script.ChatEncoder(tokenizer)
    items = [script.encode_row(row, f"row {i}", encoder, args) for i, row in enumerate(rows)]
    return script, args, items


def test_tokenization_matches_trl(tiny, tmp_path):
    rows = conversational_rows(tiny)
    trainer, tokenizer = make_trainer(tiny, tmp_path, rows, None)
    _, _, items = our_batch(tiny, tokenizer, rows, None, False)
    for ours, theirs in zip(items, trainer.train_dataset):
        assert ours["chosen_ids"] == theirs["chosen_ids"]
        assert ours["rejected_ids"] == theirs["rejected_ids"]


@pytest.mark.parametrize("eta", [None, 0.01, 0.5])
@pytest.mark.parametrize("with_margin", [False, True])
def test_loss_and_gradients_match_trl(tiny, tmp_path, eta, with_margin):
    rows = conversational_rows(tiny, with_margin=with_margin)
    trainer, tokenizer = make_trainer(tiny, tmp_path, rows, eta)
    model = trainer.model
    model.train()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trl_loss = trainer.compute_loss(model, dict(inputs))
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    script, args, items = our_batch(tiny, tokenizer, rows, eta, with_margin)
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    assert torch.equal(batch["input_ids"], inputs["input_ids"]) and torch.equal(batch["attention_mask"], inputs["attention_mask"])
    loss_sum, _ = script.compute_loss(model, batch, args, {})
    ours = loss_sum / batch["num_items"]  # what the loop divides by for one micro-batch on one process
    ours.backward()
    assert math.isclose(ours.item(), trl_loss.item(), rel_tol=1e-6, abs_tol=1e-7), (ours.item(), trl_loss.item())
    assert trl_grads, "TRL's loss produced no gradients"
    for name, p in model.named_parameters():
        if name in trl_grads:
            assert torch.allclose(p.grad, trl_grads[name], rtol=1e-5, atol=1e-7), name
