"""PEFT on any method: every technique of taxonomy/peft/ compiled into the SFT and DPO scripts for the tiny model.

For each technique the emitted script trains a few steps on a fixed batch (16 rows, batch 16: every step sees
the same data, so the loss curve is not batch noise) and we check that

- the loss falls (SFT) or the implicit reward margin rises (DPO, whose reference is the base model with the
  adapter switched off: with an adapter that starts as the identity, the first DPO loss is exactly log 2);
- only adapter parameters train: the checkpoint, which stores exactly the trainable parameters, holds
  adapter tensors only;
- the final save is a peft adapter that loads back with PeftModel.from_pretrained and changes the base
  model's logits;
- --merge_adapter true (offered for the techniques that fold into the weights) writes a plain transformers
  model whose logits equal those of base + adapter of an identical run;
- QLoRA's base really is 4-bit NF4 with double quantization (bitsandbytes runs on CPU);
- AdaLoRA's budget schedule accepts short-run values from the command line and rejects, with a clear
  message, defaults that leave no pruning phase.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FAST, compile_script, load_script_module, read_metrics, run_script, tiny_args

TECHNIQUES = ["lora", "qlora", "dora", "rslora", "adalora", "prefix-tuning", "prompt-tuning", "p-tuning-v2", "ia3"]
MERGEABLE = ["lora", "dora", "rslora", "adalora", "ia3"]
PROMPT_LEARNING = ["prefix-tuning", "prompt-tuning", "p-tuning-v2"]
# Rates that move the 158k-parameter random-init model within a few steps (the techniques' paper rates are
# for billion-parameter models and hundreds of steps).
LEARNING_RATES = {"lora": 1e-2, "qlora": 1e-2, "dora": 5e-3, "rslora": 5e-3, "adalora": 1e-2, "prefix-tuning": 3e-2, "prompt-tuning": 1e-1, "p-tuning-v2": 1e-1, "ia3": 3e-1}
# AdaLoRA's singular values start at 0 and so get no gradient of the DPO margin at first: it needs a push.
DPO_LEARNING_RATES = {**LEARNING_RATES, "adalora": 5e-2}
ADAPTER_MARKERS = ("lora_", "prompt_encoder.", "ia3_l")
STEPS = 6


def fixed_batch_data(tiny, tmp_path, name: str, rows: int = 16):
    """The first `rows` rows of a bundled dataset: with batch size `rows`, every step trains on the same batch."""
    path = tmp_path / f"{name}-{rows}.jsonl"
    if not path.exists():
        path.write_text("".join((tiny / "data" / f"{name}.jsonl").read_text().splitlines(keepends=True)[:rows]))
    return path


def run_peft(kb, tiny, tmp_path, method: str, technique: str, name: str, extra: list[str] = ()) -> tuple:
    script = tmp_path / f"train_{method}_{technique.replace('-', '_')}.py"
    if not script.exists():
        script.write_text(compile_script(kb, method, "tiny", technique))
    data = fixed_batch_data(tiny, tmp_path, "chat" if method == "sft" else "preference")
    args = tiny_args(kb, method, tiny) + ["--dataset", str(data)] + FAST + ["--per_device_train_batch_size", "16"]
    rate = (LEARNING_RATES if method == "sft" else DPO_LEARNING_RATES)[technique]
    args += ["--max_steps", str(STEPS), "--learning_rate", str(rate), "--output_dir", str(tmp_path / name)]
    if technique == "adalora":
        args += ["--tinit", "1", "--tfinal", "2", "--delta_t", "1"]  # a pruning phase inside a 6-step run
    run_script(script, args + list(extra), cwd=tmp_path)
    return tmp_path / name, read_metrics(tmp_path / name)


def sample_batch(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    rows = [json.loads(line) for line in (tiny / "data" / "chat.jsonl").read_text().splitlines()[:4]]
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch).logits
    return logits[:, -batch["input_ids"].size(1) :]  # prompt tuning returns the virtual tokens' logits first


def base_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()


def assert_adapter_only_checkpoint(checkpoint) -> None:
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    names = sorted(state["model"])
    assert names, "the checkpoint stores no trainable parameter"
    assert all(any(marker in name for marker in ADAPTER_MARKERS) for name in names), [n for n in names if not any(m in n for m in ADAPTER_MARKERS)]


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_sft_with_peft_learns_trains_only_the_adapter_and_saves_it(kb, tiny, tmp_path, technique):
    from peft import PeftModel

    output, metrics = run_peft(kb, tiny, tmp_path, "sft", technique, "adapter", ["--save_steps", "3"])
    losses = [m["loss"] for m in metrics]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.03, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= STEPS - 2, losses  # falls step after step
    assert_adapter_only_checkpoint(output / "checkpoint-3")

    final = output / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists(), "the final save should be the adapter, not the full model"
    batch = sample_batch(tiny)
    adapted = PeftModel.from_pretrained(base_model(tiny), final).eval()
    assert (logits_of(adapted, batch) - logits_of(base_model(tiny), batch)).abs().max() > 1e-3


@pytest.mark.parametrize("technique", MERGEABLE)
def test_merge_adapter_gives_a_plain_model_with_the_adapted_logits(kb, tiny, tmp_path, technique):
    """Two identical runs (same seed, CPU, deterministic): one saves the adapter, one merges it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_run, _ = run_peft(kb, tiny, tmp_path, "sft", technique, "adapter")
    merged_run, _ = run_peft(kb, tiny, tmp_path, "sft", technique, "merged", ["--merge_adapter", "true"])
    merged_dir = merged_run / "final"
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any(marker in name for name, _ in merged.named_parameters() for marker in ADAPTER_MARKERS)
    adapted = PeftModel.from_pretrained(base_model(tiny), adapter_run / "final").eval()
    batch = sample_batch(tiny)
    expected, got = logits_of(adapted, batch), logits_of(merged, batch)
    assert (expected - logits_of(base_model(tiny), batch)).abs().max() > 1e-3  # the adapter did change the model
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_dpo_with_peft_raises_the_margin_and_uses_the_base_as_reference(kb, tiny, tmp_path, technique):
    output, metrics = run_peft(kb, tiny, tmp_path, "dpo", technique, "dpo", ["--save_steps", "3", "--beta", "0.5"])
    losses = [m["loss"] for m in metrics]
    margins = [m["rewards/margin"] for m in metrics]
    if technique not in PROMPT_LEARNING and technique != "adalora":
        # The adapter starts as the identity, so π = π_ref (the adapter switched off) at step 1.
        # (AdaLoRA's logged loss also holds its orthogonality penalty; virtual tokens start random.)
        assert abs(losses[0] - math.log(2)) < 1e-4, losses
    assert margins[-1] > margins[0] + 0.05, margins
    assert losses[-1] < losses[0] - 0.01, losses
    assert_adapter_only_checkpoint(output / "checkpoint-3")
    assert (output / "final" / "adapter_model.safetensors").is_file()


def test_merge_flag_is_offered_only_where_a_merge_exists(kb):
    for technique in TECHNIQUES:
        source = compile_script(kb, "sft", "tiny", technique)
        assert ("merge_adapter: bool" in source) == (technique in MERGEABLE), technique
        assert ("merge_and_unload()" in source) == (technique in MERGEABLE), technique  # save_final's branch


def test_qlora_base_is_4bit_nf4_with_double_quantization(kb, tiny, tmp_path):
    import bitsandbytes as bnb
    from accelerate import Accelerator

    path = tmp_path / "train_sft_qlora.py"
    path.write_text(compile_script(kb, "sft", "tiny", "qlora"))
    script = load_script_module(path)
    args = script.parse_args(tiny_args(kb, "sft", tiny))
    model = script.load_model(args, Accelerator(cpu=True))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 7 projections x 2 layers
    for module in quantized:
        state = module.weight.quant_state
        assert state.quant_type == "nf4" and state.nested, "NF4 with double quantization (nested constants)"
        assert module.compute_dtype == torch.bfloat16
        assert module.weight.dtype == torch.uint8  # packed 4-bit storage
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_adalora_defaults_refuse_a_run_too_short_for_their_schedule(kb, tiny, tmp_path):
    script = tmp_path / "train_sft_adalora.py"
    script.write_text(compile_script(kb, "sft", "tiny", "adalora"))
    data = fixed_batch_data(tiny, tmp_path, "chat")
    result = run_script(script, tiny_args(kb, "sft", tiny) + ["--dataset", str(data)] + FAST + ["--max_steps", "6", "--output_dir", str(tmp_path / "run")], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "--tinit 500" in result.stderr and "--tfinal 1500" in result.stderr and "only 6 optimizer steps" in result.stderr, result.stderr[-2000:]
