"""The online-preference losses and judges in the emitted scripts against independent computations.

- online-dpo: DPO (Rafailov et al. Eq. 7) and, compiled with loss_type=ipo, IPO (h − 1/(2β))²;
- spin: Chen et al.'s ℓ(λ·Δ_real − λ·Δ_generated) with ℓ(t) = log(1 + e^−t);
- rlaif: the position-debiased AI preference ½[softmax(ℓ1, ℓ2)_1 + softmax(ℓ1', ℓ2')_2] and the soft-label
  cross-entropy −[p log σ(h) + (1 − p) log σ(−h)] (Lee et al. 2023), which is DPO when p = 1;
- iterative-dpo: the judge-score parser and the (best, worst) pair selection of Yuan et al. (2024);
- every script's sequence log-probabilities on ragged right-padded batches against rows run alone.
Reference values are float64 Python from the same (rounded) inputs. Tolerances: 1e-6 relative for fp32
inputs; for bf16 inputs (log-probs drawn in [-20, 0] there, so that bf16's 8-bit mantissa rounds intermediate
differences by at most ~0.06) 5e-2 absolute plus 2e-2 relative. The scripts themselves always pass float32
log-probs (computed from the logits cast to float32), so bf16 here only bounds the functions' own rounding.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import compile_script, generated_script, load_script_module
from script_functions import load_functions


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def random_logps(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    scale = 120 if dtype == torch.float32 else 20
    return [(-scale * torch.rand(48, generator=generator)).to(dtype) for _ in range(4)]


TOLERANCES = [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 2e-2, 5e-2)]


@pytest.mark.parametrize("dtype, tolerance, absolute", TOLERANCES)
def test_online_dpo_and_ipo_losses(kb, dtype, tolerance, absolute):
    dpo = load_functions(compile_script(kb, "online-dpo"), ["dpo_loss"])["dpo_loss"]
    ipo_source = compile_script(kb, "online-dpo", overrides=["loss_type=ipo", "beta=0.5"])
    assert "def dpo_loss" not in ipo_source  # only the compiled loss type is emitted
    ipo = load_functions(ipo_source, ["ipo_loss"])["ipo_loss"]
    for beta in (0.05, 0.1, 1.0):
        logps = random_logps(dtype, int(beta * 100))
        dpo_losses, chosen_rewards, _ = dpo(*logps, beta=beta)
        ipo_losses, _, _ = ipo(*logps, beta=beta)
        for i in range(48):
            c, r, rc, rr = (float(x[i]) for x in logps)
            h = (c - rc) - (r - rr)
            assert math.isclose(float(dpo_losses[i]), -log_sigmoid(beta * h), rel_tol=tolerance, abs_tol=absolute)
            assert math.isclose(float(ipo_losses[i]), (h - 1 / (2 * beta)) ** 2, rel_tol=tolerance * 5, abs_tol=absolute)
            assert math.isclose(float(chosen_rewards[i]), beta * (c - rc), rel_tol=tolerance, abs_tol=absolute)


def test_a_script_refuses_another_loss_type_at_run_time(kb, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(compile_script(kb, "online-dpo", model="tiny"))
    result = subprocess.run([sys.executable, str(script), "--loss_type", "ipo", "--output_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode != 0 and "compiled for loss_type=sigmoid" in result.stderr


@pytest.mark.parametrize("dtype, tolerance, absolute", TOLERANCES)
def test_spin_loss(kb, dtype, tolerance, absolute):
    spin = load_functions(compile_script(kb, "spin"), ["spin_loss"])["spin_loss"]
    for lam in (0.1, 1.0, 5.0):
        logps = random_logps(dtype, int(lam * 10))
        losses, real_rewards, generated_rewards = spin(*logps, beta=lam)
        for i in range(48):
            real, generated, opp_real, opp_generated = (float(x[i]) for x in logps)
            t = lam * (real - opp_real) - lam * (generated - opp_generated)
            expected = math.log1p(math.exp(-t)) if t > -30 else -t
            assert math.isclose(float(losses[i]), expected, rel_tol=tolerance, abs_tol=absolute * max(1.0, lam))
            assert math.isclose(float(real_rewards[i]), lam * (real - opp_real), rel_tol=tolerance, abs_tol=absolute * lam)
            assert math.isclose(float(generated_rewards[i]), lam * (generated - opp_generated), rel_tol=tolerance, abs_tol=absolute * lam)


@pytest.mark.parametrize("dtype, tolerance, absolute", TOLERANCES)
def test_rlaif_preference_and_soft_label_loss(kb, dtype, tolerance, absolute):
    functions = load_functions(compile_script(kb, "rlaif"), ["ai_preference", "soft_preference_loss"])
    generator = torch.Generator().manual_seed(7)
    first_order, swapped = (4 * torch.randn(32, 2, generator=generator)).to(dtype), (4 * torch.randn(32, 2, generator=generator)).to(dtype)
    debiased = functions["ai_preference"](first_order, swapped)
    plain = functions["ai_preference"](first_order, None)
    for i in range(32):
        a1, a2 = float(first_order[i, 0]), float(first_order[i, 1])
        b1, b2 = float(swapped[i, 0]), float(swapped[i, 1])
        p_first = math.exp(a1) / (math.exp(a1) + math.exp(a2))  # y1 shown first, labelled '1'
        p_swapped = math.exp(b2) / (math.exp(b1) + math.exp(b2))  # y1 shown second, labelled '2'
        assert math.isclose(float(debiased[i]), 0.5 * (p_first + p_swapped), rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(float(plain[i]), p_first, rel_tol=1e-5, abs_tol=1e-6)
    logps = random_logps(dtype, 8)
    preference = torch.rand(48, generator=generator).to(dtype)
    for beta in (0.1, 0.5):
        losses, _, _ = functions["soft_preference_loss"](*logps, preference, beta=beta)
        for i in range(48):
            c, r, rc, rr = (float(x[i]) for x in logps)
            h, p = beta * ((c - rc) - (r - rr)), float(preference[i])
            expected = -(p * log_sigmoid(h) + (1 - p) * log_sigmoid(-h))
            assert math.isclose(float(losses[i]), expected, rel_tol=tolerance, abs_tol=absolute)
        # A hard label is plain DPO.
        hard, _, _ = functions["soft_preference_loss"](*logps, torch.ones(48, dtype=dtype), beta=beta)
        dpo = load_functions(compile_script(kb, "online-dpo"), ["dpo_loss"])["dpo_loss"](*logps, beta=beta)[0]
        assert torch.allclose(hard.double(), dpo.double(), rtol=tolerance, atol=absolute)


def test_self_rewarding_judge_parsing_and_pair_selection():
    script = load_script_module(generated_script("iterative-dpo"))
    parse, select = script.parse_judge_score, script.select_pair
    assert parse("The response is relevant. Score: 4") == 4.0
    assert parse("Score: 2\nOn reflection... Score: 3.5") == 3.5  # the last verdict counts
    assert parse("I would give it five points.") is None
    assert parse("Score: 9") is None  # outside the 0-5 rubric
    assert select([3.0, 5.0, 1.0, 5.0]) == (1, 2)  # best (first of the ties), worst
    assert select([2.0, None, 4.0]) == (2, 0)  # unparsed candidates are ignored
    assert select([3.0, 3.0, None]) is None  # best == worst: no preference
    assert select([None, 4.0]) is None


@torch.no_grad()
@pytest.mark.parametrize("method", ["online-dpo", "spin"])
def test_sequence_logps_on_ragged_batches(kb, tiny, method):
    """Summed completion log-probs of the pair batch equal a per-row float64 sum over the unpadded row."""
    from transformers import AutoModelForCausalLM

    script = load_script_module(generated_script(method))
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    rng = random.Random(9)
    pairs = [
        {"prompt_ids": [rng.randint(3, 500) for _ in range(rng.randint(2, 7))], "chosen_ids": [rng.randint(3, 500) for _ in range(rng.randint(1, 6))],
         "rejected_ids": [rng.randint(3, 500) for _ in range(rng.randint(1, 6))], "weight": 1.0, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}
        for _ in range(4)
    ]
    batch = script.collate_pairs(pairs, 0, torch.device("cpu"))
    logps = script.sequence_logps(model, batch)
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    for k, (prompt, completion) in enumerate(rows):
        alone = torch.log_softmax(model(input_ids=torch.tensor([prompt + completion])).logits[0].double(), -1)
        expected = sum(float(alone[len(prompt) - 1 + t, token]) for t, token in enumerate(completion))
        assert math.isclose(float(logps[k]), expected, rel_tol=1e-5)
    assert batch["num_pairs"] == 4 and batch["num_items"] == 4.0
