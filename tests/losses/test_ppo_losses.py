"""PPO-RLHF's pieces in the emitted script against independent computations of the papers' formulas.

Each function is extracted from the compiled script (the code users run) and compared, on random inputs with
ragged completion masks, with plain-Python float64 loops written from the equations:
  - the per-token reward r_t = -β·(log π_old − log π_ref) + R·[t = T] (InstructGPT Eq. 2, Stiennon et al.);
  - GAE Â_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, computed as the explicit double sum (PPO Eqs. 11-12);
  - the clipped surrogate −min(ρÂ, clip(ρ, 1±ε)Â) (PPO Eq. 7) and the clipped value loss;
  - masked whitening.
Tolerances: 1e-9 in float64, 1e-5 in float32, 3e-2 (relative) for bf16 inputs.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import compile_script, generated_script, load_script_module
from script_functions import load_functions

NAMES = ["kl_penalised_rewards", "masked_whiten", "generalized_advantages", "ppo_clipped_surrogate", "clipped_value_loss"]


@pytest.fixture(scope="module")
def ppo(kb):
    return load_functions(compile_script(kb, "ppo-rlhf"), NAMES)


def ragged(rows: int, width: int, seed: int) -> tuple[list[int], torch.Tensor]:
    rng = random.Random(seed)
    lengths = [rng.randint(1, width) for _ in range(rows)]
    lengths[0] = width  # at least one full row
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)
    return lengths, mask


def test_kl_penalised_rewards(ppo):
    generator = torch.Generator().manual_seed(0)
    lengths, mask = ragged(6, 9, 0)
    scores = torch.randn(6, generator=generator, dtype=torch.float64)
    logps, ref = (-3 * torch.rand(6, 9, generator=generator, dtype=torch.float64) for _ in range(2))
    for beta in (0.0, 0.02, 0.3):
        rewards, log_ratio = ppo["kl_penalised_rewards"](scores, logps, ref, mask, beta)
        for i, n in enumerate(lengths):
            for t in range(9):
                expected = 0.0
                if t < n:
                    expected = -beta * (float(logps[i, t]) - float(ref[i, t])) + (float(scores[i]) if t == n - 1 else 0.0)
                assert math.isclose(float(rewards[i, t]), expected, abs_tol=1e-12), (i, t)
                assert math.isclose(float(log_ratio[i, t]), (float(logps[i, t]) - float(ref[i, t])) * (t < n), abs_tol=1e-12)


def test_generalized_advantages_are_the_explicit_sum(ppo):
    generator = torch.Generator().manual_seed(1)
    lengths, mask = ragged(7, 11, 1)
    rewards = torch.randn(7, 11, generator=generator, dtype=torch.float64)
    values = torch.randn(7, 11, generator=generator, dtype=torch.float64)
    for gamma, lam in ((1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)):
        advantages, returns = ppo["generalized_advantages"](rewards, values, mask, gamma, lam)
        for i, n in enumerate(lengths):
            r, v = rewards[i, :n].tolist(), values[i, :n].tolist() + [0.0]  # V after the last token: terminal, 0
            deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
            for t in range(11):
                expected = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) if t < n else 0.0
                assert math.isclose(float(advantages[i, t]), expected, rel_tol=1e-9, abs_tol=1e-9), (gamma, lam, i, t)
                assert math.isclose(float(returns[i, t]), (expected + v[t]) if t < n else 0.0, rel_tol=1e-9, abs_tol=1e-9)


def test_masked_whiten(ppo):
    generator = torch.Generator().manual_seed(2)
    lengths, mask = ragged(5, 8, 2)
    values = 3 + 2 * torch.randn(5, 8, generator=generator, dtype=torch.float64)
    kept = [float(values[i, t]) for i, n in enumerate(lengths) for t in range(n)]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((x - mean) ** 2 for x in kept) / (len(kept) - 1) + 1e-8)
    for shift_mean in (True, False):
        whitened = ppo["masked_whiten"](values, mask, shift_mean)
        for i, n in enumerate(lengths):
            for t in range(8):
                expected = ((float(values[i, t]) - mean) / std + (0.0 if shift_mean else mean)) if t < n else 0.0
                assert math.isclose(float(whitened[i, t]), expected, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_clipped_surrogate_and_value_loss(ppo, dtype, tolerance):
    generator = torch.Generator().manual_seed(3)
    lengths, mask = ragged(8, 10, 3)
    old = -2 * torch.rand(8, 10, generator=generator, dtype=torch.float64)
    new = old + 0.4 * torch.randn(8, 10, generator=generator, dtype=torch.float64)  # ratios on both sides of the clip
    advantages = torch.randn(8, 10, generator=generator, dtype=torch.float64)
    values, old_values, returns = (torch.randn(8, 10, generator=generator, dtype=torch.float64) for _ in range(3))
    cast = [x.to(dtype) for x in (new, old, advantages, values, old_values, returns)]
    new_c, old_c, adv_c, values_c, old_values_c, returns_c = cast
    for eps, eps_v in ((0.2, 0.2), (0.1, 0.5)):
        policy_sum, clipped = ppo["ppo_clipped_surrogate"](new_c, old_c, adv_c, mask.to(dtype), eps)
        value_sum, _ = ppo["clipped_value_loss"](values_c, old_values_c, returns_c, mask.to(dtype), eps_v)
        expected_policy = expected_value = expected_clipped = 0.0
        for i, n in enumerate(lengths):
            for t in range(n):
                lp, lo, a = (float(x[i, t]) for x in (new_c, old_c, adv_c))
                ratio = math.exp(lp - lo)
                unclipped, clip_term = ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a
                expected_policy += -min(unclipped, clip_term)
                expected_clipped += clip_term < unclipped
                v, vo, ret = (float(x[i, t]) for x in (values_c, old_values_c, returns_c))
                v_clipped = vo + min(max(v - vo, -eps_v), eps_v)
                expected_value += 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
        assert math.isclose(float(policy_sum), expected_policy, rel_tol=tolerance, abs_tol=tolerance * 10)
        assert math.isclose(float(value_sum), expected_value, rel_tol=tolerance, abs_tol=tolerance * 10)
        if dtype != torch.bfloat16:
            assert float(clipped) == expected_clipped


def test_surrogate_gradient_stops_outside_the_clip(ppo):
    """Inside the trust region the gradient raises log π where Â > 0; past 1 + ε (Â > 0) it is zero."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.tensor([[0.0, 0.5, -0.5]], dtype=torch.float64, requires_grad=True)  # ratios 1, e^0.5, e^-0.5
    advantages = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, _ = ppo["ppo_clipped_surrogate"](new, old, advantages, torch.ones(1, 3, dtype=torch.float64), 0.2)
    loss.backward()
    assert new.grad[0, 0] < 0  # descending the loss raises the log-prob of an advantaged token
    assert new.grad[0, 1] == 0 and new.grad[0, 2] == 0  # clipped: ratio beyond 1 ± ε in the advantage's direction


@torch.no_grad()
def test_logps_and_values_on_ragged_batches(kb, tiny):
    """The policy's per-token log-probs and values from one right-padded batch equal those of each row alone."""
    from transformers import AutoModelForCausalLM

    script = load_script_module(generated_script("ppo-rlhf"))
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    script.attach_value_head(model)
    torch.nn.init.normal_(model.value_head.linear.weight, generator=torch.Generator().manual_seed(0))
    rng = random.Random(4)
    prompts = [[rng.randint(3, 500) for _ in range(rng.randint(2, 7))] for _ in range(5)]
    completions = [[rng.randint(3, 500) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    batch = script.sequence_batch(prompts, completions, 0, torch.device("cpu"))
    logps, values = script.logps_and_values(model, batch, temperature=0.7)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
        row_logps = torch.log_softmax(out.logits[0].double() / 0.7, -1)
        row_values = model.value_head(out.hidden_states[-1][0])
        for t, token in enumerate(c):
            assert math.isclose(float(logps[i, t]), float(row_logps[len(p) - 1 + t, token]), abs_tol=1e-4)
            assert math.isclose(float(values[i, t]), float(row_values[len(p) - 1 + t]), abs_tol=1e-4)
        assert float(logps[i, len(c) :].abs().sum()) == 0 and float(values[i, len(c) :].abs().sum()) == 0
