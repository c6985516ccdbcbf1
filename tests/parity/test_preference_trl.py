"""Parity of the preference zoo with TRL 1.16: the same tiny policy, reference and token ids through TRL's
own trainers (DPOTrainer, and the experimental CPOTrainer and ORPOTrainer) and through the emitted scripts'
compute_loss. Losses agree to 1e-5 relative (float32, different kernels and summation orders).

What TRL 1.16 offers, and how each method is compared:
- DPOTrainer loss types sigmoid (DPO, Step-DPO), ipo, robust, nca_pair, sppo_hard, apo_zero, apo_down,
  bco_pair: same loss. bco_pair in TRL 1.16 has no reward shift, so BCO is compared with δ = 0.
- CPOTrainer: sigmoid with cpo_alpha (CPO; NLL term compared on equally long chosen completions, where
  TRL's batch token mean equals our per-pair token mean; on ragged ones the preference term alone), simpo
  with cpo_alpha = 0 (SimPO), hinge with β = 1/δ and cpo_alpha = 0 (SLiC's calibration term, λ = 0), and
  sigmoid with label_smoothing and cpo_alpha = 0 (cDPO's smoothed loss on a zero reference: TRL 1.16's
  DPOTrainer ignores label_smoothing for sigmoid).
- ORPOTrainer: whole loss on equally long chosen completions; on ragged ones the odds-ratio term and TRL's
  NLL form (a batch token mean) separately.
- No TRL 1.16 implementation: R-DPO (ld_alpha is LD-DPO, a different length treatment).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from parity_helpers import accelerator, compiled_module, conversational, rows, tiny_models

pytestmark = pytest.mark.parity
trl = pytest.importorskip("trl")

# method -> (TRL DPOTrainer loss_type, hyperparameters for both sides)
DPO_CASES = {
    "dpo": ("sigmoid", {"beta": 0.1}),
    "step-dpo": ("sigmoid", {"beta": 0.5}),
    "ipo": ("ipo", {"beta": 0.5}),
    "robust-dpo": ("robust", {"beta": 0.1, "label_smoothing": 0.2}),
    "nca": ("nca_pair", {"beta": 0.1}),
    "sppo-hard": ("sppo_hard", {"beta": 0.1}),
    "apo-zero": ("apo_zero", {"beta": 0.2}),
    "apo-down": ("apo_down", {"beta": 0.2}),
    "bco-pair": ("bco_pair", {"beta": 0.1}),
}


@pytest.fixture(scope="module")
def models(tiny):
    return tiny_models(tiny, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny / "model")


def encoded(kb, method, tiny, tmp_path, tokenizer, hp, extra=()):
    script = compiled_module(kb, method, tmp_path)
    flags = [f"--{k}={v}" for k, v in hp.items()] + ["--dataset", str(tiny / "data" / "preference.jsonl"), *extra]
    if method == "step-dpo":
        flags += ["--initial_steps_column", ""]
    args = script.parse_args(flags)
    items, skipped = script.build_items(args, tokenizer)
    assert not skipped
    return script, args, items


def ours(script, args, items, tokenizer, policy, reference, state=None):
    context = {"reference": reference, "accelerator": accelerator(), "state": state or {"reward_shift": 0.0, "reward_count": 0.0}}
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        loss_sum, metrics = script.compute_loss(policy, batch, args, context)
    return float(loss_sum) / len(items), {k: float(v) / len(items) for k, v in metrics.items()}


def equal_length(items: list[dict], n: int = 8) -> list[dict]:
    """n items whose chosen completions have the same number of tokens (and ragged rejected ones)."""
    lengths = [len(i["chosen_ids"]) for i in items]
    common = max(set(lengths), key=lengths.count)
    chosen = [i for i in items if len(i["chosen_ids"]) == common][:n]
    assert len(chosen) == n
    return chosen


def test_tokenization_matches_trl(kb, tiny, tmp_path, tokenizer, models):
    """The scripts encode a conversational row exactly as DPOTrainer does (prompt with the generation prompt,
    completion = the rest of the rendered conversation)."""
    from datasets import Dataset

    script, args, items = encoded(kb, "dpo", tiny, tmp_path, tokenizer, {"beta": 0.1})
    policy, reference = models
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8)
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=config, train_dataset=Dataset.from_list(conversational(rows(tiny, "preference.jsonl", 16), ("chosen", "rejected"))), processing_class=tokenizer)
    for index in range(16):
        theirs = trainer.train_dataset[index]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert list(theirs[key]) == items[index][key], (index, key)


@pytest.mark.parametrize("method", sorted(DPO_CASES))
def test_dpo_trainer_loss_types(kb, tiny, tmp_path, tokenizer, models, method):
    from datasets import Dataset

    loss_type, hp = DPO_CASES[method]
    script, args, items = encoded(kb, method, tiny, tmp_path, tokenizer, hp)
    items = items[:8]
    assert len({len(i["chosen_ids"]) for i in items}) > 1  # ragged completions
    policy, reference = models
    our_loss, our_metrics = ours(script, args, items, tokenizer, policy, reference)
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8, **hp)
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=config, train_dataset=Dataset.from_list(conversational(rows(tiny, "preference.jsonl", 8), ("chosen", "rejected"))), processing_class=tokenizer)
    batch = trainer.data_collator([{k: i[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in items])
    with torch.no_grad():
        their_loss = float(trainer.compute_loss(trainer.model, batch))
    assert math.isclose(our_loss, their_loss, rel_tol=1e-5, abs_tol=1e-6), (method, our_loss, their_loss)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    assert math.isclose(our_metrics["rewards/margin"], logged["rewards/margins"][-1], rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(our_metrics["logps/chosen"], logged["logps/chosen"][-1], rel_tol=1e-5)


def test_bco_pair_parity_holds_at_zero_shift_only(kb, tiny, tmp_path, tokenizer, models):
    """TRL 1.16's bco_pair has no reward shift; ours does, so the parity above is at δ = 0 (the value before
    the first update) and a nonzero δ changes the loss."""
    script, args, items = encoded(kb, "bco-pair", tiny, tmp_path, tokenizer, {"beta": 0.1})
    policy, reference = models
    shifted, _ = ours(script, args, items[:8], tokenizer, policy, reference, state={"reward_shift": 0.3, "reward_count": 16.0})
    plain, _ = ours(script, args, items[:8], tokenizer, policy, reference)
    assert abs(shifted - plain) > 1e-3


def cpo_like_trainer(cls, config_cls, tiny, tmp_path, tokenizer, policy, **config):
    from datasets import Dataset

    text_rows = [dict(r, prompt=r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"]) for r in rows(tiny, "preference.jsonl", 8)]
    args = config_cls(output_dir=str(tmp_path / cls.__name__), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8, **config)
    return cls(model=copy.deepcopy(policy), args=args, train_dataset=Dataset.from_list(text_rows), processing_class=tokenizer)


def trl_features(items: list[dict]) -> list[dict]:
    """Our encoded pairs in the tokenized form TRL's CPO/ORPO collator pads (labels -100 on the prompt)."""
    features = []
    for item in items:
        feature = {}
        for side in ("chosen", "rejected"):
            ids = item["prompt_ids"] + item[f"{side}_ids"]
            feature[f"{side}_input_ids"] = ids
            feature[f"{side}_attention_mask"] = [1] * len(ids)
            feature[f"{side}_labels"] = [-100] * len(item["prompt_ids"]) + item[f"{side}_ids"]
        features.append(feature)
    return features


CPO_CASES = {
    # name: (our method, our hyperparameters, CPOConfig arguments, equal-length chosen completions?)
    "cpo": ("cpo", {"beta": 0.1, "cpo_alpha": 1.0}, {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0}, True),
    "cpo-preference-term-ragged": ("cpo", {"beta": 0.1, "cpo_alpha": 0.0}, {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 0.0}, False),
    "simpo": ("simpo", {"beta": 2.5, "simpo_gamma": 1.375}, {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.375, "cpo_alpha": 0.0}, False),
    "slic-calibration": ("slic", {"delta": 2.0, "regularization_weight": 0.0}, {"loss_type": "hinge", "beta": 0.5, "cpo_alpha": 0.0}, False),
}


@pytest.mark.parametrize("case", sorted(CPO_CASES))
def test_cpo_trainer(kb, tiny, tmp_path, tokenizer, models, case):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    method, hp, config, equal = CPO_CASES[case]
    script, args, items = encoded(kb, method, tiny, tmp_path, tokenizer, hp)
    items = equal_length(items) if equal else items[:8]
    policy, _ = models
    our_loss, _ = ours(script, args, items, tokenizer, policy, None)
    trainer = cpo_like_trainer(CPOTrainer, CPOConfig, tiny, tmp_path, tokenizer, policy, **config)
    with torch.no_grad():
        their_loss, _ = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(trl_features(items)))
    if method == "slic":
        their_loss = their_loss * hp["delta"]  # TRL's hinge is max(0, 1 - β·Δ) = max(0, δ - Δ)/δ with β = 1/δ
    assert math.isclose(our_loss, float(their_loss), rel_tol=1e-5, abs_tol=1e-6), (case, our_loss, float(their_loss))


def test_cdpo_smoothing_matches_trl_on_a_zero_reference(kb, tiny, tmp_path, tokenizer, models):
    """cdpo_loss with π_ref ≡ 1 (zero reference log-probs) is CPOTrainer's sigmoid loss with label_smoothing."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    script, args, items = encoded(kb, "cdpo", tiny, tmp_path, tokenizer, {"beta": 0.1, "label_smoothing": 0.2})
    items = items[:8]
    policy, _ = models
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        logps, _ = script.completion_logps(policy, batch)
        zeros = torch.zeros(len(items))
        losses, _, _ = script.cdpo_loss(logps[:8], logps[8:], zeros, zeros, beta=0.1, label_smoothing=0.2)
    trainer = cpo_like_trainer(CPOTrainer, CPOConfig, tiny, tmp_path, tokenizer, policy, loss_type="sigmoid", beta=0.1, label_smoothing=0.2, cpo_alpha=0.0)
    with torch.no_grad():
        their_loss, _ = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(trl_features(items)))
    assert math.isclose(float(losses.mean()), float(their_loss), rel_tol=1e-5)


def test_orpo_trainer(kb, tiny, tmp_path, tokenizer, models):
    """The odds-ratio term agrees with TRL's; the NLL term differs by design: TRL (like the authors' code
    unless --disable_prompt_loss) averages the NLL over the prompt and response tokens of the micro-batch,
    the script over each chosen response's tokens, as the paper's SFT term does. Both compositions are
    checked: TRL's loss = its NLL - λ·mean log σ(log odds ratio), ours = mean response NLL - λ·(the same)."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    script, args, items = encoded(kb, "orpo", tiny, tmp_path, tokenizer, {"beta": 0.1})
    items = items[:8]
    assert len({len(i["chosen_ids"]) for i in items}) > 1
    policy, _ = models
    trainer = cpo_like_trainer(ORPOTrainer, ORPOConfig, tiny, tmp_path, tokenizer, policy, beta=0.1)
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        their_loss, metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(trl_features(items)))
        logps, tokens = script.completion_logps(policy, batch)
        odds_losses, _, _ = script.orpo_loss(logps[:8], logps[8:], tokens[:8], tokens[8:], torch.zeros(8), beta=1.0)
        our_loss, _ = ours(script, args, items, tokenizer, policy, None)
        # TRL's NLL, independently: next-token cross-entropy over every attended token of the chosen rows.
        chosen = batch["input_ids"][:8]
        attended = batch["attention_mask"][:8, 1:].bool()
        token_nll = torch.nn.functional.cross_entropy(policy(input_ids=chosen, attention_mask=batch["attention_mask"][:8]).logits[:, :-1].transpose(1, 2), chosen[:, 1:], reduction="none")
    log_odds_term = -float(odds_losses.mean())  # mean log σ(log odds ratio)
    assert math.isclose(log_odds_term, float(metrics["log_odds_ratio"]), rel_tol=1e-5)
    assert math.isclose(float(metrics["nll_loss"]), float(token_nll[attended].mean()), rel_tol=1e-5)
    assert math.isclose(float(their_loss), float(metrics["nll_loss"]) - 0.1 * log_odds_term, rel_tol=1e-5)
    response_nll = float((-logps[:8] / tokens[:8]).mean())
    assert math.isclose(our_loss, response_nll - 0.1 * log_odds_term, rel_tol=1e-5)
    assert abs(response_nll - float(metrics["nll_loss"])) > 1e-3  # the documented difference is real
