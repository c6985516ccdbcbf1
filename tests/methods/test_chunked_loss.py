"""chunked_loss (default on for the sft, preference and unpaired families) leaves training unchanged.

The same generated script runs with --chunked_loss true and false from the same seed; every logged value of
every step (loss, rewards, log-probs, KL, gradient norm) must agree. float32: rel 1e-5 (the chunked sums are
ordered differently). bf16 autocast: the first step exactly as far as the step-1 invariants go (policy ==
reference: DPO's loss is log 2 on both paths) and later steps rel 2e-3 (bf16 rounding of the gradient
differs: see tests/losses/test_chunked_logps.py). The function-level checks against the paper-free float64
formula are in tests/losses/test_chunked_logps.py.
"""

from __future__ import annotations

import math

import pytest

from conftest import compile_script, train_tiny

CASES = {
    "sft": ("sft", None, []),
    "continued-pretraining-packed": ("continued-pretraining", None, ["--packing", "true", "--per_device_train_batch_size", "2"]),
    "dpo": ("dpo", None, []),
    "dpo-lora": ("dpo", "lora", ["--learning_rate", "1e-2"]),
    "simpo": ("simpo", None, []),
    "kto": ("kto", None, []),
    "sft-prompt-tuning": ("sft", "prompt-tuning", []),
}


def run_both(kb, tiny, tmp_path, method, peft, extra):
    script = tmp_path / "train.py"
    script.write_text(compile_script(kb, method, peft=peft))
    common = ["--max_steps", "4", "--loss_chunk_size", "5"] + extra
    if "--learning_rate" not in extra:
        common += ["--learning_rate", "1e-3"]
    chunked = train_tiny(kb, method, tiny, tmp_path, common + ["--chunked_loss", "true"], script=script, name="chunked")
    plain = train_tiny(kb, method, tiny, tmp_path, common + ["--chunked_loss", "false"], script=script, name="plain")
    return chunked, plain


def assert_same_run(chunked, plain, rel):
    assert len(chunked) == len(plain) == 4
    for step, (a, b) in enumerate(zip(chunked, plain), 1):
        for key, expected in b.items():
            if key in ("step_seconds",) or not isinstance(expected, float):
                continue
            assert math.isclose(a[key], expected, rel_tol=rel, abs_tol=rel), (step, key, a[key], expected)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_and_plain_output_layer_train_identically(kb, tiny, tmp_path, case):
    method, peft, extra = CASES[case]
    chunked, plain = run_both(kb, tiny, tmp_path, method, peft, extra)
    assert_same_run(chunked, plain, 1e-5)
    assert chunked[-1]["loss"] != chunked[0]["loss"]  # the run trained: the comparison is not of four copies


@pytest.mark.slow
def test_chunked_dpo_under_bf16_autocast_tracks_the_plain_path(kb, tiny, tmp_path):
    chunked, plain = run_both(kb, tiny, tmp_path, "dpo", None, ["--mixed_precision", "bf16"])
    assert chunked[0]["loss"] == plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert chunked[0]["rewards/margin"] == plain[0]["rewards/margin"] == 0.0  # same bf16 matmuls for policy and reference
    assert_same_run(chunked, plain, 2e-3)
