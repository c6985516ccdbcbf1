"""SFT (method `sft`): the generated script learns on the tiny model; packing leaves the loss unchanged."""

from __future__ import annotations

import json

import torch

from conftest import generated_script, load_script_module, mean, train_tiny


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
    assert abs(results[True][0] - results[False][0]) < 1e-3 * abs(results[False][0]), results
