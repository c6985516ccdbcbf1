"""GKD's divergence in the emitted script against an independent computation of Eq. 1 of Agarwal et al. (2024).

generalized_jsd is compared, on random logits, with a float64 loop over the vocabulary that builds P (teacher),
Q (student) and M = βP + (1−β)Q explicitly: JSD_β = β·Σ P log(P/M) + (1−β)·Σ Q log(Q/M), with β = 0 and 1 taken
as KL(P‖Q) and KL(Q‖P). gkd_loss is checked on ragged masks against the paper's per-sequence mean
(1/|y|)·Σ_n of the token divergences. Tolerances: 1e-5 (fp32 logits), 2e-2 relative (bf16 logits).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import compile_script, generated_script, load_script_module
from script_functions import load_functions


@pytest.fixture(scope="module")
def gkd(kb):
    return load_functions(compile_script(kb, "gkd"), ["generalized_jsd", "gkd_loss"])


def softmax64(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def jsd_reference(student: list[float], teacher: list[float], beta: float) -> float:
    q, p = softmax64(student), softmax64(teacher)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    if beta == 0.0:
        return kl(p, q)
    if beta == 1.0:
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_equation_1(gkd, dtype, tolerance, beta):
    generator = torch.Generator().manual_seed(int(beta * 10))
    student = (3 * torch.randn(4, 5, 37, generator=generator)).to(dtype)
    teacher = (3 * torch.randn(4, 5, 37, generator=generator)).to(dtype)
    result = gkd["generalized_jsd"](student, teacher, beta)
    assert result.shape == (4, 5) and result.dtype == torch.float32
    for i in range(4):
        for t in range(5):
            expected = jsd_reference([float(x) for x in student[i, t]], [float(x) for x in teacher[i, t]], beta)
            # the function computes in float32 from the (possibly bf16) logits, so the reference sees the same values
            assert math.isclose(float(result[i, t]), expected, rel_tol=tolerance, abs_tol=tolerance * 1e-2), (beta, i, t)


def test_generalized_jsd_is_zero_for_equal_distributions_and_bounded(gkd):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for beta in (0.0, 0.3, 1.0):
        assert float(gkd["generalized_jsd"](logits, logits, beta).abs().max()) < 1e-6
    far = torch.zeros(1, 50)
    far[0, 0] = 100.0
    near = torch.zeros(1, 50)
    near[0, 1] = 100.0
    # For 0 < β < 1 the divergence of two (almost) disjoint distributions is the entropy-like bound
    # -β log β - (1-β) log(1-β); at β = 0.5 that is log 2.
    assert math.isclose(float(gkd["generalized_jsd"](far, near, 0.5)), math.log(2), rel_tol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_loss_is_the_mean_over_each_sequences_tokens(gkd, beta):
    generator = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    lengths = [rng.randint(1, 9) for _ in range(6)]
    mask = torch.tensor([[1.0] * n + [0.0] * (9 - n) for n in lengths])
    student, teacher = (2 * torch.randn(6, 9, 23, generator=generator) for _ in range(2))
    loss = gkd["gkd_loss"](student, teacher, mask, beta=beta)
    expected = 0.0
    for i, n in enumerate(lengths):
        per_token = [jsd_reference(student[i, t].tolist(), teacher[i, t].tolist(), beta) for t in range(n)]
        expected += sum(per_token) / n
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_gkd_gradient_moves_the_student_towards_the_teacher(gkd):
    teacher = torch.tensor([[[2.0, 0.0, -1.0]]])
    student = torch.zeros(1, 1, 3, requires_grad=True)
    gkd["gkd_loss"](student, teacher, torch.ones(1, 1), beta=0.5).backward()
    assert student.grad[0, 0, 0] < 0 < student.grad[0, 0, 2]  # descending raises the teacher's favourite token


@torch.no_grad()
def test_completion_logits_on_ragged_batches(tiny):
    """The logits gathered for each completion token equal those of the row run alone, unpadded."""
    from transformers import AutoModelForCausalLM

    script = load_script_module(generated_script("gkd"))
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    rng = random.Random(6)
    prompts = [[rng.randint(3, 500) for _ in range(rng.randint(2, 7))] for _ in range(5)]
    completions = [[rng.randint(3, 500) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    batch = script.sequence_batch(prompts, completions, 0, torch.device("cpu"))
    logits = script.completion_logits(model, batch)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        alone = model(input_ids=torch.tensor([p + c])).logits[0]
        assert torch.allclose(logits[i, : len(c)], alone[len(p) - 1 : len(p) - 1 + len(c)], atol=1e-4)
