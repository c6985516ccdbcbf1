"""The preference zoo (family `preference`, every method but DPO, which has tests/methods/test_dpo.py).

Each method's generated script trains the tiny model on the bundled preference data (the chosen answer
uses a polite adjective, the rejected one a rude one) and must move its own objective the right way. At
step 1 the policy equals the reference, so reference-based losses start at their known value at zero
log-ratio. Also: one big batch == accumulation == two processes for the stateful (BCO, running δ) and the
reference-free NLL (ORPO) variants; precomputed reference log-probs give the same run; BCO's δ survives an
exact resume; Step-DPO's data handling (previous steps in the prompt) leaves DPO's loss unchanged.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import generated_script, load_script_module, mean, train_tiny

LOG2 = math.log(2)

def last(metrics, key, n=5):
    return mean(m[key] for m in metrics[-n:])


def first(metrics, key, n=3):
    return mean(m[key] for m in metrics[:n])


def check_margin_and_accuracy(metrics, rise=1.0, accuracy=0.9):
    assert last(metrics, "rewards/margin") > first(metrics, "rewards/margin") + rise, [m["rewards/margin"] for m in metrics]
    assert last(metrics, "rewards/accuracy") >= accuracy, [m["rewards/accuracy"] for m in metrics]


def check_loss_falls(metrics, below):
    assert last(metrics, "loss") < below, [m["loss"] for m in metrics]


def check_ipo(m):
    check_loss_falls(m, 0.2)  # from (0 - 1/(2β))² = 1 towards 0: the per-token margin reaches 1/(2β)
    check_margin_and_accuracy(m)


def check_cdpo(m):
    check_loss_falls(m, 0.5)
    check_margin_and_accuracy(m)


def check_robust(m):
    check_loss_falls(m, 0.2)  # the unbiased loss goes below cDPO's and even below 0
    check_margin_and_accuracy(m)


def check_slic(m):
    # Reference-free: rewards are the sequence log-likelihoods themselves, so the margin starts nonzero.
    assert last(m, "nll") < first(m, "nll") - 5, [x["nll"] for x in m]
    check_margin_and_accuracy(m, rise=2.0, accuracy=0.75)


def check_nca(m):
    check_loss_falls(m, 1.25)
    assert last(m, "rewards/chosen") > 0.2  # the chosen reward rises in absolute terms, not only the margin
    check_margin_and_accuracy(m)


def check_bco_pair(m):
    check_loss_falls(m, 1.0)
    check_margin_and_accuracy(m)
    # δ of step t is the mean of all rewards of steps 1..t-1 (each step contributes its 2·pairs rewards).
    for t in range(len(m)):
        previous = [(x["rewards/chosen"] + x["rewards/rejected"]) / 2 for x in m[:t]]
        expected = mean(previous) if previous else 0.0
        assert math.isclose(m[t]["reward_shift"], expected, rel_tol=1e-4, abs_tol=1e-6), (t, m[t]["reward_shift"], expected)
    assert abs(m[-1]["reward_shift"]) > 1e-3  # it does move


def check_sppo(m):
    check_loss_falls(m, 10.0)  # from 2·(1/(2β))² = 50
    assert last(m, "rewards/chosen") > 0.2 and last(m, "rewards/rejected") < -0.2  # each side towards its own target


def check_apo_zero(m):
    check_loss_falls(m, 0.8)
    assert last(m, "rewards/chosen") > 0.5 and last(m, "rewards/rejected") < -0.5  # chosen up, rejected down
    check_margin_and_accuracy(m)


def check_apo_down(m):
    assert last(m, "rewards/chosen") < -0.5  # the chosen likelihood falls by design
    assert last(m, "rewards/rejected") < last(m, "rewards/chosen") - 0.3  # and the rejected one further
    check_loss_falls(m, 0.8)


def check_simpo(m):
    check_loss_falls(m, 0.3)
    check_margin_and_accuracy(m, rise=2.0)
    assert last(m, "rewards/margin") > 1.375  # past the target margin γ


def check_cpo(m):
    assert last(m, "nll") < 0.75 * first(m, "nll"), [x["nll"] for x in m]
    check_margin_and_accuracy(m, rise=0.4, accuracy=0.75)


def check_orpo(m):
    assert last(m, "nll") < 0.75 * first(m, "nll"), [x["nll"] for x in m]
    check_margin_and_accuracy(m, rise=0.03)  # rewards are λ·mean log-prob, λ = 0.1: small numbers


def check_rdpo(m):
    check_loss_falls(m, 0.3)
    check_margin_and_accuracy(m)


# method -> (extra flags, loss at step 1 when policy == reference (None: not fixed), checks on the metrics).
# The test-only β overrides give the losses a scale the tiny model can move in 25 steps (the papers' values
# are for 7B models: NCA/BCO's β = 0.01 makes rewards tiny, SPPO's β = 0.001 asks for ±500-nat log-ratios,
# IPO's β = 0.1 asks for a 5-nat per-token margin).
CASES = {
    "ipo": (["--beta", "0.5"], 1.0, check_ipo),
    "cdpo": ([], LOG2, check_cdpo),
    "robust-dpo": ([], LOG2, check_robust),
    "slic": ([], None, check_slic),
    "nca": (["--beta", "0.1"], 2 * LOG2, check_nca),
    "bco-pair": (["--beta", "0.1"], 2 * LOG2, check_bco_pair),
    "sppo-hard": (["--beta", "0.1"], 50.0, check_sppo),
    "apo-zero": ([], 1.0, check_apo_zero),
    "apo-down": ([], 1.0, check_apo_down),
    "simpo": ([], None, check_simpo),
    "cpo": ([], None, check_cpo),
    "orpo": ([], None, check_orpo),
    "rdpo": ([], None, check_rdpo),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_preference_method_learns_on_tiny_data(kb, tiny, tmp_path, method):
    extra, start, check = CASES[method]
    metrics = train_tiny(kb, method, tiny, tmp_path, ["--max_steps", "25", "--learning_rate", "1e-3"] + extra)
    assert len(metrics) == 25
    if start is not None:
        assert math.isclose(metrics[0]["loss"], start, rel_tol=1e-4), (metrics[0]["loss"], start)
    check(metrics)


# ------------------------------------------------------------------------------------------------
# Step-DPO: the previous steps belong to the context
# ------------------------------------------------------------------------------------------------


def step_rows(tiny) -> list[dict]:
    """The tiny preference rows in Step-DPO form: 'The cat is ' is the correct partial solution, the compared
    steps are the adjectives 'kind.' and 'rude.'; a quarter of the rows have no previous steps."""
    rows = []
    for index, line in enumerate((tiny / "data" / "preference.jsonl").read_text().splitlines()):
        row = json.loads(line)
        head, chosen_step = row["chosen"].rsplit(" ", 1)
        _, rejected_step = row["rejected"].rsplit(" ", 1)
        if index % 4 == 0:
            rows.append({"prompt": row["prompt"], "initial_reason_steps": "", "chosen": row["chosen"], "rejected": row["rejected"]})
        else:
            rows.append({"prompt": row["prompt"], "initial_reason_steps": head + " ", "chosen": chosen_step, "rejected": rejected_step})
    return rows


def test_step_dpo_learns_the_step_after_the_previous_steps(kb, tiny, tmp_path):
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in step_rows(tiny)))
    flags = ["--dataset", str(data), "--initial_steps_column", "initial_reason_steps", "--max_steps", "25", "--learning_rate", "1e-3"]
    metrics = train_tiny(kb, "step-dpo", tiny, tmp_path, flags)
    assert math.isclose(metrics[0]["loss"], LOG2, rel_tol=1e-4)
    check_margin_and_accuracy(metrics, rise=3.0)
    assert last(metrics, "loss") < 0.1


def test_step_dpo_compares_only_the_step_and_keeps_dpos_loss(kb, tiny):
    """Encoded Step-DPO rows put the previous steps (and any opening the two steps share) in the prompt, so
    the completions are the diverging step only; its loss equals DPO's on the whole replies, because the
    shared tokens have the same log-ratio in both terms of the margin."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = load_script_module(generated_script("step-dpo"), name="gen_step_dpo")
    dpo = load_script_module(generated_script("dpo"), name="gen_dpo_for_step")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    reference = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    rows = step_rows(tiny)[:8]
    step_args = step.parse_args(["--initial_steps_column", "initial_reason_steps"])
    step_items = [step.encode_row(r, f"row {i}", step.ChatEncoder(tokenizer), step_args) for i, r in enumerate(rows)]
    dpo_args = dpo.parse_args(["--beta", str(step_args.beta)])  # Step-DPO uses β = 0.5
    full_rows = [dict(r, chosen=r["initial_reason_steps"] + r["chosen"], rejected=r["initial_reason_steps"] + r["rejected"]) for r in rows]
    dpo_items = [dpo.encode_row(r, f"row {i}", dpo.ChatEncoder(tokenizer), dpo_args) for i, r in enumerate(full_rows)]
    adjectives = {tokenizer.decode(i["chosen_ids"]).split(".")[0].strip() for i in step_items}
    for s, d in zip(step_items, dpo_items):
        assert s["prompt_ids"] + s["chosen_ids"] == d["prompt_ids"] + d["chosen_ids"]  # same sequences ...
        assert len(s["chosen_ids"]) < len(d["chosen_ids"])  # ... but only the step is the completion
        assert "is" not in tokenizer.decode(s["chosen_ids"]).split()
    assert adjectives <= {"kind", "calm", "gentle", "helpful", "honest", "clear"}, adjectives
    context = {"reference": reference, "accelerator": Accelerator(cpu=True)}
    with torch.no_grad():
        step_loss, step_metrics = step.compute_loss(policy, step.collate(step_items, tokenizer, step_args, torch.device("cpu")), step_args, context)
        dpo_loss, dpo_metrics = dpo.compute_loss(policy, dpo.collate(dpo_items, tokenizer, dpo_args, torch.device("cpu")), dpo_args, context)
    assert math.isclose(float(step_loss), float(dpo_loss), rel_tol=1e-5)
    assert float(step_metrics["logps/chosen"]) > float(dpo_metrics["logps/chosen"]) + 1.0  # fewer tokens scored


def test_step_dpo_rejects_identical_steps(tiny):
    step = load_script_module(generated_script("step-dpo"), name="gen_step_dpo_identical")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    args = step.parse_args([])
    row = {"prompt": "Describe the cat.", "initial_reason_steps": "The cat is ", "chosen": "kind.", "rejected": "kind."}
    with pytest.raises(step.DataError, match="row 3: the chosen and rejected steps do not differ"):
        step.encode_row(row, "row 3", step.ChatEncoder(tokenizer), args)


# ------------------------------------------------------------------------------------------------
# Exactness, precomputed reference, resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, extra", [("bco-pair", ["--beta", "0.1"]), ("orpo", [])])
def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path, method, extra):
    """Global batch 8: 1 process x 8; 1 x 4 x accumulation 2; 2 processes x 4 (gloo). Same losses (rel 1e-5),
    and for BCO the same running δ, which is updated from all-reduced step means."""
    common = ["--max_steps", "5", "--learning_rate", "1e-3"] + extra
    big = train_tiny(kb, method, tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 5
        for a, b in zip(big, run):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6), (big, run)
            if method == "bco-pair":
                assert math.isclose(a["reward_shift"], b["reward_shift"], rel_tol=1e-4, abs_tol=1e-7)
    if method == "bco-pair":
        assert abs(big[-1]["reward_shift"]) > 1e-4  # δ is in play in the compared steps


def test_precomputed_reference_log_probs_give_the_same_run(kb, tiny, tmp_path):
    common = ["--max_steps", "4", "--learning_rate", "1e-3"]
    live = train_tiny(kb, "ipo", tiny, tmp_path, common, name="live")
    stored = train_tiny(kb, "ipo", tiny, tmp_path, common + ["--precompute_ref_log_probs", "true"], name="stored")
    for a, b in zip(live, stored):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (live, stored)
        assert math.isclose(a["rewards/margin"], b["rewards/margin"], rel_tol=1e-4, abs_tol=1e-6)


def test_bco_pair_reward_shift_survives_an_exact_resume(kb, tiny, tmp_path):
    """Train 6 steps with a checkpoint at step 3; a second run resumed from it reproduces steps 4-6, δ included."""
    common = ["--max_steps", "6", "--learning_rate", "1e-3", "--beta", "0.1"]
    full = train_tiny(kb, "bco-pair", tiny, tmp_path, common + ["--save_steps", "3"], name="full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "state.pt").is_file()
    assert torch.load(checkpoint / "state.pt", weights_only=False)["loss_state"]["reward_count"] == 3 * 2 * 8
    resumed = train_tiny(kb, "bco-pair", tiny, tmp_path, common + ["--resume_from_checkpoint", str(checkpoint)], name="resumed")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert abs(resumed[0]["reward_shift"]) > 1e-4
    for a, b in zip(full[3:], resumed):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (full, resumed)
        assert math.isclose(a["reward_shift"], b["reward_shift"], rel_tol=1e-6, abs_tol=1e-9)


def test_reference_free_methods_load_no_reference_model(kb):
    from ptcompile.recipe import resolve
    from ptcompile.render import render_script

    for method in ("simpo", "cpo", "orpo", "slic"):
        source = render_script(resolve(kb, method))
        assert "trainable=False" not in source and "ref_chosen_logps" not in source, method
    assert "trainable=False" in render_script(resolve(kb, "ipo"))
