"""The bundled tiny datasets: small, deterministic, and built so that each objective can visibly move.

They exist so every emitted script can be run end to end on a CPU in seconds (tests, `make demo`) with no
download. Each generator documents what a model can learn from it:

- chat / instruction / text: fixed, low-entropy mappings (repeat, reverse, templated sentences), so the
  cross-entropy of a random-init model falls fast from about log(vocab).
- preference / unpaired: the chosen completion always uses one set of adjectives and the rejected one
  another, so a policy can raise the chosen log-ratio over the rejected one (reward accuracy -> 1).
- math: one-digit sums with the answer in the prompt's own words, for verifiable-reward RL and test-time scaling.
- steps: step-by-step solutions where a step is labelled wrong when it contains an arithmetic error or follows a
  wrong step (Math-Shepherd-style reachability labels).
- arithmetic_steps: two-step sums of small digits where each step's label is its own arithmetic (half the steps
  wrong, independently), so a process reward model learns to check steps within seconds (see below).
- sums / sum_solutions: three-term sums of the digits 0-2 as prompts with reference answers, and their worked
  two-step solutions as chat. A short SFT on the solutions makes the tiny model right only some of the time,
  which is what test-time scaling (best-of-N, majority vote, PRM beam search) and rejection sampling need;
  steps are written as in arithmetic_steps ("a plus b is s.").
- sum_steps: step labels for those sums with the errors a partly trained solver makes (a wrong sum, a wrong
  operand) and Math-Shepherd-style labels (a step is correct when the solution is still on track), so a PRM
  trained on it ranks the solver's partial solutions for PRM-guided beam search.
- successor: "What is a plus 1?" with a one-token answer, for RL learning tests. The answer depends on one
  prompt token, which the tiny model can learn (a + b cannot be learnt in a CPU-test budget); the
  policy-gradient tests warm-start the model on a noisy version (half the answers random) so sampling is
  right about half the time while the most likely answer is right, and reward can then visibly rise.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "elk", "ant", "yak", "bat", "eel"]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey", "black", "white"]
GOOD = ["kind", "calm", "gentle", "helpful", "honest", "clear"]
BAD = ["rude", "loud", "lazy", "vague", "wrong", "mean"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SYSTEM = "You are a concise assistant."


def _words(rng: random.Random, n: int) -> str:
    pool = ANIMALS + COLOURS
    return " ".join(rng.choice(pool) for _ in range(n))


def chat_rows(n: int = 256, seed: int = 0) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(n):
        words = _words(rng, rng.randint(2, 5))
        messages = []
        if i % 4 == 0:
            messages.append({"role": "system", "content": SYSTEM})
        messages += [
            {"role": "user", "content": f"Repeat after me: {words}"},
            {"role": "assistant", "content": words},
        ]
        if i % 3 == 0:  # a second turn, so multi-turn masking is exercised
            more = _words(rng, rng.randint(2, 4))
            messages += [
                {"role": "user", "content": f"Now reverse: {more}"},
                {"role": "assistant", "content": " ".join(reversed(more.split()))},
            ]
        yield {"messages": messages}


def instruction_rows(n: int = 256, seed: int = 1) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(n):
        words = _words(rng, rng.randint(2, 5))
        if i % 2:
            yield {"instruction": "Reverse the order of the words.", "input": words, "output": " ".join(reversed(words.split()))}
        else:
            yield {"instruction": "Repeat the words exactly.", "input": words, "output": words}


def text_rows(n: int = 256, seed: int = 2) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            a, c = rng.choice(ANIMALS), rng.choice(COLOURS)
            sentences.append(f"The {c} {a} sleeps. The {a} is {c}.")
        yield {"text": " ".join(sentences)}


def preference_rows(n: int = 256, seed: int = 3) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(n):
        animal = rng.choice(ANIMALS)
        good, bad = rng.choice(GOOD), rng.choice(BAD)
        question = f"Describe the {animal}."
        # Half the prompts are plain strings, half are message lists: the scripts accept both.
        prompt: Any = question if i % 2 else [{"role": "user", "content": question}]
        yield {"prompt": prompt, "chosen": f"The {animal} is {good}.", "rejected": f"The {animal} is {bad}."}


def unpaired_rows(n: int = 256, seed: int = 4) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(n):
        animal = rng.choice(ANIMALS)
        desirable = i % 2 == 0
        adjective = rng.choice(GOOD if desirable else BAD)
        yield {"prompt": f"Describe the {animal}.", "completion": f"The {animal} is {adjective}.", "label": desirable}


def math_rows(n: int = 256, seed: int = 5) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        yield {"prompt": f"What is {a} plus {b}? Answer with a digit.", "answer": str(a + b)}


def step_rows(n: int = 256, seed: int = 6) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for _ in range(n):
        a, b, c = rng.randint(0, 4), rng.randint(0, 4), rng.randint(0, 4)
        first, total = a + b, a + b + c
        steps, labels = [], []
        wrong_at = rng.choice([None, 0, 1])
        shown_first = first + (1 if wrong_at == 0 else 0)
        steps.append(f"{a} plus {b} is {shown_first}.")
        labels.append(wrong_at != 0)
        shown_total = shown_first + c + (1 if wrong_at == 1 else 0)
        steps.append(f"{shown_first} plus {c} is {shown_total}.")
        labels.append(wrong_at is None and shown_total == total)
        yield {"prompt": f"What is {a} plus {b} plus {c}?", "steps": steps, "labels": labels}


def arithmetic_step_rows(n: int = 256, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Process-reward data the embedded model can learn from in a few hundred steps.

    Each row sums three digits 0-2 in two steps ("a plus b is s.", then "s plus c is t."); every step is
    independently right or wrong with probability 1/2, a wrong result overshooting the true sum by 1 or 2.
    The second step adds to the first step's shown result, so its label is exactly whether its own
    arithmetic holds. Unlike steps.jsonl (digits 0-4, where a step after a wrong one is also labelled wrong
    and the base rates differ by position), neither the position nor the previous label predicts a label:
    the model has to check the sum.
    """
    rng = random.Random(seed)
    for _ in range(n):
        a, b, c = rng.randint(0, 2), rng.randint(0, 2), rng.randint(0, 2)
        steps, labels, left = [], [], a
        for right in (b, c):
            total = left + right
            correct = rng.random() < 0.5
            shown = total if correct else total + rng.choice([1, 2])
            steps.append(f"{left} plus {right} is {shown}.")
            labels.append(correct)
            left = shown
        yield {"prompt": f"What is {a} plus {b} plus {c}?", "steps": steps, "labels": labels}


def _sum_terms(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(0, 2), rng.randint(0, 2), rng.randint(0, 2)


def sum_rows(n: int = 256, seed: int = 9) -> Iterator[dict[str, Any]]:
    """Prompts "What is a plus b plus c?" with the sum as the reference answer (format: prompt)."""
    rng = random.Random(seed)
    for _ in range(n):
        a, b, c = _sum_terms(rng)
        yield {"prompt": f"What is {a} plus {b} plus {c}?", "answer": str(a + b + c)}


def sum_solution_rows(n: int = 256, seed: int = 10) -> Iterator[dict[str, Any]]:
    """The same kind of sums solved in two steps separated by a blank line, always correctly (format: chat)."""
    rng = random.Random(seed)
    for _ in range(n):
        a, b, c = _sum_terms(rng)
        solution = f"{a} plus {b} is {a + b}.\n\n{a + b} plus {c} is {a + b + c}."
        yield {"messages": [{"role": "user", "content": f"What is {a} plus {b} plus {c}?"}, {"role": "assistant", "content": solution}]}


def sum_step_rows(n: int = 1024, seed: int = 11) -> Iterator[dict[str, Any]]:
    """Process labels for the two-step solutions of sum_rows, with the errors a partly trained solver makes.

    Each step is right with probability 2/3; otherwise it has a wrong sum (off by 1 or 2) or a wrong operand
    (step 1: a number that is not in the question; step 2: not the result of step 1, or not the third
    number). A step is labelled correct when it and every step before it are right (the solution is still
    on track, as Math-Shepherd's labels say), so a PRM's score at the last step of a prefix estimates whether
    the prefix can still end in the right answer: what beam search ranks prefixes by.
    """
    rng = random.Random(seed)

    def off(value: int) -> int:
        return rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2) if v >= 0])

    def other(digit: int) -> int:
        return rng.choice([d for d in range(3) if d != digit])

    def kind() -> str:
        return "right" if rng.random() < 2 / 3 else rng.choice(["sum", "operand"])

    for _ in range(n):
        a, b, c = _sum_terms(rng)
        first = kind()
        x, y = a, b
        if first == "operand":
            x, y = (other(a), b) if rng.random() < 0.5 else (a, other(b))
        s = x + y if first != "sum" else off(x + y)
        second = kind()
        left, right = s, c
        if second == "operand":
            left, right = (off(s), c) if rng.random() < 0.5 else (s, other(c))
        t = left + right if second != "sum" else off(left + right)
        steps = [f"{x} plus {y} is {s}.", f"{left} plus {right} is {t}."]
        labels = [first == "right", first == "right" and second == "right"]
        yield {"prompt": f"What is {a} plus {b} plus {c}?", "steps": steps, "labels": labels}


def successor_rows(n: int = 256, seed: int = 7) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for _ in range(n):
        a = rng.randint(0, 8)
        yield {"prompt": f"What is {a} plus 1? Answer with a digit.", "answer": str(a + 1)}


GENERATORS = {
    "chat.jsonl": chat_rows,
    "instruction.jsonl": instruction_rows,
    "text.jsonl": text_rows,
    "preference.jsonl": preference_rows,
    "unpaired.jsonl": unpaired_rows,
    "math.jsonl": math_rows,
    "steps.jsonl": step_rows,
}

EXTRA_GENERATORS = {
    "arithmetic_steps.jsonl": arithmetic_step_rows,
    "successor.jsonl": successor_rows,
    "sums.jsonl": sum_rows,
    "sum_solutions.jsonl": sum_solution_rows,
    "sum_steps.jsonl": sum_step_rows,
}
"""Datasets added after the bundled tokenizer was trained: written like the others, but kept out of corpus() so
tools/build_tiny_tokenizer.py still rebuilds the shipped tokenizer exactly."""


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, generator in {**GENERATORS, **EXTRA_GENERATORS}.items():
        path = directory / name
        with path.open("w", encoding="utf-8") as handle:
            for row in generator():
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def corpus() -> Iterator[str]:
    """All text of the tiny datasets (used once to train the tiny tokenizer)."""
    for generator in GENERATORS.values():
        for row in generator():
            yield json.dumps(row)
