"""Rejection-sampling fine-tuning: the loss and the filter of the emitted script against independent computations.

The loss is SFT cross-entropy on the accepted samples (Yuan et al. 2023: no new loss equation):

    L = -(1 / Σ|y|) Σ_(x,y)∈D' Σ_t log π(y_t | x, y_<t)

The emitted `causal_lm_loss` returns the numerator's sum over a micro-batch (the loop divides by the global
token count). It is compared with a float64 Python loop over ragged label masks, in fp32 (tolerance 1e-5
relative) and bf16 logits (the function upcasts to fp32, so the tolerance is that of bf16 inputs: 1e-4
relative to a float64 evaluation of the same bf16 values). The filter (accept, deduplicate, top-k) is
compared with a plain re-implementation of its rules on random samples.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from conftest import generated_script, load_script_module


@pytest.fixture(scope="module")
def rft():
    return load_script_module(generated_script("rejection-sampling-ft"))


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Σ over positions t with labels[t+1] != -100 of -log softmax(logits[t])[labels[t+1]], in float64."""
    total = 0.0
    rows, width, vocab = logits.shape
    values = logits.double().tolist()
    for row in range(rows):
        for t in range(width - 1):
            target = int(labels[row, t + 1])
            if target == -100:
                continue
            scores = values[row][t]
            top = max(scores)
            log_normaliser = top + math.log(sum(math.exp(s - top) for s in scores))
            total += log_normaliser - scores[target]
    return total


def ragged_labels(generator: torch.Generator, rows: int, width: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows, width), generator=generator)
    for row in range(rows):
        prompt = int(torch.randint(1, width // 2, (1,), generator=generator))
        length = int(torch.randint(prompt + 1, width + 1, (1,), generator=generator))
        labels[row, :prompt] = -100  # prompt: no loss
        labels[row, length:] = -100  # right padding
    return labels


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)])
def test_causal_lm_loss_matches_token_cross_entropy(rft, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        rows, width, vocab = 4, 17, 23
        logits = (3 * torch.randn(rows, width, vocab, generator=generator)).to(dtype)
        labels = ragged_labels(generator, rows, width, vocab)
        got = float(rft.causal_lm_loss(logits, labels))
        expected = reference_cross_entropy(logits, labels)
        assert math.isclose(got, expected, rel_tol=tolerance), (got, expected)


def test_collate_counts_trained_tokens_and_masks_the_prompt(rft, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    args = rft.parse_args(["--max_length", "12"])
    items = [rft.training_item([5, 6, 7], [8, 9, 2], args, "a"), rft.training_item([5] * 4, list(range(10, 30)), args, "b")]
    assert items[0] == {"input_ids": [5, 6, 7, 8, 9, 2], "labels": [-100, -100, -100, 8, 9, 2]}
    assert len(items[1]["input_ids"]) == 12 and items[1]["labels"][:4] == [-100] * 4  # cut at max_length
    batch = rft.collate(items, tokenizer, args, torch.device("cpu"))
    assert batch["num_items"] == 3 + 8
    assert batch["attention_mask"].sum().item() == 6 + 12


def independent_selection(samples: list[dict], threshold: float | None, deduplicate: bool, top_k: int) -> list[int]:
    """The filter's rules written out: accepted = correct (verifier) or reward >= threshold, never cut off;
    best score first, earlier first on ties; first of each signature; at most top_k (0 = all)."""
    accepted = []
    for i, s in enumerate(samples):
        ok = (s["score"] == 1.0) if threshold is None else (s["score"] >= threshold)
        if ok and s["end"] != "length":
            accepted.append(i)
    accepted.sort(key=lambda i: (-samples[i]["score"], i))
    if deduplicate:
        kept, signatures = [], []
        for i in accepted:
            signature = tuple(token for token in samples[i]["text"].replace(".", " ").split() if token.lstrip("-").isdigit())
            if signature not in signatures:
                signatures.append(signature)
                kept.append(i)
        accepted = kept
    return accepted if top_k == 0 else accepted[:top_k]


def test_selection_matches_the_rules(rft):
    rng = random.Random(0)
    defaults = rft.parse_args([])
    texts = ["1 plus 2 is 3.", "1 plus 2 is 3.", "2 plus 1 is 3.", "3 plus 0 is 3.", "so 3", "1 plus 1 is 2."]
    for _ in range(1000):
        with_reward = rng.random() < 0.5
        samples = []
        for _ in range(rng.randint(1, 8)):
            score = rng.choice([-1.0, 0.0, 0.5, 2.0]) if with_reward else rng.choice([0.0, 1.0])
            samples.append({"text": rng.choice(texts), "score": score, "end": rng.choice(["eos", "eos", "length"])})
        deduplicate, top_k, threshold = rng.random() < 0.7, rng.choice([0, 1, 2]), rng.choice([-0.5, 0.0, 1.0])
        args = dataclasses.replace(defaults, deduplicate=deduplicate, keep_top_k=top_k, reward_threshold=threshold)
        got = rft.select_samples(samples, args, with_reward)
        assert got == independent_selection(samples, threshold if with_reward else None, deduplicate, top_k)
        assert [s["accepted"] for s in samples] == [
            ((s["score"] >= threshold) if with_reward else (s["score"] == 1.0)) and s["end"] != "length" for s in samples
        ]


def test_reasoning_signature_prefers_calculator_annotations(rft):
    assert rft.reasoning_signature("She has <<3*4=12>>12 and <<12 + 1 = 13>>13 apples.\n#### 13") == ("3*4=12", "12+1=13")
    assert rft.reasoning_signature("1 plus 2 is 3.\n\n3 plus 1 is 4.") == ("1", "2", "3", "3", "1", "4")
    assert rft.reasoning_signature("no numbers") == ()
