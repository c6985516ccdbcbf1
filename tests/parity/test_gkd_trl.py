"""Parity of the gkd script's divergence with TRL 1.16's GKDTrainer (trl.experimental.gkd).

1. Token level: TRL's GKDTrainer.generalized_jsd_loss (reduction "none", summed over the vocabulary) against
   our generalized_jsd on random logits for β in {0, 0.1, 0.5, 0.9, 1} (TRL also takes β = 0 and 1 as the
   forward and reverse KL).
2. Trainer level: TRL's GKDTrainer.compute_loss on the tiny student and teacher for a batch of equal-length
   completions, against our compute_loss divided by the number of sequences. TRL averages over all completion
   tokens of the batch while we follow the paper's mean over sequences of per-token means; the two agree when
   every completion has the same length, which is the case compared here (the deliberate difference).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compile_script, generated_script, load_script_module
from script_functions import load_functions

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_token_divergence_matches_trl(kb, beta):
    from trl.experimental.gkd import GKDTrainer

    ours = load_functions(compile_script(kb, "gkd"), ["generalized_jsd"])["generalized_jsd"]
    generator = torch.Generator().manual_seed(3)
    student, teacher = (3 * torch.randn(3, 7, 64, generator=generator) for _ in range(2))
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, reduction="none").sum(-1)
    assert torch.allclose(ours(student, teacher, beta), theirs, rtol=1e-5, atol=1e-6)


def test_trainer_loss_matches_trl_on_equal_length_completions(kb, tiny, tmp_path):
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    rows = [
        ([{"role": "user", "content": "Repeat after me: red fox"}], "red fox"),
        ([{"role": "user", "content": "Repeat after me: blue owl cat"}], "blue owl"),
        ([{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Now reverse: gold bee"}], "bee gold"),
    ]
    prompt_ids, completion_ids = [], []
    for prompt, reply in rows:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        prompt_ids.append(list(ids))
        completion_ids.append(tokenizer(reply, add_special_tokens=False)["input_ids"][:2] + [tokenizer.eos_token_id])
    assert len({len(c) for c in completion_ids}) == 1  # equal lengths: token mean == mean of sequence means

    script = load_script_module(generated_script("gkd"))
    args = script.parse_args(["--beta", "0.5"])
    batch = script.sequence_batch(prompt_ids, completion_ids, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        ours, _ = script.compute_loss(student, batch, args, {"teacher": teacher, "accelerator": Accelerator(cpu=True)})
    ours = float(ours) / len(rows)

    config = GKDConfig(output_dir=str(tmp_path / "trl"), beta=0.5, lmbda=0.0, report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=len(rows))
    dataset = Dataset.from_list([{"messages": prompt + [{"role": "assistant", "content": reply}]} for prompt, reply in rows])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer)
    labels = batch["input_ids"].clone()
    labels[:, :] = -100
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        labels[i, len(p) : len(p) + len(c)] = batch["input_ids"][i, len(p) : len(p) + len(c)]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, inputs))
    assert math.isclose(ours, theirs, rel_tol=1e-5)
