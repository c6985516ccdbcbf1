"""Constitutional AI, supervised phase (method `constitutional-ai`, family `constitutional`).

1. The pipeline end to end on the random-init tiny model: answer, critique, revise (twice), fine-tune on the
   final revisions; the saved revisions have the right structure and the SFT loss on them falls.
2. A tiny model first taught the critique-revise protocol (an answer that is kind or rude at random, a
   critique naming the adjective, a revision that is always kind) becomes kinder through CAI: fine-tuning on
   its own revisions raises the probability that its FIRST answer is kind.
3. One big batch, gradient accumulation and two data-parallel processes give the same revisions and losses.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from conftest import FAST, generated_script, load_script_module, read_metrics, run_script, tiny_args

GOOD = ["kind", "calm", "gentle", "helpful", "honest", "clear"]
BAD = ["rude", "loud", "lazy", "vague", "wrong", "mean"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "elk", "ant", "yak", "bat", "eel"]


def run_cai(kb, tiny, model: Path, workdir: Path, extra: list[str], processes: int = 1, name: str = "run") -> Path:
    output = workdir / name
    args = tiny_args(kb, "constitutional-ai", tiny) + ["--model_name_or_path", str(model), "--dataset", str(tiny / "data" / "preference.jsonl"), "--output_dir", str(output)]
    args += FAST + extra
    run_script(generated_script("constitutional-ai"), args, cwd=workdir, processes=processes)
    return output


def test_pipeline_end_to_end_and_the_loss_on_the_revisions_falls(kb, tiny, tmp_path):
    script = load_script_module(generated_script("constitutional-ai"))
    names = {principle["name"] for principle in script.CONSTITUTION}
    output = run_cai(kb, tiny, tiny / "model", tmp_path, ["--max_prompts", "32", "--num_revisions", "2", "--max_new_tokens", "16", "--num_train_epochs", "4", "--learning_rate", "3e-3"])
    records = [json.loads(line) for line in (output / "revisions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(32))
    for record in records:
        assert record["prompt"][0]["role"] == "user" and record["prompt"][0]["content"].startswith("Describe the ")
        assert len(record["steps"]) == 2 and {step["principle"] for step in record["steps"]} <= names
        assert record["revisions"] == [step["revision"] for step in record["steps"]]
    trained = sum(bool(r["revisions"][-1].strip()) for r in records)
    losses = [m["loss"] for m in read_metrics(output)]
    assert len(losses) == 4 * (trained // 8)
    print(f"SFT loss on the final revisions: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert sum(losses[-2:]) / 2 < 0.85 * sum(losses[:2]) / 2, losses
    assert (output / "final" / "config.json").is_file()


def protocol_conversations(principle: dict, n: int = 384, seed: int = 0) -> list[dict]:
    """Chats that teach the critique-revise protocol for one principle: a first answer that is kind or rude
    at random, a critique that names its adjective, and a revision that is always kind."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal = rng.choice(ANIMALS)
        adjective = rng.choice(GOOD + BAD)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Describe the {animal}."},
                    {"role": "assistant", "content": f"The {animal} is {adjective}."},
                    {"role": "user", "content": principle["critique"]},
                    {"role": "assistant", "content": f"The reply is {adjective}."},
                    {"role": "user", "content": principle["revision"]},
                    {"role": "assistant", "content": f"The {animal} is {rng.choice(GOOD)}."},
                ]
            }
        )
    return rows


def kind_probability(model_dir: Path, tokenizer_dir: Path) -> float:
    """Mean over animals of P(kind adjective) / P(any listed adjective) for the FIRST answer "The X is ...":
    the share of probability the model gives to kind answers before any critique."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shares = []
    for animal in ANIMALS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"Describe the {animal}."}], tokenize=False, add_generation_prompt=True)
        mass = {}
        for adjective in GOOD + BAD:
            prefix = tokenizer(prompt + f"The {animal} is", add_special_tokens=False)["input_ids"]
            full = tokenizer(prompt + f"The {animal} is {adjective}.", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logps = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
            mass[adjective] = math.exp(sum(logps[t, full[t + 1]].item() for t in range(len(prefix) - 1, len(full) - 1)))
        shares.append(sum(mass[a] for a in GOOD) / sum(mass.values()))
    return sum(shares) / len(shares)


def test_cai_makes_a_model_that_knows_the_protocol_kinder(kb, tiny, tmp_path):
    script = load_script_module(generated_script("constitutional-ai"))
    kindness = next(p for p in script.CONSTITUTION if p["name"] == "kindness")
    (tmp_path / "constitution.json").write_text(json.dumps([kindness]))
    protocol = tmp_path / "protocol.jsonl"
    protocol.write_text("".join(json.dumps(row) + "\n" for row in protocol_conversations(kindness)))
    warm = tmp_path / "warm"
    warmup = tiny_args(kb, "sft", tiny) + FAST + ["--dataset", str(protocol), "--output_dir", str(warm), "--max_steps", "150", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16"]
    run_script(generated_script("sft"), warmup, cwd=tmp_path)

    output = run_cai(
        kb, tiny, warm / "final", tmp_path,
        ["--constitution", str(tmp_path / "constitution.json"), "--max_prompts", "96", "--max_new_tokens", "12", "--temperature", "1.0",
         "--num_train_epochs", "2", "--learning_rate", "2e-3"],
    )
    records = [json.loads(line) for line in (output / "revisions.jsonl").read_text().splitlines()]
    kind_revisions = sum(any(f" {a}." in r["revisions"][-1] for a in GOOD) for r in records) / len(records)
    kind_first = sum(any(f" {a}." in r["response"] for a in GOOD) for r in records) / len(records)
    before = kind_probability(warm / "final", warm / "final")
    after = kind_probability(output / "final", warm / "final")
    print(f"kind first answers sampled {kind_first:.2f}, kind revisions {kind_revisions:.2f}; P(kind first answer) {before:.3f} -> {after:.3f}")
    assert 0.3 < before < 0.7  # the taught model answers kindly or rudely about equally often
    assert kind_revisions > 0.85  # its revisions are kind: the training targets CAI produces
    assert after > before + 0.25  # after SL-CAI its first answers are kind far more often


def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path):
    common = ["--max_prompts", "16", "--max_new_tokens", "8", "--max_steps", "2", "--learning_rate", "1e-3"]
    big = run_cai(kb, tiny, tiny / "model", tmp_path, common, name="big")
    accumulated = run_cai(kb, tiny, tiny / "model", tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = run_cai(kb, tiny, tiny / "model", tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    reference = (big / "revisions.jsonl").read_text()
    assert (accumulated / "revisions.jsonl").read_text() == reference == (parallel / "revisions.jsonl").read_text()
    runs = [read_metrics(path) for path in (big, accumulated, parallel)]
    for run in runs[1:]:
        assert len(run) == len(runs[0]) == 2
        for a, b in zip(runs[0], run):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6), (runs[0], run)
