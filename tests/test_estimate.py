"""The memory estimator: its verdicts and warnings, and (slow) its agreement with a fake-tensor measurement."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ptcompile.cli import main
from ptcompile.estimate import GiB, estimate, parameter_counts, resolve_gpu
from ptcompile.recipe import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_more_tokens_and_full_fine_tuning_need_more_memory(kb):
    full = estimate(resolve(kb, "sft", "llama3.2-1b"), seq=2048, batch=4)
    longer = estimate(resolve(kb, "sft", "llama3.2-1b"), seq=4096, batch=4)
    lora = estimate(resolve(kb, "sft", "llama3.2-1b", "lora"), seq=2048, batch=4)
    qlora = estimate(resolve(kb, "sft", "llama3.2-1b", "qlora"), seq=2048, batch=4)
    checkpointed = estimate(resolve(kb, "sft", "llama3.2-1b"), seq=2048, batch=4, gradient_checkpointing=True)
    assert longer.total > full.total
    assert lora.optimizer < full.optimizer / 100 and lora.weights < full.weights
    assert qlora.weights < lora.weights
    casts = 2 * parameter_counts(kb.model("llama3.2-1b").architecture)["linear"]  # autocast's weight copies stay
    assert checkpointed.activations - casts < (full.activations - casts) / 5
    # the parameter count follows from the preset's dimensions and equals the published one
    assert abs(full.total_params - kb.model("llama3.2-1b").num_parameters) / kb.model("llama3.2-1b").num_parameters < 0.01


def test_dpo_counts_the_reference_model_unless_precomputed(kb):
    dpo = estimate(resolve(kb, "dpo", "qwen2.5-0.5b-instruct"), seq=1024, batch=4)
    precomputed = estimate(resolve(kb, "dpo", "qwen2.5-0.5b-instruct", None, ["precompute_ref_log_probs=true"]), seq=1024, batch=4)
    assert dpo.reference > 4 * dpo.total_params and precomputed.reference == 0


def test_gpu_names_and_verdicts(capsys):
    assert resolve_gpu("H100") == ("80GB", 80.0)
    assert resolve_gpu("24GB")[1] == 24.0
    assert main(["estimate", "sft", "--model", "llama3-8b", "--seq", "2048", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "24GB: does not fit" in out and "--peft lora" in out
    assert main(["estimate", "sft", "--model", "smollm2-135m", "--seq", "512", "--batch", "1"]) == 0
    assert "24GB: fits" in capsys.readouterr().out


def test_compiling_for_a_gpu_that_is_too_small_warns_with_suggestions(capsys):
    assert main(["dpo", "--model", "llama3-8b", "--gpu", "24GB"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "GiB per GPU" in err and "--peft lora" in err and "FSDP" in err
    assert main(["sft", "--model", "smollm2-135m", "--gpu", "h100", "--set", "max_length=512"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_estimate_agrees_with_a_fake_tensor_measurement_of_the_real_step(kb):
    from fake_memory import measure

    measured = measure("sft", "smollm2-135m", seq=256, batch=2)["measured_bytes"]
    predicted = estimate(resolve(kb, "sft", "smollm2-135m"), seq=256, batch=2).tensor_peak
    assert abs(predicted - measured) / measured < 0.15, (predicted / GiB, measured / GiB)


def test_chunked_loss_is_counted_where_the_script_uses_it(kb):
    """The sft/preference/unpaired scripts form log-probabilities a chunk at a time by default (for heads that
    are plain linear layers): the logits term shrinks from tokens x vocabulary to one chunk."""
    sft = resolve(kb, "sft", "llama3.2-1b")
    chunked, plain = estimate(sft, seq=2048, batch=4), estimate(sft, seq=2048, batch=4, chunked_loss=False)
    assert chunked.logits < plain.logits / 3 and chunked.total < plain.total
    gemma = resolve(kb, "sft", "gemma2-2b-it")  # soft-capped logits: the script keeps the plain path
    assert estimate(gemma, seq=2048, batch=4).logits == estimate(gemma, seq=2048, batch=4, chunked_loss=False).logits
    grpo = resolve(kb, "grpo", "llama3.2-1b")  # not a chunked family
    assert estimate(grpo, seq=1024, batch=4).logits == estimate(grpo, seq=1024, batch=4, chunked_loss=False).logits
