"""The unpaired losses (KTO, BCO) of the emitted scripts against independent computations of the papers'
formulas, and KTO's reference point z0 against an independent estimate.

1. kto_loss / bco_loss on random completions (mixed labels, both weights, several z0 / δ), against the
   float64 per-example formulas of reference_formulas.py: fp32 tolerance 1e-5; bf16 (inputs rounded first)
   tolerance 2% of the loss + 2^-6·sum_k |dL/dx_k|·|x_k| + 2^-7, as in test_preference_losses.py;
2. compute_loss and estimate_kl on a ragged batch of the tiny model, against log-probabilities summed in
   float64 over each row's completion positions from an unpadded forward pass of the row alone (1e-4).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import compile_script, load_script_module
from reference_formulas import UNPAIRED
from script_functions import load_functions

CASES = {
    "kto": ("kto_loss", {"beta": [0.1, 0.5], "kl": [0.0, 2.0], "desirable_weight": [1.0, 1.33], "undesirable_weight": [1.0, 0.7]}),
    "bco": ("bco_loss", {"beta": [0.01, 0.1], "delta": [0.0, 0.4, -0.3]}),
}


def grid(space: dict) -> list[dict]:
    points = [{}]
    for name, values in space.items():
        points = [dict(p, **{name: v}) for p in points for v in values]
    return points


def sensitivity(formula, lp: float, rlp: float, desirable: bool, hp: dict) -> float:
    total = 0.0
    for k in range(2):
        x = [lp, rlp]
        h = 1e-6 * max(1.0, abs(x[k]))
        up, down = list(x), list(x)
        up[k] += h
        down[k] -= h
        total += abs(formula(*up, desirable, hp) - formula(*down, desirable, hp)) / (2 * h) * abs(x[k])
    return total


@pytest.fixture(scope="module")
def functions(kb):
    return {m: load_functions(compile_script(kb, m), [name])[name] for m, (name, _) in CASES.items()}


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_function_matches_the_papers_formula(functions, method, dtype):
    name, space = CASES[method]
    for index, hp in enumerate(grid(space)):
        g = torch.Generator().manual_seed(index)
        n = torch.randint(1, 81, (64,), generator=g)
        lp = (-(0.01 + 4.99 * torch.rand(64, generator=g, dtype=torch.float64)) * n).to(dtype)
        rlp = (-(0.01 + 4.99 * torch.rand(64, generator=g, dtype=torch.float64)) * n).to(dtype)
        desirable = torch.rand(64, generator=g) < 0.5
        losses, rewards = functions[method](lp, rlp, desirable, **hp)
        assert losses.shape == (64,) and losses.dtype == dtype and not rewards.requires_grad
        for i in range(64):
            expected = UNPAIRED[method](float(lp[i]), float(rlp[i]), bool(desirable[i]), hp)
            if dtype == torch.float32:
                allowed = 1e-5 + 1e-5 * abs(expected)
            else:
                allowed = 2e-2 * abs(expected) + 2**-6 * sensitivity(UNPAIRED[method], float(lp[i]), float(rlp[i]), bool(desirable[i]), hp) + 2**-7
            assert abs(float(losses[i]) - expected) <= allowed, (method, hp, i, float(losses[i]), expected)
        beta_rewards = hp["beta"] * (lp.double() - rlp.double())
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(rewards.double(), beta_rewards, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("method", sorted(CASES))
def test_descending_the_loss_raises_desirable_and_lowers_undesirable_likelihood(functions, method):
    name, space = CASES[method]
    hp = {k: v[0] for k, v in space.items()}
    lp = torch.tensor([-20.0, -20.0], requires_grad=True)
    losses, _ = functions[method](lp, torch.tensor([-20.0, -20.0]), torch.tensor([True, False]), **hp)
    losses.sum().backward()
    assert lp.grad[0].item() < 0 < lp.grad[1].item()


def row_logps(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(prompt) + k - 1, token]) for k, token in enumerate(completion))


@pytest.fixture(scope="module")
def tiny_models(tiny):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, reference


def ragged_items(vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(7):  # prompts of 2..8 tokens, completions of 1..13, mismatched completions of other lengths
        items.append(
            {
                "prompt_ids": torch.randint(5, vocab, (2 + i,), generator=g).tolist(),
                "completion_ids": torch.randint(5, vocab, (1 + 2 * i,), generator=g).tolist(),
                "kl_completion_ids": torch.randint(5, vocab, (13 - 2 * i,), generator=g).tolist(),
                "label": i % 3 != 0,
            }
        )
    return items


@pytest.mark.parametrize("method", sorted(CASES))
def test_compute_loss_and_kl_estimate_on_a_ragged_batch(kb, tiny, tiny_models, tmp_path, method):
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    policy, reference = tiny_models
    path = tmp_path / f"train_{method}.py"
    path.write_text(compile_script(kb, method))
    script = load_script_module(path, name=f"ragged_unpaired_{method}")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    overrides = {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.8} if method == "kto" else {"beta": 0.3}
    args = script.parse_args([f"--{k}={v}" for k, v in overrides.items()])
    items = ragged_items(len(tokenizer), seed=3)
    if method == "bco":
        for item in items:
            del item["kl_completion_ids"]
    context = {"reference": reference, "accelerator": Accelerator(cpu=True), "state": {"reward_shift": 0.25, "reward_count": 8.0}}
    micro_batches = [script.collate(items[:4], tokenizer, args, torch.device("cpu")), script.collate(items[4:], tokenizer, args, torch.device("cpu"))]
    hp = dict(overrides, delta=0.25)
    if method == "kto":
        context["kl"] = script.estimate_kl(policy, micro_batches, context)
        kl_terms = [row_logps(policy, i["prompt_ids"], i["kl_completion_ids"]) - row_logps(reference, i["prompt_ids"], i["kl_completion_ids"]) for i in items]
        expected_kl = max(0.0, sum(kl_terms) / len(kl_terms))
        assert math.isclose(context["kl"], expected_kl, rel_tol=1e-4, abs_tol=1e-5), (context["kl"], expected_kl)
        hp["kl"] = context["kl"]
    total = 0.0
    with torch.no_grad():
        for batch in micro_batches:
            loss_sum, metrics = script.compute_loss(policy, batch, args, context)
            total += float(loss_sum)
    expected = sum(
        UNPAIRED[method](row_logps(policy, i["prompt_ids"], i["completion_ids"]), row_logps(reference, i["prompt_ids"], i["completion_ids"]), i["label"], hp)
        for i in items
    )
    assert math.isclose(total, expected, rel_tol=1e-4, abs_tol=1e-5), (total, expected)


def test_kto_reference_point_is_clamped_at_zero(kb, tiny, tiny_models, tmp_path):
    """With the policy equal to the reference, every mismatched log-ratio is 0 and so is z0; it never
    goes negative (the estimate is clamped), whatever the sign of the raw mean."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    _, reference = tiny_models
    path = tmp_path / "train_kto.py"
    path.write_text(compile_script(kb, "kto"))
    script = load_script_module(path, name="clamp_kto")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    args = script.parse_args([])
    batch = script.collate(ragged_items(len(tokenizer), seed=4), tokenizer, args, torch.device("cpu"))
    context = {"reference": reference, "accelerator": Accelerator(cpu=True)}
    assert script.estimate_kl(reference, [batch], context) == 0.0
    worse = copy.deepcopy(reference)
    with torch.no_grad():
        worse.lm_head.weight.mul_(3.0)  # sharper: mismatched completions become less likely than under π_ref
    raw = sum(row_logps(worse, p, c) - row_logps(reference, p, c) for p, c in ((i["prompt_ids"], i["kl_completion_ids"]) for i in ragged_items(len(tokenizer), seed=4)))
    assert raw < 0 and script.estimate_kl(worse, [batch], context) == 0.0
