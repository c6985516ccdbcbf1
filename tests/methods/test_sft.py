"""The `sft` family: SFT, instruction tuning and continued pretraining learn on the tiny model (their generated
scripts, as subprocesses), and packing leaves the loss unchanged for every data format, also for a batch of
several packed rows. Sequence-level distillation (distillation-hard) is in test_distill.py; exactness of
accumulation and data parallelism in test_dpo.py (sft) and below (continued pretraining, packed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FAST, generated_script, load_script_module, mean, read_metrics, run_script, tiny_args, train_tiny


def test_sft_loss_falls_on_tiny_chat_data(kb, tiny, tmp_path):
    metrics = train_tiny(kb, "sft", tiny, tmp_path, ["--max_steps", "30", "--learning_rate", "3e-3"])
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 30
    assert mean(losses[-5:]) < 0.6 * mean(losses[:3]), losses


def test_packed_and_unpacked_losses_are_equal(kb, tiny):
    """The same examples as one packed row and as a padded batch give the same summed loss and token count."""
    script = load_script_module(generated_script("sft"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (tiny / "data" / "chat.jsonl").read_text().splitlines()[:6]]
    results = {}
    for packing in (False, True):
        args = script.parse_args(["--packing", str(packing).lower(), "--max_length", "512"])
        encoder = script.ChatEncoder(tokenizer)
        examples = [script.encode_row(row, f"row {i}", encoder, tokenizer, args) for i, row in enumerate(rows)]
        items = script.pack(examples, args.max_length) if packing else examples
        batch = script.collate(items, tokenizer, args, torch.device("cpu"))
        with torch.no_grad():
            loss_sum, _ = script.compute_loss(model, batch, args, {})
        results[packing] = (float(loss_sum), batch["num_items"], batch["input_ids"].shape)
    assert results[True][2][0] == 1, "all six examples should fit one packed row"
    assert results[True][1] == results[False][1]
    assert abs(results[True][0] - results[False][0]) < 1e-5 * abs(results[False][0]), results


def test_instruction_tuning_loss_falls_on_tiny_instruction_data(kb, tiny, tmp_path):
    """Loss only on the output (repeat / reverse the input words): the template part is never trained."""
    metrics = train_tiny(kb, "instruction-tuning", tiny, tmp_path, ["--max_steps", "30", "--learning_rate", "3e-3"])
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 30
    assert mean(losses[:3]) > 5.5, losses  # about log(512) = 6.24 at random init
    assert mean(losses[-5:]) < 0.6 * mean(losses[:3]), losses


def test_continued_pretraining_packs_by_default_and_its_loss_falls(kb, tiny, tmp_path):
    """Every token of the raw text is a target; the 256 documents are packed into 256-token rows."""
    output = tmp_path / "run"
    result = run_script(
        generated_script("continued-pretraining"),
        tiny_args(kb, "continued-pretraining", tiny) + FAST + ["--output_dir", str(output), "--max_steps", "30", "--learning_rate", "3e-3", "--max_length", "256"],
        cwd=tmp_path,
    )
    packed_rows = int(result.stdout.split(" training items")[0].split()[-1])
    assert 20 <= packed_rows <= 60, result.stdout  # 256 documents of 10-75 tokens, next-fit into 256-token rows
    losses = [m["loss"] for m in read_metrics(output)]
    assert len(losses) == 30
    assert mean(losses[-5:]) < 0.4 * mean(losses[:3]), losses


def encode_and_score(script, tokenizer, model, rows: list[dict], packing: bool, max_length: int):
    args = script.parse_args(["--packing", str(packing).lower(), "--max_length", str(max_length)])
    encoder = script.ChatEncoder(tokenizer)
    examples = []
    for i, row in enumerate(rows):
        encoded = script.encode_row(row, f"row {i}", encoder, tokenizer, args)
        examples += encoded if isinstance(encoded, list) else [encoded]  # text rows give a list of windows
    items = script.pack(examples, args.max_length) if packing else examples
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        loss_sum, _ = script.compute_loss(model, batch, args, {})
    return float(loss_sum), batch["num_items"], items


@pytest.mark.parametrize("method, data", [("continued-pretraining", "text.jsonl"), ("sft", "chat.jsonl"), ("instruction-tuning", "instruction.jsonl")])
def test_a_batch_of_several_packed_rows_equals_the_unpacked_batch(kb, tiny, method, data):
    """Twenty examples packed into several rows of at most 96 tokens, batched (right-padded) together: the
    summed loss and the token count equal those of the twenty examples padded one per row. This fails if
    attention crosses an example boundary, if positions do not restart, or if the padding of a packed row
    leaks into it."""
    script = load_script_module(generated_script(method), name=f"packing_{method.replace('-', '_')}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (tiny / "data" / data).read_text().splitlines()[:20]]
    unpacked_loss, unpacked_tokens, _ = encode_and_score(script, tokenizer, model, rows, packing=False, max_length=96)
    packed_loss, packed_tokens, packed_rows = encode_and_score(script, tokenizer, model, rows, packing=True, max_length=96)
    lengths = [len(row["input_ids"]) for row in packed_rows]
    assert len(packed_rows) >= 3 and len(set(lengths)) > 1, lengths  # several rows, of different lengths (padding)
    assert all(length <= 96 for length in lengths)
    assert sum(sum(p == 0 for p in row["position_ids"]) >= 2 for row in packed_rows) >= 2, "rows should hold several examples"
    assert packed_tokens == unpacked_tokens
    assert abs(packed_loss - unpacked_loss) < 1e-5 * abs(unpacked_loss), (packed_loss, unpacked_loss)
    # The check has teeth: with the example boundaries erased (positions running on), the loss differs, by
    # 2e-4 to 7e-4 relative on the random-init tiny model (which barely uses context), well above 1e-5.
    args = script.parse_args(["--packing", "true", "--max_length", "96"])
    leaky = [dict(row, position_ids=list(range(len(row["input_ids"])))) for row in packed_rows]
    batch = script.collate(leaky, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        leaky_loss, _ = script.compute_loss(model, batch, args, {})
    assert abs(float(leaky_loss) - unpacked_loss) > 5e-5 * abs(unpacked_loss)


def test_text_rows_train_every_token_but_the_first_and_long_ones_are_split_not_cut(kb, tiny):
    script = load_script_module(generated_script("continued-pretraining"), name="cpt_labels")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    encoder = script.ChatEncoder(tokenizer)
    [item] = script.encode_row({"text": "The red cat sleeps. The cat is red."}, "row 0", encoder, tokenizer, script.parse_args(["--max_length", "512"]))
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    assert item["labels"][0] == -100 and item["labels"][1:] == item["input_ids"][1:]

    text = " ".join(f"The {c} {a} sleeps." for c, a in zip(["red", "blue", "gold", "pink"] * 8, ["cat", "dog", "owl", "fox"] * 8))
    whole = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    windows = script.encode_row({"text": text}, "row 1", encoder, tokenizer, script.parse_args(["--max_length", "32"]))
    assert len(windows) == math.ceil((len(whole) - 1) / 31) >= 4
    assert all(2 <= len(w["input_ids"]) <= 32 and w["labels"][0] == -100 and w["labels"][1:] == w["input_ids"][1:] for w in windows)
    # Windows overlap by one token, so the targets are every token of the document but its first, once each.
    assert sum((w["labels"][1:] for w in windows), []) == whole[1:]
    assert windows[0]["input_ids"][0] == whole[0] and all(a["input_ids"][-1] == b["input_ids"][0] for a, b in zip(windows, windows[1:]))


def test_packed_continued_pretraining_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path):
    """Global batch 8 packed rows: 1 process x 8; 1 x 4 x accumulation 2; 2 gloo processes x 4. Same losses:
    the loss is divided by the step's global token count, whatever the split."""
    common = ["--max_steps", "3", "--learning_rate", "1e-3", "--max_length", "256"]
    big = train_tiny(kb, "continued-pretraining", tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, "continued-pretraining", tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, "continued-pretraining", tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 3
        for a, b in zip(big, run):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6), (big, run)


def test_gradient_checkpointing_leaves_the_run_unchanged(kb, tiny, tmp_path):
    """Recomputing activations in the backward pass (with the chunked output layer outside the recomputed
    layers) gives the same losses and gradient norms as keeping them: rel 1e-5 over 4 steps."""
    common = ["--max_steps", "4", "--learning_rate", "1e-3"]
    kept = train_tiny(kb, "sft", tiny, tmp_path, common, name="kept")
    recomputed = train_tiny(kb, "sft", tiny, tmp_path, common + ["--gradient_checkpointing", "true"], name="recomputed")
    for a, b in zip(recomputed, kept):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5), (a, b)
    assert kept[-1]["loss"] < kept[0]["loss"]
