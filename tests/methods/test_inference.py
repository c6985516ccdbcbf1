"""Test-time scaling (family `inference`: best-of-n, self-consistency, prm-beam-search).

The tiny model is first warmed up briefly with the generated SFT script on worked solutions of three-term sums
(conftest.tiny_sum_solver), so that it solves the bundled `sums.jsonl` prompts only some of the time. The
generated inference scripts then run on it as subprocesses; their accuracy must grow with the budget, their
selections must agree with an independent recomputation from the saved samples, and two processes must give
exactly the samples of one.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import generated_script, run_script, tiny_args


def run_inference(kb, method: str, tiny: Path, model: Path, workdir: Path, extra: list[str], processes: int = 1, name: str = "run") -> tuple[dict, list[dict]]:
    output = workdir / name
    args = tiny_args(kb, method, tiny) + ["--model_name_or_path", str(model), "--dataset", str(tiny / "data" / "sums.jsonl"), "--output_dir", str(output)]
    args += ["--mixed_precision", "no", "--max_new_tokens", "40"] + extra
    run_script(generated_script(method), args, cwd=workdir, processes=processes)
    summary = json.loads((output / "accuracy.json").read_text())
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    return summary, samples


def by_budget(summary: dict) -> dict[int, dict]:
    return {row["budget"]: row for row in summary["table"]}


def value(answer: str) -> object:
    try:
        return float(answer.replace(",", ""))
    except ValueError:
        return answer


def vote(answers: list) -> object:
    """Majority vote written independently of the script: count equal values (numbers by value), take the
    largest count, break ties by the earliest first occurrence; answers that are None do not vote. Returns
    the first answer string of the winning value."""
    counts: dict = {}
    first: dict = {}
    for position, answer in enumerate(answers):
        if answer is None:
            continue
        counts[value(answer)] = counts.get(value(answer), 0) + 1
        first.setdefault(value(answer), (position, answer))
    if not counts:
        return None
    return first[sorted(counts, key=lambda v: (-counts[v], first[v][0]))[0]][1]


def test_self_consistency_accuracy_grows_with_the_number_of_paths(kb, tiny, tiny_sum_solver, tmp_path):
    summary, records = run_inference(kb, "self-consistency", tiny, tiny_sum_solver, tmp_path, ["--max_prompts", "64", "--num_samples", "16", "--temperature", "1.0", "--top_k", "0"])
    table = by_budget(summary)
    assert sorted(table) == [1, 2, 4, 8, 16]
    accuracy = [table[m]["accuracy"] for m in sorted(table)]
    coverage = [table[m]["coverage"] for m in sorted(table)]
    print("self-consistency accuracy by m:", dict(zip(sorted(table), accuracy)))
    # The tiny model is right sometimes, not always: there is something to gain.
    assert 0.2 < accuracy[0] < 0.8, accuracy
    # Majority voting over 16 paths beats one path by a clear margin, and no larger budget is worse than a
    # smaller one beyond noise (m = 2 equals m = 1 by construction: a tie goes to the first path).
    assert accuracy[-1] >= accuracy[0] + 0.1, accuracy
    assert all(b >= a - 0.03 for a, b in zip(accuracy, accuracy[1:])), accuracy
    # Coverage of nested groups can only grow.
    assert all(b >= a for a, b in zip(coverage, coverage[1:])), coverage
    # The votes recorded in samples.jsonl are the majority of the sampled answers, recomputed here.
    for record in records:
        answers = [s["answer"] for s in record["samples"]]
        assert len(answers) == 16
        for run in record["runs"]:
            m = run["budget"]
            groups = [answers[i : i + m] for i in range(0, 16, m)]
            assert run["answers"] == [vote(group) for group in groups]
            assert run["correct"] == sum(a is not None and value(a) == value(record["reference"]) for a in run["answers"]) / len(groups)
        for s in record["samples"]:
            assert s["correct"] == (s["answer"] is not None and value(s["answer"]) == value(record["reference"]))


def test_best_of_n_with_the_verifier_is_coverage_and_grows(kb, tiny, tiny_sum_solver, tmp_path):
    summary, records = run_inference(kb, "best-of-n", tiny, tiny_sum_solver, tmp_path, ["--max_prompts", "48", "--n", "8"])
    table = by_budget(summary)
    assert sorted(table) == [1, 2, 4, 8]
    accuracy = [table[n]["accuracy"] for n in sorted(table)]
    print("best-of-n (verifier) accuracy by N:", dict(zip(sorted(table), accuracy)))
    assert 0.2 < accuracy[0] < 0.9, accuracy
    assert all(b >= a for a, b in zip(accuracy, accuracy[1:])) and accuracy[-1] >= accuracy[0] + 0.15, accuracy
    for n, row in table.items():
        assert row["accuracy"] == row["coverage"]  # an oracle verifier picks a right answer whenever there is one
    for record in records:
        scores = [s["score"] for s in record["samples"]]
        assert scores == [1.0 if s["correct"] else 0.0 for s in record["samples"]]
        for run in record["runs"]:
            n = run["budget"]
            expected = [start + max(range(n), key=lambda i: (scores[start + i], -i)) for start in range(0, 8, n)]
            assert run["chosen"] == expected


def test_two_processes_sample_exactly_what_one_does(kb, tiny, tiny_sum_solver, tmp_path):
    """Every prompt has its own seed, so sharing the prompts between processes changes nothing."""
    extra = ["--max_prompts", "6", "--num_samples", "4", "--temperature", "1.0"]
    one, one_records = run_inference(kb, "self-consistency", tiny, tiny_sum_solver, tmp_path, extra, name="one")
    two, two_records = run_inference(kb, "self-consistency", tiny, tiny_sum_solver, tmp_path, extra, processes=2, name="two")
    assert one["table"] == two["table"]
    assert one_records == two_records
