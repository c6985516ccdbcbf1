"""The catalogue's completeness bars (issue: the survey's whole catalogue) and its provenance rule."""

from __future__ import annotations

import json

from ptcompile.cli import main
from ptcompile.recipe import resolve

REQUIRED_METHODS = [
    "sft", "instruction-tuning", "continued-pretraining", "distillation-hard", "knowledge-distillation", "gkd",
    "rejection-sampling-ft", "constitutional-ai", "rlaif", "reward-model", "process-reward-model", "ppo-rlhf",
    "dpo", "ipo", "cdpo", "robust-dpo", "slic", "nca", "bco-pair", "sppo-hard", "apo-zero", "apo-down", "kto",
    "orpo", "simpo", "cpo", "rdpo", "step-dpo", "online-dpo", "iterative-dpo", "spin", "grpo", "dapo", "dr-grpo",
    "gspo", "rloo", "reinforce-pp", "remax", "best-of-n", "self-consistency", "prm-beam-search",
]
REQUIRED_PEFT = ["lora", "qlora", "dora", "adalora", "rslora", "prefix-tuning", "prompt-tuning", "p-tuning-v2", "ia3"]


def test_counts_reach_the_bars(capsys):
    counts = {}
    for kind in ("papers", "methods", "models", "datasets"):
        assert main(["list", kind, "--json"]) == 0
        counts[kind] = len(json.loads(capsys.readouterr().out))
    assert counts["papers"] >= 200 and counts["methods"] >= 40 and counts["models"] >= 20 and counts["datasets"] >= 12, counts


def test_every_required_method_and_peft_technique_is_catalogued(kb):
    assert not [m for m in REQUIRED_METHODS if m not in kb.methods]
    assert not [p for p in REQUIRED_PEFT if p not in kb.peft]


def test_no_default_lacks_a_source_and_show_prints_them(kb, capsys):
    for method_id in kb.methods:
        recipe = resolve(kb, method_id)
        for hp in recipe.hyperparameters:
            assert hp.source.strip() and (hp.source.startswith("common practice: ") or ", " in hp.source), (method_id, hp.name)
        assert main(["show", method_id]) == 0
        out = capsys.readouterr().out
        for hp in recipe.hyperparameters:
            assert f"  {hp.name} = " in out
        assert out.count("source: ") == len(recipe.hyperparameters) + len(recipe.peft_hyperparameters)


def test_every_paper_is_in_a_category_and_every_method_paper_exists(kb):
    for entry in kb.papers.values():
        assert entry.record.categories
    for entry in kb.methods.values():
        assert all(key in kb.papers for key in entry.record.papers)


def test_category_tree_mirrors_the_survey(kb):
    top = {cid for cid, e in kb.categories.items() if e.record.parent is None}
    assert {"fine-tuning", "reinforcement-learning", "test-time-scaling"} <= top
    children = lambda parent: {cid for cid, e in kb.categories.items() if e.record.parent == parent}  # noqa: E731
    assert {"instruction-tuning", "peft", "distillation", "continued-pretraining", "safety-tuning"} <= children("fine-tuning")
    assert {"reward-modeling", "policy-optimization", "preference-optimization", "rlvr", "ai-feedback"} <= children("reinforcement-learning")
    assert "process-reward-models" in children("reward-modeling")
    assert {"chain-of-thought", "self-consistency", "best-of-n", "tree-search", "verifier-guided-search", "self-refinement"} <= children("test-time-scaling")
