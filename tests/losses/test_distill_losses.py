"""The soft-label KD loss of the emitted script against independent float64 computations.

For each divergence (forward_kl, reverse_kl, jsd: each compiled into its own script with --set divergence),
`kd_loss` is extracted from the compiled knowledge-distillation script and compared with plain Python loops
over the trained positions t (labels[t+1] != -100) of ragged batches:

    p^T = softmax(z / T)                       (teacher and student, same T)
    forward_kl  D = Σ_v p_T (log p_T - log p_S)          (Hinton et al. 2015, Sec. 2)
    reverse_kl  D = Σ_v p_S (log p_S - log p_T)
    jsd         D = β Σ_v p_T log(p_T / M) + (1-β) Σ_v p_S log(p_S / M),   M = β p_T + (1-β) p_S   (GKD, Eq. 1)
    loss_sum = α T² Σ_t D_t + (1 - α) Σ_t -log softmax(z_S)[y_{t+1}]       (hard labels at T = 1)

over temperatures {0.5, 1, 2, 4}, alphas {0, 0.3, 1} and (jsd) betas {0.1, 0.5, 0.9}. Tolerances: fp32
logits rel 1e-5 (abs 1e-6); bf16 logits rel 1e-5 on the same bf16 values (the function upcasts first).
The T² factor is also checked through the gradient: d(α T² KL(p_T‖p_S))/dz_S = α T (p_S - p_T).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compile_script
from script_functions import load_functions

VOCAB = 23


def compiled(kb, divergence: str):
    names = ["kl_divergence", "kd_loss"] + (["generalized_jsd"] if divergence == "jsd" else [])
    return load_functions(compile_script(kb, "knowledge-distillation", overrides=[f"divergence={divergence}"]), names)["kd_loss"]


@pytest.fixture(scope="module")
def kd(kb):
    return {d: compiled(kb, d) for d in ("forward_kl", "reverse_kl", "jsd")}


def ragged(generator, rows: int = 4, width: int = 24):
    student = 3 * torch.randn(rows, width, VOCAB, generator=generator)
    teacher = 3 * torch.randn(rows, width, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (rows, width), generator=generator)
    for row in range(rows):
        length = int(torch.randint(6, width + 1, (1,), generator=generator))
        prompt = int(torch.randint(1, length - 2, (1,), generator=generator))
        labels[row, :prompt] = -100
        labels[row, length:] = -100
    return student, teacher, labels


def softmax(z: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in z]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def reference(student, teacher, labels, divergence, alpha, temperature, beta=None) -> dict:
    d_sum = ce_sum = agree = 0.0
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            zs, zt = [float(v) for v in student[b, t]], [float(v) for v in teacher[b, t]]
            ps, pt = softmax(zs, temperature), softmax(zt, temperature)
            if divergence == "forward_kl":
                d = kl(pt, ps)
            elif divergence == "reverse_kl":
                d = kl(ps, pt)
            else:
                m = [beta * a + (1 - beta) * c for a, c in zip(pt, ps)]
                d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
            d_sum += d
            ce_sum += -math.log(softmax(zs, 1.0)[target])
            agree += float(max(range(VOCAB), key=zs.__getitem__) == max(range(VOCAB), key=zt.__getitem__))
    return {"loss": alpha * temperature**2 * d_sum + (1 - alpha) * ce_sum, "kd": d_sum, "ce": ce_sum, "agreement": agree}


CASES = [
    (divergence, alpha, temperature, beta)
    for divergence in ("forward_kl", "reverse_kl", "jsd")
    for alpha in (0.0, 0.3, 1.0)
    for temperature in (0.5, 1.0, 2.0, 4.0)
    for beta in ((0.1, 0.5, 0.9) if divergence == "jsd" else (None,))
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_matches_the_formulas(kd, dtype):
    generator = torch.Generator().manual_seed(0)
    for divergence, alpha, temperature, beta in CASES:
        student, teacher, labels = ragged(generator)
        student, teacher = student.to(dtype), teacher.to(dtype)
        kwargs = {"alpha": alpha, "temperature": temperature} | ({"jsd_beta": beta} if beta is not None else {})
        loss, metrics = kd[divergence](student, teacher, labels, **kwargs)
        expected = reference(student.double(), teacher.double(), labels, divergence, alpha, temperature, beta)
        case = (divergence, alpha, temperature, beta, dtype)
        assert math.isclose(float(loss), expected["loss"], rel_tol=1e-5, abs_tol=1e-6), (case, float(loss), expected)
        for key in ("kd", "ce", "agreement"):
            assert math.isclose(float(metrics[key]), expected[key], rel_tol=1e-5, abs_tol=1e-6), (case, key)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_forward_kl_gradient_carries_the_t_squared_factor(kd, temperature):
    """d/dz_S of α·T²·KL(p_T^T ‖ p_S^T) = α·T·(p_S^T - p_T^T): the soft term's gradients keep their size as T
    grows; the hard-label term adds (1 - α)·(softmax(z_S) - onehot(y))."""
    generator = torch.Generator().manual_seed(2)
    student, teacher, labels = ragged(generator, rows=2, width=10)
    student = student.double().requires_grad_(True)
    loss, _ = kd["forward_kl"](student, teacher.double(), labels, alpha=0.7, temperature=temperature)
    loss.backward()
    trained = torch.zeros(labels.shape, dtype=torch.bool)
    trained[:, :-1] = labels[:, 1:] != -100
    onehot = torch.zeros_like(student)
    onehot[:, :-1] = torch.nn.functional.one_hot(labels[:, 1:].clamp(min=0), VOCAB).double()
    soft = 0.7 * temperature * (torch.softmax(student.detach() / temperature, -1) - torch.softmax(teacher.double() / temperature, -1))
    expected = soft + 0.3 * (torch.softmax(student.detach(), -1) - onehot)
    assert torch.allclose(student.grad[trained], expected[trained], atol=1e-9)
    assert student.grad[~trained].abs().max() == 0


def test_generalized_jsd_tends_to_forward_and_reverse_kl_at_the_ends(kd):
    """JSD(β)/β → KL(p_T‖p_S) as β → 0 and JSD(β)/(1-β) → KL(p_S‖p_T) as β → 1 (GKD's interpolation)."""
    generator = torch.Generator().manual_seed(3)
    student, teacher, labels = ragged(generator, rows=2, width=12)
    student, teacher = student.double() / 12, teacher.double() / 2  # a flat student, a peaked teacher: KL(T‖S) != KL(S‖T)
    forward = float(kd["forward_kl"](student, teacher, labels, alpha=1.0, temperature=1.0)[1]["kd"])
    reverse = float(kd["reverse_kl"](student, teacher, labels, alpha=1.0, temperature=1.0)[1]["kd"])
    # The function computes in float32, so β cannot be tiny; at β = 1e-3 the first-order limit holds to
    # 0.2-0.4% here (the next term is of order β·E[p_T/p_S]), and forward and reverse KL differ by 13%.
    small = float(kd["jsd"](student, teacher, labels, alpha=1.0, temperature=1.0, jsd_beta=1e-3)[1]["kd"])
    large = float(kd["jsd"](student, teacher, labels, alpha=1.0, temperature=1.0, jsd_beta=1 - 1e-3)[1]["kd"])
    assert abs(forward - reverse) > 0.1 * forward
    assert math.isclose(small / 1e-3, forward, rel_tol=1e-2), (small / 1e-3, forward)
    assert math.isclose(large / 1e-3, reverse, rel_tol=1e-2), (large / 1e-3, reverse)
