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

from conftest import FAST, generated_script, run_script, tiny_args


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


def prm_step_scores(prm_dir: Path, prompt: list[dict], steps: list[str]) -> list[float]:
    """The PRM's score of every step, computed here by following its ptcompile_scorer.json by hand."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    card = json.loads((prm_dir / "ptcompile_scorer.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(prm_dir)
    model = AutoModelForTokenClassification.from_pretrained(prm_dir, num_labels=card["num_labels"]).eval()
    ids = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids = ids + tokenizer(step, add_special_tokens=False)["input_ids"] + card["separator_ids"]
        ends.append(len(ids) - 1)
    with torch.no_grad():
        probabilities = model(torch.tensor([ids])).logits[0].softmax(-1)[:, card["correct_class"]]
    return [float(probabilities[end]) for end in ends]


def untrained_prm(trained: Path, tiny: Path, directory: Path) -> Path:
    """A PRM with the trained one's scorer card but a random, untrained head on the raw tiny model: the
    control that shows what the trained PRM's scores add."""
    import shutil

    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(tiny / "model", num_labels=2)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(trained).save_pretrained(directory)
    shutil.copy(trained / "ptcompile_scorer.json", directory / "ptcompile_scorer.json")
    return directory


def test_prm_beam_search_accuracy_grows_with_the_number_of_beams(kb, tiny, tiny_sum_solver, tiny_sum_prm, tmp_path):
    common = ["--max_prompts", "96", "--temperature", "1.0"]
    search = common + ["--num_beams", "8", "--beam_width", "2", "--sweep", "2,4"]
    # One beam of width 1 is plain sampling of one solution: the baseline.
    single, _ = run_inference(kb, "prm-beam-search", tiny, tiny_sum_solver, tmp_path, common + ["--prm_path", str(tiny_sum_prm), "--num_beams", "1", "--beam_width", "1"], name="single")
    summary, records = run_inference(kb, "prm-beam-search", tiny, tiny_sum_solver, tmp_path, search + ["--prm_path", str(tiny_sum_prm)], name="beams")
    # The PRM's ranking on its own (the single best-scored candidate), against an untrained PRM.
    best, _ = run_inference(kb, "prm-beam-search", tiny, tiny_sum_solver, tmp_path, search + ["--prm_path", str(tiny_sum_prm), "--answer_aggregation", "best"], name="best")
    control = untrained_prm(tiny_sum_prm, tiny, tmp_path / "untrained-prm")
    best_control, _ = run_inference(kb, "prm-beam-search", tiny, tiny_sum_solver, tmp_path, search + ["--prm_path", str(control), "--answer_aggregation", "best"], name="best-control")
    baseline = by_budget(single)[1]["accuracy"]
    accuracy = [by_budget(summary)[n]["accuracy"] for n in (2, 4, 8)]
    trained_best, control_best = by_budget(best)[8]["accuracy"], by_budget(best_control)[8]["accuracy"]
    print(f"PRM beam search: one sample {baseline:.3f}; weighted N = 2, 4, 8 (width 2): {accuracy}; best-scored at N = 8: trained PRM {trained_best:.3f}, untrained {control_best:.3f}")
    assert 0.2 < baseline < 0.8, baseline
    assert all(b >= a - 0.04 for a, b in zip(accuracy, accuracy[1:])), accuracy
    assert accuracy[-1] >= baseline + 0.15, (baseline, accuracy)
    assert trained_best >= control_best + 0.1, (trained_best, control_best)

    # The saved search results agree with an independent reading: steps are the text split at the blank
    # line, scores are the PRM's (recomputed from its scorer card) at the last step, candidates come best
    # first, and the answer is the score-weighted vote.
    delimiter = "\n\n"
    for record in records[:12]:
        for run in record["runs"]:
            candidates = run["candidates"]
            assert 1 <= len(candidates) <= run["budget"]
            scores = [c["score"] for c in candidates]
            assert scores == sorted(scores, reverse=True)
            totals: dict = {}
            for c in candidates:
                assert c["steps"] == [part.strip() for part in c["text"].split(delimiter) if part.strip()]
                assert c["score"] == (c["step_scores"][-1] if c["step_scores"] else 0.0)
                if c["steps"]:
                    recomputed = prm_step_scores(tiny_sum_prm, record["prompt"], c["steps"])
                    assert all(abs(a - b) < 1e-5 for a, b in zip(recomputed, c["step_scores"])), (recomputed, c["step_scores"])
                if c["answer"] is not None:
                    totals.setdefault(value(c["answer"]), [0.0, c["answer"]])[0] += c["score"]
            if totals:
                best = max(t[0] for t in totals.values())
                assert value(run["answer"]) in [v for v, t in totals.items() if t[0] == best]


def sum_preferences(path: Path) -> Path:
    """Preference pairs for an outcome reward model on the sums, built from the bundled step-labelled data:
    chosen = the right two-step solution, rejected = a solution of the same prompt with a wrong step."""
    from ptcompile.tiny_data import sum_step_rows

    with path.open("w") as handle:
        for row in sum_step_rows():
            if all(row["labels"]):
                continue
            a, b, c = (int(word) for word in row["prompt"].rstrip("?").split() if word.isdigit())
            chosen = f"{a} plus {b} is {a + b}.\n\n{a + b} plus {c} is {a + b + c}."
            handle.write(json.dumps({"prompt": row["prompt"], "chosen": chosen, "rejected": "\n\n".join(row["steps"])}) + "\n")
    return path


def reward_scores(rm_dir: Path, prompt: list[dict], responses: list[str]) -> list[float]:
    """Rewards computed here by following the reward model's ptcompile_scorer.json by hand."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    card = json.loads((rm_dir / "ptcompile_scorer.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=card["num_labels"]).eval()
    scores = []
    for response in responses:
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        with torch.no_grad():
            scores.append(float(model(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])).logits[0, 0]))
    return scores


def test_best_of_n_with_a_reward_model_beats_one_sample(kb, tiny, tiny_sum_solver, tmp_path):
    # An outcome reward model trained (by the generated reward-model script) from the solver itself.
    preferences = sum_preferences(tmp_path / "sum_preferences.jsonl")
    flags = tiny_args(kb, "reward-model", tiny) + FAST + ["--model_name_or_path", str(tiny_sum_solver), "--dataset", str(preferences), "--output_dir", str(tmp_path / "rm")]
    flags += ["--max_steps", "300", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16", "--num_train_epochs", "100", "--warmup_ratio", "0.05", "--lr_scheduler_type", "cosine"]
    run_script(generated_script("reward-model"), flags, cwd=tmp_path)
    reward_model = tmp_path / "rm" / "final"
    common = ["--max_prompts", "256", "--n", "8", "--temperature", "1.0"]
    summary, records = run_inference(kb, "best-of-n", tiny, tiny_sum_solver, tmp_path, common + ["--reward_model_path", str(reward_model)], name="bon")
    control = untrained_reward_model(reward_model, tiny, tmp_path / "untrained-rm")
    control_summary, _ = run_inference(kb, "best-of-n", tiny, tiny_sum_solver, tmp_path, common + ["--reward_model_path", str(control)], name="bon-control")
    accuracy = [by_budget(summary)[n]["accuracy"] for n in (1, 2, 4, 8)]
    control_accuracy = by_budget(control_summary)[8]["accuracy"]
    print(f"best-of-N with a reward model, N = 1, 2, 4, 8: {accuracy}; with an untrained reward model at N = 8: {control_accuracy:.3f}")
    assert all(b >= a - 0.04 for a, b in zip(accuracy, accuracy[1:])), accuracy
    # 256 prompts: at N = 8 the accuracy is over 256 choices (standard error ~0.03), so a gain of 0.06 over one
    # sample is two standard errors. (With 96 prompts and a 0.1 margin the test hinged on the reward model's
    # exact training trajectory: a solver differing in the sixth digit gave +0.16 once and +0.08 the next time.)
    assert accuracy[-1] >= accuracy[0] + 0.06, accuracy
    assert accuracy[-1] >= control_accuracy + 0.08, (accuracy, control_accuracy)
    for record in records[:6]:
        scores = [s["score"] for s in record["samples"]]
        recomputed = reward_scores(reward_model, record["prompt"], [s["text"] for s in record["samples"]])
        assert all(abs(a - b) < 1e-4 for a, b in zip(scores, recomputed)), (scores, recomputed)
        for run in record["runs"]:
            n = run["budget"]
            assert run["chosen"] == [start + max(range(n), key=lambda i: (scores[start + i], -i)) for start in range(0, 8, n)]


def untrained_reward_model(trained: Path, tiny: Path, directory: Path) -> Path:
    """The trained reward model's scorer card on the raw tiny model with a random, untrained head."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny / "model", num_labels=1)
    model.config.pad_token_id = json.loads((trained / "ptcompile_scorer.json").read_text())["pad_token_id"]
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(trained).save_pretrained(directory)
    shutil.copy(trained / "ptcompile_scorer.json", directory / "ptcompile_scorer.json")
    return directory
