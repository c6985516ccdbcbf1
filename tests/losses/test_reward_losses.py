"""The reward-model loss of the emitted script against an independent computation of its formula:

    L = -log σ( r(x, y_w) - r(x, y_l) - m ) + η · ( r(x, y_w) + r(x, y_l) )²

(Ouyang et al. 2022 Eq. 1 for one comparison; Llama 2 Eq. 2 margin m; Eisenstein et al. 2023 centring η).
First the named loss function on random rewards in fp32 and bf16, then the whole compute_loss on the tiny model
with ragged pairs, where the reference scores each sequence alone, unpadded, from the backbone's last hidden
state (so it relies on neither padding nor transformers' last-non-pad lookup).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import compile_script, generated_script, load_script_module
from script_functions import load_functions


def reference_loss(chosen: float, rejected: float, margin: float, eta: float) -> float:
    d = chosen - rejected - margin
    nll = math.log1p(math.exp(-d)) if d > -30 else -d  # -log σ(d), stable
    return nll + eta * (chosen + rejected) ** 2


@pytest.fixture(scope="module")
def bradley_terry(kb):
    return load_functions(compile_script(kb, "reward-model"), ["bradley_terry_loss"])["bradley_terry_loss"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("eta", [0.0, 0.01, 0.5])
@pytest.mark.parametrize("with_margin", [False, True])
def test_loss_matches_the_formula(bradley_terry, dtype, tolerance, eta, with_margin):
    generator = torch.Generator().manual_seed(0)
    chosen = (4 * torch.randn(128, generator=generator)).to(dtype)
    rejected = (4 * torch.randn(128, generator=generator)).to(dtype)
    margin = (3 * torch.rand(128, generator=generator)).to(dtype) if with_margin else torch.zeros(128, dtype=dtype)
    losses = bradley_terry(chosen, rejected, margin, eta)
    expected = torch.tensor([reference_loss(float(c), float(r), float(m), eta) for c, r, m in zip(chosen, rejected, margin)], dtype=torch.float64)
    assert losses.shape == (128,)
    # fp32: relative 1e-5; bf16 (computed in bf16 throughout): relative 3e-2 plus 3e-2 absolute.
    assert torch.allclose(losses.double(), expected, rtol=tolerance, atol=tolerance if dtype == torch.bfloat16 else 1e-6)


def test_gradient_matches_the_derivative(bradley_terry):
    """dL/dr_w = -σ(m - Δ) + 2η(r_w + r_l), dL/dr_l = σ(m - Δ) + 2η(r_w + r_l), Δ = r_w - r_l."""
    chosen = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.5, -2.0], dtype=torch.float64, requires_grad=True)
    margin, eta = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64), 0.2
    bradley_terry(chosen, rejected, margin, eta).sum().backward()
    for i in range(3):
        c, r, m = float(chosen[i]), float(rejected[i]), float(margin[i])
        s = 1 / (1 + math.exp(-(m - (c - r))))
        assert math.isclose(float(chosen.grad[i]), -s + 2 * eta * (c + r), rel_tol=1e-12)
        assert math.isclose(float(rejected.grad[i]), s + 2 * eta * (c + r), rel_tol=1e-12)


@pytest.fixture(scope="module")
def tiny_reward(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny / "model", num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards of order 1, so every term of the loss matters
    return model.eval(), tokenizer


@pytest.mark.parametrize("eta, margins", [(0.0, None), (0.3, [0.0, 1.5, 3.0, 0.5, 2.0, 0.25, 1.0])])
def test_compute_loss_on_ragged_pairs_matches_unpadded_scoring(tiny, tiny_reward, eta, margins):
    model, tokenizer = tiny_reward
    script = load_script_module(generated_script("reward-model"))
    flags = ["--model_name_or_path", str(tiny / "model"), "--center_rewards_coefficient", str(eta)]
    if margins:
        flags += ["--use_margin", "true"]
    args = script.parse_args(flags)
    rows = [json.loads(line) for line in (tiny / "data" / "preference.jsonl").read_text().splitlines()][:7]
    for i, row in enumerate(rows):  # ragged: string and message prompts, responses of different lengths
        row["chosen"] = row["chosen"] + " Very kind." * i
        if margins:
            row["margin"] = margins[i]
    encoder = script.ChatEncoder(tokenizer)
    items = [script.encode_row(row, f"row {i}", encoder, args) for i, row in enumerate(rows)]
    assert len({len(i["chosen_ids"]) for i in items}) > 3
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    with torch.no_grad():
        loss_sum, metrics = script.compute_loss(model, batch, args, {})

        def alone(ids: list[int]) -> float:
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
            return float(model.score.weight.double()[0] @ hidden)

        expected, correct = 0.0, 0
        for i, item in enumerate(items):
            c, r = alone(item["chosen_ids"]), alone(item["rejected_ids"])
            expected += reference_loss(c, r, margins[i] if margins else 0.0, eta)
            correct += c > r
    assert math.isclose(float(loss_sum), expected, rel_tol=1e-5), (float(loss_sum), expected)
    assert float(metrics["accuracy"]) == correct
