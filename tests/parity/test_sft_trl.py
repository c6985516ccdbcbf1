"""Parity of the `sft` family with TRL 1.16's SFTTrainer, on the tiny model and the bundled rows.

TRL is driven as a user would drive it: an SFTTrainer built on the tiny model and a datasets.Dataset, its own
tokenisation (train_dataset), its own collator and its own compute_loss. Our side is the compiled script
imported as a module (encode_row / pack / collate / compute_loss). Both see the same weights (the tiny model
with N(0, 0.3²) noise added, so per-token losses spread and a wrong mask shows in the mean).

- instruction-tuning == SFTTrainer on conversational prompt-completion data (completion_only_loss): same token
  ids, same labels, same loss.
- sft (chat) == SFTTrainer(assistant_only_loss=True). TRL needs {% generation %} markers in the template; we
  give TRL the tiny template with markers around exactly what follows the generation prompt (it renders the
  same text), which is the split our ChatEncoder derives from prefix renders. TRL's bundled Qwen2.5 training
  template opens the block before the newline that ends the generation prompt, so with it TRL would also
  train that newline: a difference of templates, not of losses.
- continued-pretraining (packed) == SFTTrainer(packing=True) on text (best-fit-decreasing packing, padding-free,
  the first token of every document unlabelled): the two pack differently, but the token-level mean over the
  same documents, and the number of trained tokens, must agree.

Tolerance: rel 1e-5 on the mean loss (both sides compute in float32 with different reduction orders).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import generated_script, load_script_module

pytestmark = pytest.mark.parity

GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def noisy_tiny(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.config.use_cache = False
    return model.eval()


def sft_trainer(model, tokenizer, rows, tmp_path, **config):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=8, use_cpu=True, bf16=False, **config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.eval()
    return trainer


def trl_mean_loss(trainer) -> tuple[float, int]:
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return float(loss), int((batch["labels"] != -100).sum())


def our_mean_loss(script, model, tokenizer, items, args) -> tuple[float, int]:
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        loss_sum, _ = script.compute_loss(model, batch, args, {})
    return float(loss_sum) / batch["num_items"], batch["num_items"]


def bundled(tiny, name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (tiny / "data" / name).read_text().splitlines()[:n]]


def test_instruction_tuning_matches_sft_trainer_prompt_completion(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = noisy_tiny(tiny)
    rows = bundled(tiny, "instruction.jsonl", 8)
    conversational = [
        {
            "prompt": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }
        for r in rows
    ]
    trainer = sft_trainer(copy.deepcopy(model), tokenizer, conversational, tmp_path, max_length=512)
    script = load_script_module(generated_script("instruction-tuning"), name="parity_instruction")
    args = script.parse_args(["--max_length", "512"])
    encoder = script.ChatEncoder(tokenizer)
    ours = [script.encode_row(r, f"row {i}", encoder, tokenizer, args) for i, r in enumerate(rows)]
    for mine, theirs in zip(ours, trainer.train_dataset):
        assert mine["input_ids"] == theirs["input_ids"]
        assert mine["labels"] == theirs["labels"]
    (trl_loss, trl_tokens), (loss, tokens) = trl_mean_loss(trainer), our_mean_loss(script, model, tokenizer, ours, args)
    assert tokens == trl_tokens
    assert math.isclose(loss, trl_loss, rel_tol=1e-5), (loss, trl_loss)


def test_sft_chat_matches_sft_trainer_assistant_only_loss(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    trl_tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    trl_tokenizer.chat_template = GENERATION_TEMPLATE
    rows = bundled(tiny, "chat.jsonl", 8)  # system prompts and second turns included
    assert trl_tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False) == tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    model = noisy_tiny(tiny)
    trainer = sft_trainer(copy.deepcopy(model), trl_tokenizer, rows, tmp_path, max_length=512, assistant_only_loss=True)
    script = load_script_module(generated_script("sft"), name="parity_sft")
    args = script.parse_args(["--max_length", "512"])
    encoder = script.ChatEncoder(tokenizer)
    ours = [script.encode_row(r, f"row {i}", encoder, tokenizer, args) for i, r in enumerate(rows)]
    for mine, theirs in zip(ours, trainer.train_dataset):
        assert mine["input_ids"] == theirs["input_ids"]
        assert mine["labels"] == theirs["labels"]
    (trl_loss, trl_tokens), (loss, tokens) = trl_mean_loss(trainer), our_mean_loss(script, model, tokenizer, ours, args)
    assert tokens == trl_tokens
    assert math.isclose(loss, trl_loss, rel_tol=1e-5), (loss, trl_loss)


def test_packed_continued_pretraining_matches_sft_trainer_packing(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = noisy_tiny(tiny)
    rows = bundled(tiny, "text.jsonl", 16)
    trainer = sft_trainer(copy.deepcopy(model), tokenizer, rows, tmp_path, max_length=128, packing=True)
    assert "position_ids" in trainer.data_collator([trainer.train_dataset[0]])  # padding-free packed rows
    script = load_script_module(generated_script("continued-pretraining"), name="parity_cpt")
    args = script.parse_args(["--max_length", "128"])
    assert args.packing  # the method's default
    encoder = script.ChatEncoder(tokenizer)
    examples = [window for i, r in enumerate(rows) for window in script.encode_row(r, f"row {i}", encoder, tokenizer, args)]
    assert len(examples) == len(rows)  # no document is longer than 128 tokens here
    packed = script.pack(examples, args.max_length)
    assert len(packed) > 1
    (trl_loss, trl_tokens), (loss, tokens) = trl_mean_loss(trainer), our_mean_loss(script, model, tokenizer, packed, args)
    assert tokens == trl_tokens  # every token but each document's first, and the end-of-text token included
    assert math.isclose(loss, trl_loss, rel_tol=1e-5), (loss, trl_loss)
