"""Parity of KTO with TRL 1.16's KTOTrainer: the same tiny policy, reference and token ids (completions and
mismatched completions) through TRL's collator and loss and through the emitted script's estimate_kl and
compute_loss, with unequal desirable/undesirable weights. Losses and z0 agree to 1e-5 relative.

TRL estimates z0 per micro-batch (averaged over processes); the script per optimizer step. For one
micro-batch on one process, as here, the two are the same quantity. TRL rotates completions within a
batch to build the mismatched pairs; here the script's own pairing is handed to TRL's collator as
KL_completion_ids, so both sides score the same pairs.

BCO (unpaired) has no implementation in TRL 1.16 (its BCOTrainer was removed from trl.experimental), so it
has no parity test; tests/losses/test_unpaired_losses.py checks it against the paper's formula.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from parity_helpers import accelerator, compiled_module, conversational, rows, tiny_models

pytestmark = pytest.mark.parity
trl = pytest.importorskip("trl")


@pytest.mark.parametrize("beta, desirable_weight, undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.3, 0.8)])
def test_kto_trainer(kb, tiny, tmp_path, beta, desirable_weight, undesirable_weight):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    script = compiled_module(kb, "kto", tmp_path)
    hp = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    args = script.parse_args([f"--{k}={v}" for k, v in hp.items()] + ["--dataset", str(tiny / "data" / "unpaired.jsonl")])
    all_items, _ = script.build_items(args, tokenizer)
    items = all_items[:6] + [i for i in all_items if len(i["completion_ids"]) != len(all_items[0]["completion_ids"])][:2]
    assert len({i["label"] for i in items}) == 2 and len({len(i["completion_ids"]) for i in items}) > 1
    _, reference = tiny_models(tiny, seed=5)
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    # A policy that has learnt the data a little (a few SFT steps on the completions), so that mismatched
    # completions are more likely than under π_ref and z0 > 0 takes part in the comparison.
    policy = copy.deepcopy(reference).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(5):
        optimizer.zero_grad()
        (-script.completion_logps(policy, batch).mean()).backward()
        optimizer.step()
    policy.eval()

    context = {"reference": reference, "accelerator": accelerator()}
    with torch.no_grad():
        context["kl"] = script.estimate_kl(policy, [batch], context)
        loss_sum, metrics = script.compute_loss(policy, batch, args, context)
    assert context["kl"] > 0.01  # the reference point is in play

    data = Dataset.from_list(conversational(rows(tiny, "unpaired.jsonl", 6), ("completion",)))
    config = trl.KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8, **hp)
    trainer = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=config, train_dataset=data, processing_class=tokenizer)
    for index in range(6):  # TRL tokenizes the rows exactly as the script does
        assert list(trainer.train_dataset[index]["prompt_ids"]) == items[index]["prompt_ids"]
        assert list(trainer.train_dataset[index]["completion_ids"]) == items[index]["completion_ids"]
    features = [{"prompt_ids": i["prompt_ids"], "completion_ids": i["completion_ids"], "KL_completion_ids": i["kl_completion_ids"], "label": i["label"]} for i in items]
    with torch.no_grad():
        their_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(features)))
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    assert math.isclose(context["kl"], logged["kl"][-1], rel_tol=1e-5), (context["kl"], logged["kl"][-1])
    assert math.isclose(float(loss_sum) / 8, their_loss, rel_tol=1e-5), (float(loss_sum) / 8, their_loss)
    desirable = sum(i["label"] for i in items)
    assert math.isclose(float(metrics["rewards/desirable"]) / desirable, logged["rewards/chosen"][-1], rel_tol=1e-4)
