"""The loss functions of the preference zoo against independent computations of the papers' formulas.

Two levels, both on the exact code users run (extracted from, or imported from, compiled scripts):

1. the named loss function (`ipo_loss`, `simpo_loss`, ...) on random per-pair inputs with ragged completion
   lengths, against the float64 per-example formulas of reference_formulas.py, in fp32 (tolerance 1e-5
   relative and absolute) and in bf16 (the inputs are rounded to bf16 first and the formula is evaluated on
   the rounded values; tolerance: 2% of the loss, plus 2^-6 times its first-order sensitivity to rounding,
   sum_k |dL/dx_k|·|x_k| by central differences of the float64 formula, plus 2^-7 (one bf16 step at 1),
   because bf16 arithmetic keeps 8 significant bits of every intermediate: β·log-ratios of 20 nats are off
   by ~0.1, and 1 - σ(x) is 0 once σ(x) rounds to 1);
2. the whole compute_loss (forward pass, completion masks, padding, token counts, loss) on a ragged batch of
   the tiny model, against log-probabilities summed in float64 over each row's completion positions taken
   from an unpadded forward pass of that row alone (tolerance 1e-4 relative).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import compile_script, load_script_module
from reference_formulas import PREFERENCE
from script_functions import load_functions

# method -> (loss function name, how the family's compute_loss calls it, hyperparameter grid, logged reward)
REF = ("c", "r", "rc", "rr")
CASES = {
    "dpo": ("dpo_loss", REF, {"beta": [0.01, 0.1, 0.5]}, "ratio"),
    "step-dpo": ("step_dpo_loss", REF, {"beta": [0.1, 0.5]}, "ratio"),
    "ipo": ("ipo_loss", REF + ("nc", "nr"), {"beta": [0.1, 0.5, 1.0]}, "ratio"),
    "cdpo": ("cdpo_loss", REF, {"beta": [0.1, 0.5], "label_smoothing": [0.0, 0.1, 0.3]}, "ratio"),
    "robust-dpo": ("robust_dpo_loss", REF, {"beta": [0.1, 0.5], "label_smoothing": [0.0, 0.1, 0.3]}, "ratio"),
    "slic": ("slic_loss", ("c", "r", "nll_sum"), {"delta": [0.0, 1.0, 5.0], "regularization_weight": [0.0, 0.1]}, "logp"),
    "nca": ("nca_pair_loss", REF, {"beta": [0.01, 0.1]}, "ratio"),
    "bco-pair": ("bco_pair_loss", REF, {"beta": [0.01, 0.1], "delta": [0.0, 0.3, -0.2]}, "ratio"),
    "sppo-hard": ("sppo_hard_loss", REF, {"beta": [0.001, 0.1]}, "ratio"),
    "apo-zero": ("apo_zero_loss", REF, {"beta": [0.1, 0.5]}, "ratio"),
    "apo-down": ("apo_down_loss", REF, {"beta": [0.1, 0.5]}, "ratio"),
    "simpo": ("simpo_loss", ("c", "r", "nc", "nr"), {"beta": [2.5, 10.0], "gamma": [0.0, 1.375]}, "mean"),
    "cpo": ("cpo_loss", ("c", "r", "nll_mean"), {"beta": [0.1, 0.5], "alpha": [0.0, 1.0]}, "logp"),
    "orpo": ("orpo_loss", ("c", "r", "nc", "nr", "nll_mean"), {"beta": [0.1, 1.0]}, "mean"),
    "rdpo": ("rdpo_loss", REF + ("nc", "nr"), {"beta": [0.1, 0.5], "alpha": [0.0, 0.01, 0.5]}, "ratio"),
}
# The taxonomy's names of hyperparameters whose loss-function argument is named differently.
TAXONOMY_NAME = {"gamma": "simpo_gamma", "alpha": {"cpo": "cpo_alpha", "rdpo": "alpha"}}


def grid(space: dict) -> list[dict]:
    points = [{}]
    for name, values in space.items():
        points = [dict(p, **{name: v}) for p in points for v in values]
    return points


def taxonomy_hp(method: str, hp: dict) -> dict:
    out = {}
    for name, value in hp.items():
        alias = TAXONOMY_NAME.get(name, name)
        out[alias[method] if isinstance(alias, dict) else alias] = value
    return out


def random_pairs(n: int, dtype: torch.dtype, seed: int) -> dict:
    """Summed log-probs of ragged completions (1..80 tokens, per-token averages in [-5, -0.01])."""
    g = torch.Generator().manual_seed(seed)
    nc, nr = torch.randint(1, 81, (n,), generator=g), torch.randint(1, 81, (n,), generator=g)
    per_token = lambda: -(0.01 + 4.99 * torch.rand(n, generator=g, dtype=torch.float64))  # noqa: E731
    t = {"c": per_token() * nc, "r": per_token() * nr, "rc": per_token() * nc, "rr": per_token() * nr}
    t = {k: v.to(dtype) for k, v in t.items()}  # what the loss sees (rounded in bf16)
    t.update(nc=nc, nr=nr)
    t["nll_sum"] = -t["c"]
    t["nll_mean"] = (-t["c"].double() / nc).to(dtype)
    return t


@pytest.fixture(scope="module")
def functions(kb):
    return {m: load_functions(compile_script(kb, m), [name] + (["log1mexp"] if m == "orpo" else []))[name] for m, (name, *_rest) in CASES.items()}


def rounding_sensitivity(formula, x: list[float], nc: int, nr: int, hp: dict) -> float:
    """sum_k |dL/dx_k|·|x_k| over the four log-probabilities, by central differences in float64."""
    total = 0.0
    for k in range(4):
        h = 1e-6 * max(1.0, abs(x[k]))
        up, down = list(x), list(x)
        up[k] += h
        down[k] -= h
        total += abs(formula(*up, nc, nr, hp) - formula(*down, nc, nr, hp)) / (2 * h) * abs(x[k])
    return total


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_function_matches_the_papers_formula(functions, method, dtype):
    name, inputs, space, reward_kind = CASES[method]
    fn = functions[method]
    formula = PREFERENCE[method]
    for index, hp in enumerate(grid(space)):
        t = random_pairs(64, dtype, seed=index)
        losses, chosen_rewards, rejected_rewards = fn(*(t[k] for k in inputs), **hp)
        assert losses.shape == (64,) and losses.dtype == dtype
        formula_hp = taxonomy_hp(method, hp)
        for i in range(64):
            x = [float(t[k][i]) for k in ("c", "r", "rc", "rr")]
            nc, nr = int(t["nc"][i]), int(t["nr"][i])
            expected = formula(*x, nc, nr, formula_hp)
            if dtype == torch.float32:
                allowed = 1e-5 + 1e-5 * abs(expected)
            else:
                allowed = 2e-2 * abs(expected) + 2**-6 * rounding_sensitivity(formula, x, nc, nr, formula_hp) + 2**-7
            assert abs(float(losses[i]) - expected) <= allowed, (method, hp, i, float(losses[i]), expected, allowed)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        scale = formula_hp.get("beta", 1.0)
        reward = {
            "ratio": lambda lp, ref, n: scale * (lp.double() - ref.double()),
            "logp": lambda lp, ref, n: (scale if method == "cpo" else 1.0) * lp.double(),
            "mean": lambda lp, ref, n: scale * lp.double() / n,
        }[reward_kind]
        assert torch.allclose(chosen_rewards.double(), reward(t["c"], t["rc"], t["nc"]), rtol=tolerance, atol=tolerance)
        assert torch.allclose(rejected_rewards.double(), reward(t["r"], t["rr"], t["nr"]), rtol=tolerance, atol=tolerance)
        assert not chosen_rewards.requires_grad


@pytest.mark.parametrize("method", sorted(CASES))
def test_descending_the_loss_prefers_the_chosen_completion(functions, method):
    """At equal log-probabilities, one gradient step raises the chosen and lowers the rejected likelihood
    (APO-down, whose chosen gradient vanishes there by design, only lowers the rejected one)."""
    name, inputs, space, _ = CASES[method]
    hp = {k: v[-1] for k, v in space.items()}
    t = {k: torch.tensor([-20.0], requires_grad=k in ("c", "r")) for k in ("c", "r", "rc", "rr")}
    t.update(nc=torch.tensor([10]), nr=torch.tensor([10]))
    t["nll_sum"], t["nll_mean"] = -t["c"], -t["c"] / 10
    losses, _, _ = functions[method](*(t[k] for k in inputs), **hp)
    losses.sum().backward()
    assert t["r"].grad.item() > 0, method
    if method == "apo-down":
        assert abs(t["c"].grad.item()) < 1e-7
    else:
        assert t["c"].grad.item() < 0, method


def test_orpo_log1mexp_is_finite_with_finite_gradients_near_zero(kb):
    log1mexp = load_functions(compile_script(kb, "orpo"), ["log1mexp"])["log1mexp"]
    x = torch.tensor([-1e-6, -1e-3, -0.5, -0.7, -5.0, -60.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(y, expected, rtol=1e-12)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------
# compute_loss on a ragged batch of the tiny model
# ------------------------------------------------------------------------------------------------


def row_logps(model, prompt: list[int], completion: list[int]) -> float:
    """log π(completion | prompt), summed in float64 from an unpadded forward pass of this row alone."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(prompt) + k - 1, token]) for k, token in enumerate(completion))


@pytest.fixture(scope="module")
def tiny_models(tiny):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # a policy that has moved away from π_ref
    return policy, reference


@pytest.mark.parametrize("method", sorted(CASES))
def test_compute_loss_on_a_ragged_batch(kb, tiny, tiny_models, tmp_path, method):
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    policy, reference = tiny_models
    path = tmp_path / f"train_{method.replace('-', '_')}.py"
    path.write_text(compile_script(kb, method))
    script = load_script_module(path, name=f"ragged_{method.replace('-', '_')}")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    hp_values = {k: v[-1] for k, v in CASES[method][2].items()}
    hp = taxonomy_hp(method, hp_values)
    # bco-pair's δ is not a hyperparameter but the loss's running state (set in `context` below)
    argv = [f"--{k}={v}" for k, v in hp.items() if not (method == "bco-pair" and k == "delta")]
    argv += ["--model_name_or_path", str(tiny / "model")]
    args = script.parse_args(argv)
    g = torch.Generator().manual_seed(7)
    vocab = len(tokenizer)
    items = []
    for i in range(6):  # prompts of 3..9 tokens, completions of 1..12: every row has a different length
        prompt = torch.randint(5, vocab, (3 + i,), generator=g).tolist()
        chosen = torch.randint(5, vocab, (1 + 2 * i,), generator=g).tolist()
        rejected = torch.randint(5, vocab, (12 - 2 * i,), generator=g).tolist()
        items.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    batch = script.collate(items, tokenizer, args, torch.device("cpu"))
    context = {"reference": reference, "accelerator": Accelerator(cpu=True), "state": {"reward_shift": hp.get("delta", 0.0), "reward_count": 1.0}}
    with torch.no_grad():
        loss_sum, metrics = script.compute_loss(policy, batch, args, context)
    expected = 0.0
    for item in items:
        c = row_logps(policy, item["prompt_ids"], item["chosen_ids"])
        r = row_logps(policy, item["prompt_ids"], item["rejected_ids"])
        rc = row_logps(reference, item["prompt_ids"], item["chosen_ids"])
        rr = row_logps(reference, item["prompt_ids"], item["rejected_ids"])
        expected += PREFERENCE[method](c, r, rc, rr, len(item["chosen_ids"]), len(item["rejected_ids"]), hp)
    assert math.isclose(float(loss_sum), expected, rel_tol=1e-4, abs_tol=1e-4), (method, float(loss_sum), expected)
    chosen_sum = sum(row_logps(policy, i["prompt_ids"], i["chosen_ids"]) for i in items)
    assert math.isclose(float(metrics["logps/chosen"]), chosen_sum, rel_tol=1e-4)
