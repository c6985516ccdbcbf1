"""Parity of the online-dpo script's loss with TRL 1.16's OnlineDPOTrainer (trl.experimental.online_dpo).

TRL's own training_step runs on the tiny model with its own reference model and a reward function; only its
sampling is replaced by fixed completions (the same ones our script scores), so the comparison is of the loss
and gradient computation itself, for loss_type sigmoid (DPO) and ipo. The scores are chosen without ties:
TRL keeps a tied pair (first sample as chosen) where our script gives it weight 0, a deliberate difference.

TRL has no SPIN, RLAIF or self-rewarding trainer; those losses are checked against independent formulas in
tests/losses/test_online_preference_losses.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import compile_script, load_script_module

pytestmark = pytest.mark.parity


def fixed_rollouts(tokenizer):
    """Four prompts of equal token length (TRL left-pads prompts), and two completions each, both ending in EOS."""
    prompts = [[{"role": "user", "content": f"Describe the {animal}."}] for animal in ("cat", "dog", "fox", "owl")]
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for p in prompts]
    assert len({len(p) for p in prompt_ids}) == 1
    texts = [["The cat is kind.", "The cat is"], ["rude dog", "The dog is calm and gentle."], ["The fox is honest.", "fox fox"], ["The owl", "The owl is clear."]]
    completions = [[tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in pair] for pair in texts]
    scores = [[1.0, 0.0], [-1.0, 2.0], [0.5, -0.5], [0.0, 3.0]]  # no ties
    return prompts, prompt_ids, completions, scores


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_online_dpo_loss_and_gradient_match_trl(kb, tiny, tmp_path, loss_type, beta):
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    prompts, prompt_ids, completions, scores = fixed_rollouts(tokenizer)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not all zero
        for param in policy.parameters():
            param.add_(0.02 * torch.randn_like(param))
    reference = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)

    # --- TRL: its training_step on fixed samples -------------------------------------------------------------
    ours_policy = copy.deepcopy(policy)
    n = len(prompts)
    flat_scores = [s[0] for s in scores] + [s[1] for s in scores]  # TRL's order: all first samples, then all second

    def reward(prompts, completions, completion_ids, **kwargs):
        return flat_scores

    config = OnlineDPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, beta=beta, loss_type=loss_type, report_to="none", use_cpu=True, bf16=False, max_new_tokens=8)
    trainer = OnlineDPOTrainer(model=policy, ref_model=reference, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer)
    width = max(len(c) for pair in completions for c in pair)
    rows = [pair[0] for pair in completions] + [pair[1] for pair in completions]
    completion_ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in rows])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in rows])
    prompt_tensor = torch.tensor(prompt_ids * 2)
    trainer._generate = lambda model, prompts, images=None: (prompt_tensor, torch.ones_like(prompt_tensor), completion_ids, completion_mask, None)
    trl_loss = float(trainer.training_step(trainer.model, {"prompt": prompts}))
    trl_grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}

    # --- ours: the compiled script's collate_pairs + compute_loss on the same pairs --------------------------
    overrides = [f"beta={beta}"] + (["loss_type=ipo"] if loss_type == "ipo" else [])
    script_path = tmp_path / "train_online_dpo.py"
    script_path.write_text(compile_script(kb, "online-dpo", model="tiny", overrides=overrides))
    script = load_script_module(script_path, name=f"online_dpo_parity_{loss_type}")
    args = script.parse_args([])
    pairs = []
    for p, (first, second), (s1, s2) in zip(prompt_ids, completions, scores):
        chosen, rejected = (first, second) if s1 >= s2 else (second, first)
        pairs.append({"prompt_ids": p, "chosen_ids": chosen, "rejected_ids": rejected, "weight": float(s1 != s2)})
    batch = script.collate_pairs(pairs, tokenizer.pad_token_id, torch.device("cpu"))
    context = {"reference": reference, "accelerator": Accelerator(cpu=True)}
    loss_sum, _ = script.compute_loss(ours_policy, batch, args, context)
    (loss_sum / batch["num_items"]).backward()

    assert math.isclose(float(loss_sum) / batch["num_items"], trl_loss, rel_tol=1e-5, abs_tol=1e-6)
    # Gradients agree to float32 rounding: TRL left-pads prompts and right-pads completions, we right-pad rows.
    for name, param in ours_policy.named_parameters():
        difference = (param.grad - trl_grads[name]).norm() / trl_grads[name].norm().clamp(min=1e-12)
        assert difference < 1e-4, (name, float(difference))
