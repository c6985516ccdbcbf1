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


@pytest.mark.parametrize(
    "text, answer",
    [
        ("1 plus 2 is 3.\n\n3 plus 1 is 4.", "4"),
        ("so the total is $1,234.50.", "1234.5"),
        ("The answer is \\boxed{\\frac{1}{2}} and 7", "\\frac{1}{2}"),
        ("She pays 3 + 4 = 7 dollars.\n#### 7", "7"),
        ("no digits here", None),
        ("-0.0", "0"),
    ],
)
def test_answer_extraction(self_consistency, text, answer):
    assert self_consistency.extract_answer(text) == answer


def test_sampling_cuts_at_the_end_or_the_step_delimiter(best_of_n, tiny):
    """sample(): a reply ends at its first end-of-turn token (kept), a step at the first complete delimiter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    args = best_of_n.parse_args(["--temperature", "1.0"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 plus 2 plus 1?"}], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    for candidate in best_of_n.sample(model, tokenizer, list(prompt), 32, args, 24):
        ids = candidate["ids"]
        assert len(ids) <= 24
        if candidate["end"] == "eos":
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        else:
            assert candidate["end"] == "length" and len(ids) == 24 and tokenizer.eos_token_id not in ids
    torch.manual_seed(0)
    ends = set()
    for candidate in best_of_n.sample(model, tokenizer, list(prompt), 64, args, 24, stop=" is"):
        ends.add(candidate["end"])
        text = tokenizer.decode(candidate["ids"])
        if candidate["end"] == "stop":
            assert " is" in text and " is" not in tokenizer.decode(candidate["ids"][:-1])  # the shortest prefix holding it
        else:
            assert " is" not in text
    assert "stop" in ends
