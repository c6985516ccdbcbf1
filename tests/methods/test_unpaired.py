"""Unpaired feedback (family `unpaired`: KTO, BCO). The generated scripts train the tiny model on the bundled
unpaired data (desirable completions use a polite adjective, undesirable ones a rude one) and must separate
the two classes' implicit rewards. Also: one big batch == accumulation == two processes (KTO's per-step z0,
BCO's running δ), precomputed reference log-probs (KTO's mismatched pairs included) give the same run,
BCO's δ survives an exact resume, and a preference dataset is read as two labelled completions per row.
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


def test_kto_separates_desirable_from_undesirable(kb, tiny, tmp_path):
    metrics = train_tiny(kb, "kto", tiny, tmp_path, ["--max_steps", "25", "--learning_rate", "1e-3"])
    assert math.isclose(metrics[0]["loss"], 0.5, rel_tol=1e-5)  # λ·(1 - σ(0)) with λ_D = λ_U = 1
    assert metrics[0]["kl"] == 0.0  # policy == reference: every mismatched log-ratio is 0
    assert max(m["kl"] for m in metrics) > 0.1  # z0 moves once the policy does
    assert all(m["kl"] >= 0 for m in metrics)
    assert last(metrics, "rewards/margin") > first(metrics, "rewards/margin") + 0.5, [m["rewards/margin"] for m in metrics]
    assert last(metrics, "rewards/desirable") > 0.2 and last(metrics, "rewards/undesirable") < -0.2
    assert last(metrics, "loss") < 0.45, [m["loss"] for m in metrics]


def test_bco_separates_desirable_from_undesirable(kb, tiny, tmp_path):
    metrics = train_tiny(kb, "bco", tiny, tmp_path, ["--max_steps", "25", "--learning_rate", "1e-3"])
    assert math.isclose(metrics[0]["loss"], LOG2, rel_tol=1e-5)  # -log σ(0 - 0)
    assert last(metrics, "rewards/margin") > first(metrics, "rewards/margin") + 0.5, [m["rewards/margin"] for m in metrics]
    assert last(metrics, "loss") < 0.6, [m["loss"] for m in metrics]
    # δ of step t is the mean of all rewards of steps 1..t-1 (every step has the same number of completions).
    for t in range(len(metrics)):
        previous = [m.get("rewards/desirable", 0) * m["fraction/desirable"] + m.get("rewards/undesirable", 0) * (1 - m["fraction/desirable"]) for m in metrics[:t]]
        expected = mean(previous) if previous else 0.0
        assert math.isclose(metrics[t]["reward_shift"], expected, rel_tol=1e-4, abs_tol=1e-6), (t, metrics[t]["reward_shift"], expected)
    assert abs(metrics[-1]["reward_shift"]) > 1e-3


@pytest.mark.parametrize("method", ["kto", "bco"])
def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, tmp_path, method):
    """Global batch 8: 1 process x 8; 1 x 4 x accumulation 2; 2 processes x 4 (gloo). Same losses (rel 1e-5)
    and the same per-step z0 (KTO) or running δ (BCO)."""
    common = ["--max_steps", "5", "--learning_rate", "1e-3"]
    big = train_tiny(kb, method, tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    state = "kl" if method == "kto" else "reward_shift"
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 5
        for a, b in zip(big, run):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6), (big, run)
            assert math.isclose(a[state], b[state], rel_tol=1e-4, abs_tol=1e-6), (big, run)
    assert max(abs(m[state]) for m in big) > 1e-3  # the state is in play in the compared steps


def test_kto_precomputed_reference_log_probs_give_the_same_run(kb, tiny, tmp_path):
    common = ["--max_steps", "4", "--learning_rate", "1e-3"]
    live = train_tiny(kb, "kto", tiny, tmp_path, common, name="live")
    stored = train_tiny(kb, "kto", tiny, tmp_path, common + ["--precompute_ref_log_probs", "true"], name="stored")
    assert max(m["kl"] for m in live) > 0.1
    for a, b in zip(live, stored):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (live, stored)
        assert math.isclose(a["kl"], b["kl"], rel_tol=1e-4, abs_tol=1e-6), (live, stored)


def test_bco_reward_shift_survives_an_exact_resume(kb, tiny, tmp_path):
    common = ["--max_steps", "6", "--learning_rate", "1e-3"]
    full = train_tiny(kb, "bco", tiny, tmp_path, common + ["--save_steps", "3"], name="full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert torch.load(checkpoint / "state.pt", weights_only=False)["loss_state"]["reward_count"] == 3 * 8
    resumed = train_tiny(kb, "bco", tiny, tmp_path, common + ["--resume_from_checkpoint", str(checkpoint)], name="resumed")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert abs(resumed[0]["reward_shift"]) > 1e-4
    for a, b in zip(full[3:], resumed):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (full, resumed)
        assert math.isclose(a["reward_shift"], b["reward_shift"], rel_tol=1e-6, abs_tol=1e-9)


def test_kto_mismatched_completions_come_from_other_items(kb, tiny):
    """Every item gets another item's completion, each completion is used exactly once, and the pairing
    depends only on the seed."""
    from transformers import AutoTokenizer

    script = load_script_module(generated_script("kto"), name="gen_kto_pairs")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    args = script.parse_args(["--dataset", str(tiny / "data" / "unpaired.jsonl"), "--prompt_column", "prompt", "--completion_column", "completion", "--label_column", "label"])
    items, skipped = script.build_items(args, tokenizer)
    assert not skipped and len(items) == 256
    rows = [json.loads(line) for line in (tiny / "data" / "unpaired.jsonl").read_text().splitlines()]
    assert [i["label"] for i in items] == [r["label"] for r in rows]
    own = [tuple(i["completion_ids"]) for i in items]
    mismatched = [tuple(i["kl_completion_ids"]) for i in items]
    assert sorted(own) == sorted(mismatched)  # a permutation of the completions ...
    assert sum(a == b for a, b in zip(own, mismatched)) < 20  # ... that rarely hits an identical text
    again, _ = script.build_items(args, tokenizer)
    assert [i["kl_completion_ids"] for i in again] == [i["kl_completion_ids"] for i in items]
    other, _ = script.build_items(script.parse_args(["--seed", "7", "--dataset", args.dataset, "--prompt_column", "prompt", "--completion_column", "completion", "--label_column", "label"]), tokenizer)
    assert [i["kl_completion_ids"] for i in other] != [i["kl_completion_ids"] for i in items]


def test_kto_reads_a_preference_dataset_as_two_labelled_completions(kb, tiny, tmp_path):
    from ptcompile.recipe import resolve
    from ptcompile.render import render_script

    path = tmp_path / "kto_pref.py"
    path.write_text(render_script(resolve(kb, "kto", "tiny", None, [], "tiny-preference")))
    script = load_script_module(path, name="kto_from_pairs")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    args = script.parse_args(["--dataset", str(tiny / "data" / "preference.jsonl")])
    items, _ = script.build_items(args, tokenizer)
    assert len(items) == 2 * 256 and [i["label"] for i in items[:4]] == [True, False, True, False]
    assert items[0]["prompt_ids"] == items[1]["prompt_ids"] and items[0]["completion_ids"] != items[1]["completion_ids"]


def test_bad_labels_are_located(kb, tiny, tmp_path):
    script = load_script_module(generated_script("bco"), name="gen_bco_labels")
    from transformers import AutoTokenizer

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Describe the cat.", "completion": "The cat is kind.", "label": "yes"}) + "\n")
    args = script.parse_args(["--dataset", str(data), "--prompt_column", "prompt", "--completion_column", "completion", "--label_column", "label"])
    with pytest.raises(script.DataError, match=r"bad.jsonl:1: field 'label' must be true/false"):
        script.build_items(args, AutoTokenizer.from_pretrained(tiny / "model"))
