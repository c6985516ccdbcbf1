"""The SFT loss of the emitted script against an independent token-level computation.

`causal_lm_loss` is extracted from the compiled sft script (the code users run) and compared with plain
Python float64 loops over the same logits: for every position t whose next label y_{t+1} is trained
(not -100), -log softmax(z_t)[y_{t+1}] = logsumexp(z_t) - z_t[y_{t+1}]. The rows are ragged (random prompt
masks, random lengths, right padding), as in a real micro-batch. The script returns the sum; dividing by the
number of trained tokens gives the paper's token-level mean (Ouyang et al. 2022, Sec. 3.5), which is what
the training loop does with the step's global count.

Tolerances: fp32 logits, rel 1e-6 on the sum; bf16 logits, rel 1e-5. Both sides read the same bf16 values;
the tolerance holds only because the function upcasts before it reduces (the same cross-entropy reduced in
bf16 is off by 9e-4 to 3e-3 relative on these batches of 100-250 tokens). The gradient is checked against the analytic softmax(z) - onehot(y) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compile_script
from script_functions import load_functions

VOCAB = 37


@pytest.fixture(scope="module", params=["sft", "instruction-tuning", "continued-pretraining", "distillation-hard"])
def causal_lm_loss(kb, request):
    return load_functions(compile_script(kb, request.param), ["causal_lm_loss"])["causal_lm_loss"]


def ragged_batch(generator, rows: int = 8, width: int = 80):
    """Logits [rows, width, VOCAB] and labels with a random prompt mask, random length and padding per row."""
    logits = 4 * torch.randn(rows, width, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (rows, width), generator=generator)
    for row in range(rows):
        length = int(torch.randint(8, width + 1, (1,), generator=generator))
        prompt = int(torch.randint(1, length - 2, (1,), generator=generator))
        labels[row, :prompt] = -100
        labels[row, length:] = -100
    labels[0, 30:40] = -100  # a masked span inside a row (a user turn between two assistant turns)
    return logits, labels


def reference_sum(logits, labels) -> tuple[float, int]:
    total, count = 0.0, 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            z = [float(v) for v in logits[b, t]]
            top = max(z)
            total += top + math.log(sum(math.exp(v - top) for v in z)) - z[target]
            count += 1
    return total, count


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.bfloat16, 1e-5)])
def test_summed_token_cross_entropy_matches_the_loops(causal_lm_loss, dtype, rel):
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, labels = ragged_batch(generator)
        logits = logits.to(dtype)
        got = float(causal_lm_loss(logits, labels))
        expected, count = reference_sum(logits.double(), labels)
        assert count == int((labels[:, 1:] != -100).sum()) > 80  # the loop's normaliser counts the same tokens
        assert math.isclose(got, expected, rel_tol=rel), (got, expected)
        assert math.isclose(got / count, expected / count, rel_tol=rel)  # the token-level mean


def test_gradient_is_softmax_minus_onehot_on_trained_positions_only(causal_lm_loss):
    generator = torch.Generator().manual_seed(1)
    logits, labels = ragged_batch(generator, rows=3, width=20)
    logits = logits.double().requires_grad_(True)
    causal_lm_loss(logits, labels).backward()
    expected = torch.zeros_like(logits)
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            target = int(labels[b, t + 1])
            if target != -100:
                expected[b, t] = torch.softmax(logits[b, t].detach(), -1)
                expected[b, t, target] -= 1
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert logits.grad[:, -1].abs().max() == 0  # the last position predicts nothing
