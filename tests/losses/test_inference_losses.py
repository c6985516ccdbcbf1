"""The selection rules of the test-time scaling scripts against independent computations.

Test-time scaling has no loss: its "objective" is the rule that turns candidates into an answer. Each rule is
taken from a compiled script (the code users run) and compared on random inputs with a plain-Python evaluation
written here from the papers' formulas:

- self-consistency: â = argmax_a Σ_i 1(a_i = a)                      (Wang et al. 2022, Sec. 2)
- best-of-N:        ŷ = y_argmax_i r(x, y_i)                        (Nakano et al. 2021)
- PRM beam search:  keep the top N/M prefixes by PRM score; â = argmax_a Σ_j 1(a_j = a) v(x, y_j) with
                    v = the last step's score, or min / product of the step scores (Snell et al. 2024, Sec. 5)
Ties are broken towards the earlier candidate (the papers leave them arbitrary). Exact equality is required:
these are discrete choices.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import generated_script, load_script_module


@pytest.fixture(scope="module")
def self_consistency():
    return load_script_module(generated_script("self-consistency"))


@pytest.fixture(scope="module")
def best_of_n():
    return load_script_module(generated_script("best-of-n"))


@pytest.fixture(scope="module")
def beam():
    return load_script_module(generated_script("prm-beam-search"))


def random_answers(rng: random.Random, n: int) -> list:
    # Few distinct values so that ties and real majorities both occur; None = no parsable answer.
    return [rng.choice(["1", "2", "3", "4", None]) for _ in range(n)]


def test_majority_vote(self_consistency):
    rng = random.Random(0)
    for _ in range(2000):
        answers = random_answers(rng, rng.randint(1, 12))
        counts = {}
        for answer in answers:
            if answer is not None:
                counts[answer] = counts.get(answer, 0) + 1
        if not counts:
            expected = None
        else:
            top = max(counts.values())
            expected = [a for a in answers if a is not None and counts[a] == top][0]
        assert self_consistency.majority_vote(answers) == expected, answers


def test_best_of_n_selection(best_of_n):
    rng = random.Random(1)
    for _ in range(2000):
        n = rng.randint(1, 16)
        scores = [rng.choice([0.0, 0.5, 1.0, rng.gauss(0, 1)]) for _ in range(n)]
        best = 0
        for i in range(1, n):
            if scores[i] > scores[best]:
                best = i
        assert best_of_n.best_of_n_select(scores) == best, scores


def test_weighted_vote(beam):
    rng = random.Random(2)
    for _ in range(2000):
        n = rng.randint(1, 12)
        answers = random_answers(rng, n)
        scores = [rng.choice([0.25, 0.5, 1.0, rng.random()]) for _ in range(n)]
        totals, order = {}, []
        for answer, score in zip(answers, scores):
            if answer is None:
                continue
            if answer not in totals:
                order.append(answer)
                totals[answer] = 0.0
            totals[answer] += score
        expected = None
        for answer in order:
            if expected is None or totals[answer] > totals[expected]:
                expected = answer
        assert beam.weighted_vote(answers, scores) == expected, (answers, scores)


def test_step_score_aggregation_and_top_k(beam):
    rng = random.Random(3)
    for _ in range(500):
        steps = [rng.random() for _ in range(rng.randint(1, 6))]
        assert beam.aggregate_step_scores(steps, "last") == steps[-1]
        assert beam.aggregate_step_scores(steps, "min") == min(steps)
        product = 1.0
        for value in steps:
            product *= value
        assert math.isclose(beam.aggregate_step_scores(steps, "prod"), product, rel_tol=1e-12)
    assert beam.aggregate_step_scores([], "last") == 0.0
    for _ in range(500):
        scores = [rng.choice([0.1, 0.2, rng.random()]) for _ in range(rng.randint(1, 12))]
        k = rng.randint(1, len(scores))
        remaining, expected = list(range(len(scores))), []
        for _ in range(k):
            pick = remaining[0]
            for i in remaining[1:]:
                if scores[i] > scores[pick]:
                    pick = i
            expected.append(pick)
            remaining.remove(pick)
        assert beam.top_indices(scores, k) == expected, scores


def test_step_splitting(beam):
    assert beam.split_steps("1 plus 2 is 3.\n\n3 plus 1 is 4.", "\n\n") == ["1 plus 2 is 3.", "3 plus 1 is 4."]
    assert beam.split_steps("1 plus 2 is 3.\n\n", "\n\n") == ["1 plus 2 is 3."]
    assert beam.split_steps("\n\n\n\n", "\n\n") == []


def test_votes_compare_answers_by_value(self_consistency, beam):
    # 3.50 and 7/2 are one answer (two votes) against 4 (two votes): the tie goes to the first sampled.
    assert self_consistency.majority_vote(["3.50", "4", "7/2", "4"]) == "3.50"
    assert self_consistency.majority_vote(["4", "3.50", "7/2", "4", "\\frac{7}{2}"]) == "3.50"
    assert beam.weighted_vote(["3.50", "4", "7/2"], [0.3, 0.5, 0.3]) == "3.50"
    assert beam.weighted_vote(["3.50", "4", "7/2"], [0.2, 0.5, 0.2]) == "4"


def test_top_k_sampling_draws_only_from_the_k_most_likely_tokens(self_consistency):
    """The Gumbel-max sampler with top_k: the argmax of its output is always one of the k largest logits,
    and over many rows every one of them is drawn."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 50, generator=generator).repeat(4000, 1)
    seeds = torch.tensor([self_consistency.stream_seed(7, row) & ((1 << 63) - 1) for row in range(4000)])
    for k in (1, 3, 10):
        sampler = self_consistency.SeededSampler(seeds, 0, 1.0, 1.0, k)
        drawn = sampler(torch.zeros(4000, 1, dtype=torch.long), scores.clone()).argmax(-1)
        allowed = set(torch.topk(scores[0], k).indices.tolist())
        assert set(drawn.tolist()) == allowed


def test_sample_candidates_cut_at_the_end_or_the_step_delimiter(best_of_n, tiny):
    """A reply ends at its first end-of-turn token (kept), a step right after the first complete delimiter;
    the same key gives the same samples whatever else is in the batch."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    accelerator = Accelerator(cpu=True)
    args = best_of_n.parse_args(["--temperature", "1.0"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 plus 2 plus 1?"}], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    candidates = best_of_n.sample_candidates(model, tokenizer, [prompt], 32, args, accelerator, (0,), 24)
    for candidate in candidates:
        ids = candidate["ids"]
        if candidate["end"] == "eos":
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1] and len(ids) <= 24
        else:
            assert candidate["end"] == "length" and len(ids) == 24 and tokenizer.eos_token_id not in ids
    ends = set()
    for candidate in best_of_n.sample_candidates(model, tokenizer, [prompt], 64, args, accelerator, (1,), 24, stop=" is"):
        ends.add(candidate["end"])
        decoded = tokenizer.decode(candidate["ids"])
        if candidate["end"] == "stop":
            assert " is" in decoded and " is" not in tokenizer.decode(candidate["ids"][:-1])  # the shortest prefix holding it
        else:
            assert " is" not in decoded
    assert "stop" in ends
    # Batch invariance: prefix 0 of a two-prefix batch samples what it samples alone.
    other = tokenizer("What", add_special_tokens=False)["input_ids"]
    together = best_of_n.sample_candidates(model, tokenizer, [prompt, prompt + other], 4, args, accelerator, (2,), 12)
    alone = best_of_n.sample_candidates(model, tokenizer, [prompt], 4, args, accelerator, (2,), 12)
    assert [c["ids"] for c in together[:4]] == [c["ids"] for c in alone]
