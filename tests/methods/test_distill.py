"""Distillation on the tiny model: soft-label KD (family `distill`, method knowledge-distillation) and
sequence-level KD (method distillation-hard, family `sft`), both with a teacher that differs from the student.

The teacher is the tiny model after 25 steps of SFT on the tiny chat data (the generated sft script); the
student is the fresh random-init tiny model. KD must lower the divergence to the teacher and raise the
student's agreement with the teacher's most likely token; sequence-level KD must train on the teacher's
own greedy replies.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import FAST, compile_script, generated_script, load_script_module, mean, read_metrics, run_script, tiny_args, train_tiny


@pytest.fixture(scope="session")
def teacher(kb, tiny, tmp_path_factory):
    """A tiny chat model that differs from the student: 25 SFT steps from the same random init."""
    workdir = tmp_path_factory.mktemp("teacher")
    train_tiny(kb, "sft", tiny, workdir, ["--max_steps", "25", "--learning_rate", "3e-3"], name="sft")
    return workdir / "sft" / "final"


def teacher_flags(teacher) -> list[str]:
    return ["--teacher_model", str(teacher), "--teacher_dtype", "float32"]


def agreement(student, teacher_model, batch) -> float:
    """Fraction of trained positions where the student's most likely next token is the teacher's."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    return float((s.argmax(-1) == t.argmax(-1))[mask].float().mean())


def test_kd_divergence_falls_and_agreement_with_the_teacher_rises(kb, tiny, tmp_path, teacher):
    metrics = train_tiny(kb, "knowledge-distillation", tiny, tmp_path, ["--max_steps", "25", "--learning_rate", "3e-3"] + teacher_flags(teacher))
    kd = [m["kd"] for m in metrics]
    agree = [m["agreement"] for m in metrics]
    assert len(kd) == 25
    assert math.isclose(metrics[0]["loss"], kd[0], rel_tol=1e-6)  # alpha = 1, T = 1: the loss is the KL alone
    assert kd[0] > 2.0, kd  # a peaked teacher against a near-uniform random student
    assert mean(kd[-5:]) < 0.35 * mean(kd[:3]), kd
    assert agree[0] < 0.2 and mean(agree[-5:]) > 0.6, agree

    # Independently of the script's own metric: the saved student agrees with the teacher far more than
    # the fresh model does, on rows encoded by the script's data code.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = load_script_module(generated_script("knowledge-distillation"), name="kd_agreement")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    args = script.parse_args(tiny_args(kb, "knowledge-distillation", tiny))
    encoder = script.ChatEncoder(tokenizer)
    rows = [json.loads(line) for line in (tiny / "data" / "chat.jsonl").read_text().splitlines()[-32:]]
    batch = script.collate([script.encode_row(row, f"row {i}", encoder, tokenizer, args) for i, row in enumerate(rows)], tokenizer, args, torch.device("cpu"))
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    before = agreement(load(tiny / "model"), load(teacher), batch)
    after = agreement(load(tmp_path / "run" / "final"), load(teacher), batch)
    assert after > before + 0.4 and after > 0.6, (before, after)


def test_kd_with_jsd_temperature_and_hard_labels_learns(kb, tiny, tmp_path, teacher):
    """Generalized JSD (β = 0.5) at temperature 2, mixed half and half with the hard-label cross-entropy."""
    script = tmp_path / "train_kd_jsd.py"
    script.write_text(compile_script(kb, "knowledge-distillation", "tiny", overrides=["divergence=jsd", "alpha=0.5", "temperature=2.0"]))
    output = tmp_path / "run"
    run_script(script, tiny_args(kb, "knowledge-distillation", tiny) + FAST + teacher_flags(teacher) + ["--max_steps", "15", "--learning_rate", "3e-3", "--output_dir", str(output)], cwd=tmp_path)
    metrics = read_metrics(output)
    kd, ce = [m["kd"] for m in metrics], [m["ce"] for m in metrics]
    for m in metrics:  # L = α·T²·JSD + (1 - α)·CE, per token
        assert math.isclose(m["loss"], 0.5 * 4.0 * m["kd"] + 0.5 * m["ce"], rel_tol=1e-5)
    assert mean(kd[-3:]) < 0.5 * mean(kd[:2]), kd
    assert mean(ce[-3:]) < mean(ce[:2]) - 1.0, ce


def test_kd_refuses_a_teacher_with_another_vocabulary(kb, tiny, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny / "model", other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<not-in-the-student>"])
    tokenizer.save_pretrained(other)
    result = run_script(
        generated_script("knowledge-distillation"),
        tiny_args(kb, "knowledge-distillation", tiny) + FAST + teacher_flags(other) + ["--max_steps", "1", "--output_dir", str(tmp_path / "run")],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert "does not share the student's vocabulary" in result.stderr and "513 tokens" in result.stderr, result.stderr[-2000:]


def test_kd_script_refuses_a_divergence_it_was_not_compiled_for(kb, tiny, tmp_path, teacher):
    result = run_script(
        generated_script("knowledge-distillation"),
        tiny_args(kb, "knowledge-distillation", tiny) + FAST + teacher_flags(teacher) + ["--divergence", "jsd", "--max_steps", "1", "--output_dir", str(tmp_path / "run")],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0 and "computes the forward_kl divergence only" in result.stderr, result.stderr[-2000:]


def test_kd_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path, teacher):
    """Global batch 8: 1 process x 8; 1 x 4 x accumulation 2; 2 gloo processes x 4. The KD loss is a sum over
    tokens divided by the step's global token count, so the three runs log the same losses."""
    common = ["--max_steps", "3", "--learning_rate", "1e-3"] + teacher_flags(teacher)
    big = train_tiny(kb, "knowledge-distillation", tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, "knowledge-distillation", tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, "knowledge-distillation", tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 3
        for a, b in zip(big, run):
            for key in ("loss", "kd", "agreement"):
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, big, run)


# --------------------------------------------------------------------------------------------------
# Sequence-level distillation (distillation-hard)
# --------------------------------------------------------------------------------------------------


def test_sequence_level_kd_trains_on_the_teachers_greedy_replies(kb, tiny, tmp_path, teacher):
    data = tmp_path / "chat-32.jsonl"
    data.write_text("".join((tiny / "data" / "chat.jsonl").read_text().splitlines(keepends=True)[:32]))
    output = tmp_path / "run"
    flags = tiny_args(kb, "distillation-hard", tiny) + ["--dataset", str(data)] + FAST + teacher_flags(teacher)
    flags += ["--max_new_tokens", "12", "--generation_batch_size", "16", "--max_steps", "12", "--learning_rate", "3e-3", "--output_dir", str(output)]
    run_script(generated_script("distillation-hard"), flags, cwd=tmp_path)

    saved = [json.loads(line) for line in (output / "teacher_replies.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(saved) == 32
    for entry, row in zip(saved, rows):
        last_user = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
        assert entry["prompt"] == row["messages"][: last_user + 1]  # the conversation up to its last user turn

    # Batched, left-padded generation in the script == one prompt at a time here (greedy, 12 new tokens).
    assert_greedy_replies(teacher, saved[:6])

    losses = [m["loss"] for m in read_metrics(output)]
    assert len(losses) == 12
    assert mean(losses[-3:]) < 0.5 * losses[0], losses


def assert_greedy_replies(teacher, saved: list[dict], max_new_tokens: int = 12) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for entry in saved:
        ids = tokenizer.apply_chat_template(entry["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0)
        assert entry["reply"] == tokenizer.decode(out[0, ids["input_ids"].size(1) :], skip_special_tokens=True).strip()


def test_sequence_level_kd_generation_split_over_two_processes(kb, tiny, tmp_path, teacher):
    """With 2 processes each answers every other prompt; all replies come back, in the dataset's order."""
    data = tmp_path / "chat-16.jsonl"
    data.write_text("".join((tiny / "data" / "chat.jsonl").read_text().splitlines(keepends=True)[:16]))
    output = tmp_path / "run"
    flags = tiny_args(kb, "distillation-hard", tiny) + ["--dataset", str(data)] + FAST + teacher_flags(teacher)
    flags += ["--max_new_tokens", "12", "--generation_batch_size", "4", "--per_device_train_batch_size", "4", "--max_steps", "1", "--output_dir", str(output)]
    run_script(generated_script("distillation-hard"), flags, cwd=tmp_path, processes=2)
    saved = [json.loads(line) for line in (output / "teacher_replies.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [entry["prompt"][-1] for entry in saved] == [[m for m in row["messages"] if m["role"] == "user"][-1] for row in rows]
    assert_greedy_replies(teacher, saved[:4])  # prompts 0 and 2 from rank 0, 1 and 3 from rank 1
    assert len(read_metrics(output)) == 1


def test_sequence_level_kd_without_a_teacher_is_sft_on_the_dataset(kb, tiny):
    dh = load_script_module(generated_script("distillation-hard"), name="dh_no_teacher")
    sft = load_script_module(generated_script("sft"), name="sft_reference")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    flags = tiny_args(kb, "sft", tiny)
    args = dh.parse_args(flags)
    assert args.teacher_model == ""
    items, _ = dh.build_items(args, tokenizer)
    expected, _ = sft.build_items(sft.parse_args(flags), tokenizer)
    assert items == expected


def test_teacher_replies_are_reused_on_resume(kb, tiny, tmp_path):
    """A resumed run reads output_dir/teacher_replies.jsonl instead of generating again (here the teacher
    path does not even exist), so it trains on the same targets."""
    dh = load_script_module(generated_script("distillation-hard"), name="dh_resume")
    prompts = [[{"role": "user", "content": "Repeat after me: red cat"}], [{"role": "user", "content": "Now reverse: owl bee"}]]
    output = tmp_path / "run"
    output.mkdir()
    (output / "teacher_replies.jsonl").write_text("".join(json.dumps({"prompt": p, "reply": r}) + "\n" for p, r in zip(prompts, ["red cat", "bee owl"])))
    args = dh.parse_args(["--teacher_model", str(tmp_path / "missing"), "--output_dir", str(output), "--resume_from_checkpoint", "latest"])
    assert dh.teacher_replies(prompts, args) == ["red cat", "bee owl"]


def test_sampled_teacher_replies_follow_the_seed_and_differ_from_greedy(kb, tiny, tmp_path, teacher):
    """do_sample true: replies are drawn with temperature / top_p (same seed, same replies); greedy differs."""
    from transformers import set_seed

    dh = load_script_module(generated_script("distillation-hard"), name="dh_sampling")
    prompts = [[{"role": "user", "content": f"Repeat after me: {words}"}] for words in ("red cat", "owl bee yak", "gold fox", "pink hen eel")]
    common = ["--teacher_model", str(teacher), "--teacher_dtype", "float32", "--max_new_tokens", "10", "--generation_batch_size", "2"]
    sampled = []
    for run in range(2):
        set_seed(7)
        sampled.append(dh.teacher_replies(prompts, dh.parse_args(common + ["--do_sample", "true", "--temperature", "1.5", "--output_dir", str(tmp_path / f"s{run}")])))
    greedy = dh.teacher_replies(prompts, dh.parse_args(common + ["--output_dir", str(tmp_path / "g")]))
    assert sampled[0] == sampled[1]
    assert sampled[0] != greedy
    assert (tmp_path / "g" / "teacher_replies.jsonl").is_file()
