"""The policy-gradient losses and advantage estimators of the emitted scripts against independent computations.

Every function under test is extracted from a compiled script (the code users run). The references below
are written from the papers' equations as scalar loops over completions and tokens in float64 (torch scalars,
so autograd also gives the reference gradient); they share no code with the templates. Inputs are random,
with ragged completion lengths (masks), old/reference log-probs near the current ones so that some ratios
fall outside the clip range, and both signs of advantages.

Tolerances: float32 inputs, 1e-5 relative (values) and 1e-4 relative (gradients); bfloat16 inputs, 3e-2
relative to the largest magnitude (the functions then compute in bfloat16; the scripts themselves always
pass float32 log-probabilities).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compile_script
from script_functions import load_functions

ROWS, TOKENS = 7, 9


@pytest.fixture(scope="module")
def functions(kb):
    wanted = {
        "grpo": ["grpo_loss", "group_advantages"],
        "dr-grpo": ["dr_grpo_loss", "group_advantages"],
        "dapo": ["dapo_loss", "dapo_reward", "group_advantages"],
        "gspo": ["gspo_loss", "group_advantages"],
        "rloo": ["rloo_loss", "rloo_advantages"],
        "reinforce-pp": ["reinforce_pp_loss", "reinforce_pp_advantages"],
        "remax": ["remax_loss", "remax_advantages"],
    }
    found = {}
    for method, names in wanted.items():
        for name, fn in load_functions(compile_script(kb, method), names).items():
            found[(method, name)] = fn
    return found


def loss_with_type(kb, method: str, loss_type: str, name: str):
    return load_functions(compile_script(kb, method, overrides=[f"loss_type={loss_type}"]), [name])[name]


def random_batch(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, TOKENS + 1, (ROWS,), generator=g)
    lengths[0] = TOKENS  # at least one full row so the padded width is TOKENS
    mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).float()
    logps = -3 * torch.rand(ROWS, TOKENS, generator=g)
    old = logps + 0.4 * torch.randn(ROWS, TOKENS, generator=g)
    ref = logps + 0.5 * torch.randn(ROWS, TOKENS, generator=g)
    advantages = torch.randn(ROWS, generator=g)
    token_advantages = torch.randn(ROWS, TOKENS, generator=g)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return {
        "logps": cast(logps * mask), "old": cast(old * mask), "ref": cast(ref * mask), "mask": mask.to(dtype),
        "advantages": cast(advantages), "token_advantages": cast(token_advantages * mask), "lengths": lengths.tolist(),
    }


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def clip(x, low, high):
    return torch.clamp(x, low, high)


# ------------------------------------------------------------------------------------------------------
# Independent references (scalar loops, float64)
# ------------------------------------------------------------------------------------------------------


def reference_clipped(batch, eps_low, eps_high, beta, aggregation, max_len=None, sequence_ratio=False, kl=True):
    """GRPO Eq. 3 / DAPO Eq. 8 / Dr. GRPO / GSPO Eq. 5 written token by token. Returns (loss, d loss / d logps)."""
    logps = leaf(batch["logps"].double())
    old, ref, adv = batch["old"].double(), batch["ref"].double(), batch["advantages"].double()
    per_row, total_tokens = [], 0
    for i, n in enumerate(batch["lengths"]):
        a = adv[i]
        if sequence_ratio:  # GSPO Eq. 7: exp of the mean token log-ratio
            mean_log_ratio = sum(logps[i, t] - old[i, t] for t in range(n)) / n
            s = torch.exp(mean_log_ratio)
            seq_term = -torch.minimum(s * a, clip(s, 1 - eps_low, 1 + eps_high) * a)
        terms = []
        for t in range(n):
            if sequence_ratio:
                term = seq_term
            else:
                rho = torch.exp(logps[i, t] - old[i, t])
                term = -torch.minimum(rho * a, clip(rho, 1 - eps_low, 1 + eps_high) * a)
            if kl and beta > 0:
                x = ref[i, t] - logps[i, t]
                term = term + beta * (torch.exp(x) - x - 1)
            terms.append(term)
        per_row.append(terms)
        total_tokens += n
    if aggregation == "grpo":
        loss = sum(sum(terms) / len(terms) for terms in per_row)
    elif aggregation == "dapo":
        loss = sum(sum(terms) for terms in per_row)
    elif aggregation == "dr_grpo":
        loss = sum(sum(terms) for terms in per_row) / max_len
    elif aggregation == "bnpo":
        loss = sum(sum(terms) for terms in per_row) / total_tokens
    loss.backward()
    return loss.item(), logps.grad


def close(value, expected, dtype, scale=1.0):
    if dtype == torch.float32:
        return math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-6 * scale)
    return abs(value - expected) <= 3e-2 * max(abs(expected), scale)


def grads_close(got, expected, dtype, batch=None, eps=(0.2, 0.2), level="token"):
    """Gradients agree. In bfloat16 a ratio within bf16 precision (1%) of a clip boundary may land on the
    other side of it, which switches that token's gradient on or off: such tokens are left out."""
    got = got.double()
    scale = expected.abs().max().item()
    if dtype == torch.float32:
        return torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * max(scale, 1.0))
    keep = torch.ones_like(expected, dtype=torch.bool)
    if batch is not None:
        log_ratio = batch["logps"].double() - batch["old"].double()
        if level == "sequence":
            log_ratio = (log_ratio * batch["mask"].double()).sum(-1, keepdim=True).expand_as(log_ratio)
        ratio = torch.exp(log_ratio)
        keep = ((ratio - (1 - eps[0])).abs() > 0.01) & ((ratio - (1 + eps[1])).abs() > 0.01)
    return ((got - expected).abs() * keep).max().item() <= 3e-2 * max(scale, 1e-3)


DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_eq3_for_every_aggregation(kb, loss_type, beta, dtype):
    fn = loss_with_type(kb, "grpo", loss_type, "grpo_loss")
    for seed in range(3):
        batch = random_batch(seed, dtype)
        logps = leaf(batch["logps"])
        kwargs = {"max_completion_length": 12} if loss_type == "dr_grpo" else {}
        loss, metrics = fn(logps, batch["old"], batch["ref"] if beta > 0 else None, batch["advantages"], batch["mask"], epsilon=0.2, beta=beta, **kwargs)
        loss.backward()
        expected, expected_grad = reference_clipped(batch, 0.2, 0.2, beta, loss_type, max_len=12)
        assert close(loss.item(), expected, dtype), (loss_type, loss.item(), expected)
        assert grads_close(logps.grad * batch["mask"], expected_grad, dtype, batch)
        assert ("kl" in metrics) == (beta > 0)
        assert 0 < metrics["clip_fraction"].item()  # the random ratios do leave the clip range


@pytest.mark.parametrize("dtype", DTYPES)
def test_dr_grpo_loss_divides_by_the_constant_budget(functions, dtype):
    fn = functions[("dr-grpo", "dr_grpo_loss")]
    for seed in range(3):
        batch = random_batch(seed, dtype)
        logps = leaf(batch["logps"])
        loss, _ = fn(logps, batch["old"], None, batch["advantages"], batch["mask"], epsilon=0.2, beta=0.0, max_completion_length=3000)
        loss.backward()
        expected, expected_grad = reference_clipped(batch, 0.2, 0.2, 0.0, "dr_grpo", max_len=3000)
        assert close(loss.item(), expected, dtype, scale=1e-3)
        assert grads_close(logps.grad * batch["mask"], expected_grad, dtype, batch)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dapo_loss_matches_eq8_with_clip_higher(functions, dtype):
    fn = functions[("dapo", "dapo_loss")]
    for seed in range(3):
        batch = random_batch(seed, dtype)
        logps = leaf(batch["logps"])
        loss, metrics = fn(logps, batch["old"], batch["advantages"], batch["mask"], epsilon_low=0.2, epsilon_high=0.28)
        loss.backward()
        expected, expected_grad = reference_clipped(batch, 0.2, 0.28, 0.0, "dapo", kl=False)
        assert close(loss.item(), expected, dtype)
        assert grads_close(logps.grad * batch["mask"], expected_grad, dtype, batch, eps=(0.2, 0.28))
        assert set(metrics) == {"clip_fraction/low", "clip_fraction/high"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_loss_matches_eq5_with_the_sequence_ratio_of_eq7(functions, dtype, beta):
    fn = functions[("gspo", "gspo_loss")]
    for seed in range(3):
        batch = random_batch(seed, dtype)
        # GSPO's clip range is tiny (3e-4 / 4e-4): use old log-probs that put some sequence ratios inside it.
        batch["old"] = (batch["logps"].double() + 1e-4 * torch.randn(ROWS, TOKENS, generator=torch.Generator().manual_seed(seed))).to(dtype) * batch["mask"]
        logps = leaf(batch["logps"])
        loss, metrics = fn(logps, batch["old"], batch["ref"] if beta > 0 else None, batch["advantages"], batch["mask"], epsilon_low=3e-4, epsilon_high=4e-4, beta=beta)
        loss.backward()
        expected, expected_grad = reference_clipped(batch, 3e-4, 4e-4, beta, "grpo", sequence_ratio=True)
        assert close(loss.item(), expected, dtype)
        if dtype == torch.float32:  # bf16 cannot resolve ratios within 4e-4 of 1
            assert grads_close(logps.grad * batch["mask"], expected_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rloo_loss_is_the_sequence_level_reinforce_estimator(functions, dtype):
    fn = functions[("rloo", "rloo_loss")]
    for seed in range(3):
        batch = random_batch(seed, dtype)
        logps = leaf(batch["logps"])
        loss, _ = fn(logps, batch["old"], batch["advantages"], batch["mask"], epsilon=0.2)
        loss.backward()
        ref_logps = leaf(batch["logps"].double())
        total = 0.0
        for i, n in enumerate(batch["lengths"]):
            log_ratio = sum(ref_logps[i, t] - batch["old"][i, t].double() for t in range(n))
            rho, a = torch.exp(log_ratio), batch["advantages"][i].double()
            total = total - torch.minimum(rho * a, clip(rho, 0.8, 1.2) * a)
        total.backward()
        assert close(loss.item(), total.item(), dtype)
        assert grads_close(logps.grad * batch["mask"], ref_logps.grad, dtype, batch, level="sequence")
    # On-policy (π_old = π_θ): the gradient is exactly -A_i on every token of completion i.
    batch = random_batch(7)
    logps = leaf(batch["logps"])
    loss, _ = fn(logps, batch["logps"].detach(), batch["advantages"], batch["mask"], epsilon=0.2)
    loss.backward()
    assert torch.allclose(logps.grad, -batch["advantages"][:, None] * batch["mask"], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reinforce_pp_loss_is_the_token_clipped_surrogate(functions, dtype):
    fn = functions[("reinforce-pp", "reinforce_pp_loss")]
    for seed in range(3):
        batch = random_batch(seed, dtype)
        logps = leaf(batch["logps"])
        loss, _ = fn(logps, batch["old"], batch["token_advantages"], batch["mask"], epsilon=0.2)
        loss.backward()
        ref_logps = leaf(batch["logps"].double())
        total = 0.0
        for i, n in enumerate(batch["lengths"]):
            for t in range(n):
                rho, a = torch.exp(ref_logps[i, t] - batch["old"][i, t].double()), batch["token_advantages"][i, t].double()
                total = total - torch.minimum(rho * a, clip(rho, 0.8, 1.2) * a)
        total.backward()
        assert close(loss.item(), total.item(), dtype)
        assert grads_close(logps.grad * batch["mask"], ref_logps.grad, dtype, batch)


@pytest.mark.parametrize("dtype", DTYPES)
def test_remax_loss_gradient_is_algorithm_1(functions, dtype):
    fn = functions[("remax", "remax_loss")]
    batch = random_batch(3, dtype)
    logps = leaf(batch["logps"])
    loss, _ = fn(logps, batch["advantages"], batch["mask"])
    loss.backward()
    expected = -sum(batch["advantages"][i].double() * sum(batch["logps"][i, t].double() for t in range(n)) for i, n in enumerate(batch["lengths"]))
    assert close(loss.item(), float(expected), dtype)
    # ∇ = −(r − r̄) on every sampled token (Algorithm 1), 0 on padding
    assert grads_close(logps.grad, (-batch["advantages"][:, None] * batch["mask"]).double(), dtype)


# ------------------------------------------------------------------------------------------------------
# Advantage estimators
# ------------------------------------------------------------------------------------------------------


def sample_std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_follow_deepseekmath_4_1_2(functions, scale):
    fn = functions[("grpo", "group_advantages")]
    rng = torch.Generator().manual_seed(0)
    G = 5
    rewards = torch.randint(0, 3, (4 * G,), generator=rng).double().tolist()
    rewards[:G] = [1.0] * G  # one all-equal group: advantages must be exactly 0
    got = fn(rewards, G, scale)
    for g in range(4):
        group = rewards[g * G : (g + 1) * G]
        mean = sum(group) / G
        for j, r in enumerate(group):
            if scale == "group":
                want = (r - mean) / (sample_std(group) + 1e-4)
            elif scale == "batch":
                want = (r - mean) / (sample_std(rewards) + 1e-4)
            else:
                want = r - mean
            assert math.isclose(got[g * G + j], want, rel_tol=1e-12, abs_tol=1e-12)
    assert got[:G] == [0.0] * G
    # the emitted DAPO and GSPO estimators are the 'group' case without the option
    for method in ("dapo", "gspo"):
        assert functions[(method, "group_advantages")](rewards, G) == fn(rewards, G, "group")


def test_rloo_advantages_are_leave_one_out(functions):
    fn = functions[("rloo", "rloo_advantages")]
    rng = torch.Generator().manual_seed(1)
    k = 4
    rewards = torch.rand(3 * k, generator=rng).tolist()
    kls = (torch.rand(3 * k, generator=rng) * 5).tolist()
    for beta in (0.0, 0.05):
        got = fn(rewards, kls, k, beta, False)
        shaped = [r - beta * kl for r, kl in zip(rewards, kls)]
        for i in range(len(rewards)):
            g = i // k
            others = [shaped[j] for j in range(g * k, (g + 1) * k) if j != i]
            assert math.isclose(got[i], shaped[i] - sum(others) / (k - 1), rel_tol=1e-12, abs_tol=1e-12)
    normalised = fn(rewards, kls, k, 0.05, True)
    raw = fn(rewards, kls, k, 0.05, False)
    m = sum(raw) / len(raw)
    for a, b in zip(normalised, raw):
        assert math.isclose(a, (b - m) / (sample_std(raw) + 1e-4), rel_tol=1e-12)


@pytest.mark.parametrize("group_baseline", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_advantages_are_kl_shaped_returns_normalised_over_the_batch(functions, group_baseline, gamma):
    fn = functions[("reinforce-pp", "reinforce_pp_advantages")]
    rng = torch.Generator().manual_seed(2)
    k, beta = 2, 0.1
    lengths = [3, 1, 5, 2, 4, 4]
    rewards = torch.rand(len(lengths), generator=rng).tolist()
    old = [(-torch.rand(n, generator=rng)).tolist() for n in lengths]
    ref = [(-torch.rand(n, generator=rng)).tolist() for n in lengths]
    got = fn(rewards, old, ref, k, beta, gamma, group_baseline, lengths)
    r = list(rewards)
    if group_baseline:
        r = [rewards[i] - (rewards[(i // k) * k] + rewards[(i // k) * k + 1]) / 2 for i in range(len(rewards))]
    raw = []
    for i, n in enumerate(lengths):
        kl = [old[i][t] - ref[i][t] for t in range(n)]
        raw.append([gamma ** (n - 1 - t) * r[i] - beta * sum(gamma ** (j - t) * kl[j] for j in range(t, n)) for t in range(n)])
    flat = [a for row in raw for a in row]
    m, s = sum(flat) / len(flat), sample_std(flat)
    for i, n in enumerate(lengths):
        assert len(got[i]) == n
        for t in range(n):
            assert math.isclose(got[i][t], (raw[i][t] - m) / (s + 1e-8), rel_tol=1e-9, abs_tol=1e-9)
    flat_got = [a for row in got for a in row]
    assert abs(sum(flat_got) / len(flat_got)) < 1e-9  # centred over every token of the batch


def test_dapo_reward_is_plus_minus_one_with_soft_overlong_punishment(functions):
    fn = functions[("dapo", "dapo_reward")]
    L_max, L_cache = 20, 4
    for correct in (1.0, 0.0):
        outcome = 1.0 if correct else -1.0
        for length in range(1, 23):
            if length <= L_max - L_cache:
                penalty = 0.0
            elif length <= L_max:
                penalty = ((L_max - L_cache) - length) / L_cache
            else:
                penalty = -1.0
            assert math.isclose(fn(correct, length, L_max, L_cache), outcome + penalty, abs_tol=1e-12)
    assert fn(1.0, 20, 20, 0) == 1.0  # L_cache = 0: no shaping


def test_remax_advantage_is_reward_minus_greedy_reward(functions):
    fn = functions[("remax", "remax_advantages")]
    assert fn([1.0, 0.0, 0.5], [1.0, 1.0, 0.0]) == [0.0, -1.0, 0.5]
