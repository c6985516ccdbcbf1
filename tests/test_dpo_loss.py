"""The DPO loss of the emitted script against an independent computation of Eq. 7 (Rafailov et al. 2023).

The function under test is extracted from a compiled script (the exact code users run), then compared with
a plain-Python evaluation of -log σ(β[(log π_w - log π_ref,w) - (log π_l - log π_ref,l)]) on random inputs,
in fp32 and bf16.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compile_script
from script_functions import load_functions


def eq7(chosen, rejected, ref_chosen, ref_rejected, beta):
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return math.log1p(math.exp(-margin)) if margin > -30 else -margin  # -log σ(m), stable


@pytest.fixture(scope="module")
def dpo(kb):
    return load_functions(compile_script(kb, "dpo"), ["dpo_loss"])["dpo_loss"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_dpo_loss_matches_equation_7(dpo, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    for beta in (0.01, 0.1, 0.5):
        logps = [(-200 * torch.rand(64, generator=generator)).to(dtype) for _ in range(4)]
        losses, chosen_rewards, rejected_rewards = dpo(*logps, beta=beta)
        expected = torch.tensor([eq7(*(float(x[i]) for x in logps), beta) for i in range(64)], dtype=torch.float64)
        assert torch.allclose(losses.double(), expected, rtol=tolerance, atol=tolerance)
        assert torch.allclose(chosen_rewards.double(), beta * (logps[0].double() - logps[2].double()), rtol=tolerance, atol=tolerance)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down(dpo):
    chosen, rejected = torch.tensor([-10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    losses, _, _ = dpo(chosen, rejected, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descending the loss raises chosen, lowers rejected
    assert math.isclose(losses.item(), math.log(2), rel_tol=1e-6)
