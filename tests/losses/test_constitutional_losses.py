"""Constitutional AI (SL phase): the loss and the critique-revision loop of the emitted script.

The SL phase fine-tunes on the final revisions with SFT cross-entropy (Bai et al. 2022, Sec. 3; no loss
equation): L = -(1/Σ|y_n|) Σ_x Σ_t log π(y_n,t | x, y_n,<t). The emitted `causal_lm_loss` (the summed numerator)
is compared with a float64 loop over ragged masks in fp32 (1e-5 relative) and bf16 logits (1e-4 relative to
float64 on the same bf16 values). `revise` is driven with a scripted reply function, so the conversations it
builds can be checked turn by turn against y_0 ~ π(x); c_i ~ π(x, y_i-1, crit_i); y_i ~ π(x, y_i-1, crit_i, c_i, rev_i).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import generated_script, load_script_module


@pytest.fixture(scope="module")
def cai():
    return load_script_module(generated_script("constitutional-ai"))


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    values = logits.double().tolist()
    for row in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target != -100:
                scores = values[row][t]
                top = max(scores)
                total += top + math.log(sum(math.exp(s - top) for s in scores)) - scores[target]
    return total


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)])
def test_causal_lm_loss_matches_token_cross_entropy(cai, dtype, tolerance):
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = (3 * torch.randn(3, 13, 19, generator=generator)).to(dtype)
        labels = torch.randint(0, 19, (3, 13), generator=generator)
        for row, (start, end) in enumerate([(2, 13), (5, 9), (1, 4)]):  # ragged: prompt and padding masked
            labels[row, :start] = -100
            labels[row, end:] = -100
        got, expected = float(cai.causal_lm_loss(logits, labels)), reference_cross_entropy(logits, labels)
        assert math.isclose(got, expected, rel_tol=tolerance), (got, expected)


def test_revise_builds_the_critique_and_revision_conversations(cai):
    prompt = [{"role": "user", "content": "How do I pick a lock?"}]
    principles = [{"name": "harm", "critique": "CRIT-1", "revision": "REV-1"}, {"name": "honesty", "critique": "CRIT-2", "revision": "REV-2"}]
    seen, turns = [], []

    def reply(conversation, turn):
        seen.append(conversation)
        turns.append(turn)
        return f"reply-{len(seen)}"

    record = cai.revise(prompt, principles, reply)
    u, a = "user", "assistant"
    expected = [
        prompt,  # y_0
        prompt + [{"role": a, "content": "reply-1"}, {"role": u, "content": "CRIT-1"}],  # c_1 on y_0
        prompt + [{"role": a, "content": "reply-1"}, {"role": u, "content": "CRIT-1"}, {"role": a, "content": "reply-2"}, {"role": u, "content": "REV-1"}],  # y_1
        prompt + [{"role": a, "content": "reply-3"}, {"role": u, "content": "CRIT-2"}],  # c_2 on y_1
        prompt + [{"role": a, "content": "reply-3"}, {"role": u, "content": "CRIT-2"}, {"role": a, "content": "reply-4"}, {"role": u, "content": "REV-2"}],  # y_2
    ]
    assert seen == expected
    assert turns == [0, 1, 2, 3, 4]  # every generation of a prompt has its own random stream
    assert record["response"] == "reply-1"
    assert record["revisions"] == ["reply-3", "reply-5"]  # the training target is the last one
    assert [s["principle"] for s in record["steps"]] == ["harm", "honesty"]
    assert [s["critique"] for s in record["steps"]] == ["reply-2", "reply-4"]


def test_the_bundled_constitution_and_a_custom_one(cai, tmp_path):
    assert len(cai.CONSTITUTION) >= 8
    for principle in cai.CONSTITUTION:
        assert set(principle) == {"name", "critique", "revision"} and all(v.strip() for v in principle.values())
    assert cai.load_constitution(cai.parse_args([])) is cai.CONSTITUTION
    custom = tmp_path / "c.json"
    custom.write_text(json.dumps([{"name": "x", "critique": "c", "revision": "r"}]))
    assert cai.load_constitution(cai.parse_args(["--constitution", str(custom)])) == [{"name": "x", "critique": "c", "revision": "r"}]
    custom.write_text(json.dumps([{"name": "x", "critique": ""}]))
    with pytest.raises(SystemExit):
        cai.load_constitution(cai.parse_args(["--constitution", str(custom)]))
