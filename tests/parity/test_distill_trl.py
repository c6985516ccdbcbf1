"""Parity of soft-label KD (knowledge-distillation) with TRL 1.16's distillation losses.

TRL implements the divergences in two places, both driven here as they are:

- trl.experimental.gkd.GKDTrainer: built on the tiny student and a teacher (the tiny model with N(0, 0.3²)
  noise, so the two differ), with lmbda = 0 (no on-policy samples) and beta = 0.5 (GKDConfig's default);
  its compute_loss on its own collated batch (DataCollatorForChatML: the loss on the last assistant turn)
  must equal our compute_loss on the same input_ids / attention_mask / labels, divided by the token count.
  GKD computes the divergence at temperature 1 (GKDConfig.temperature only controls sampling).
- trl.trainer.distillation_trainer._chunked_divergence_loss (DistillationTrainer's loss): hidden states and
  lm_head weights of both models, beta 0 (forward KL), 0.5 (JSD), 1 (reverse KL), at temperatures 1 and 2.

TRL deviates from Hinton et al. on purpose in two ways, and we compare against the matching settings: it has
no hard-label term (we use alpha = 1) and no T² factor (we divide our loss by T²). It also encodes forward and
reverse KL as the end points beta = 0 / 1 of its generalized JSD, where ours are separate divergences
(compiled with --set divergence=forward_kl / reverse_kl); the generalized JSD itself vanishes there.

Tolerance: rel 1e-5 (float32, different reduction orders).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import compile_script, load_script_module

pytestmark = pytest.mark.parity

DIVERGENCE_OF_TRL_BETA = {0.0: "forward_kl", 0.5: "jsd", 1.0: "reverse_kl"}


@pytest.fixture(scope="module")
def models(tiny):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    teacher = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    student.config.use_cache = teacher.config.use_cache = False
    return student, teacher


def kd_script(kb, tmp_path, divergence: str):
    path = tmp_path / f"kd_{divergence}.py"
    path.write_text(compile_script(kb, "knowledge-distillation", "tiny", overrides=[f"divergence={divergence}"]))
    return load_script_module(path, name=f"parity_kd_{divergence}")


def our_mean(script, student, teacher, batch, tokenizer, temperature: float = 1.0) -> tuple[float, int]:
    from accelerate import Accelerator

    args = script.parse_args(["--alpha", "1.0", "--temperature", str(temperature)])
    ours = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    ours["num_items"] = int((batch["labels"][:, 1:] != -100).sum())
    context = {"teacher": teacher, "accelerator": Accelerator(cpu=True), "vocab_size": len(tokenizer)}
    with torch.no_grad():
        loss_sum, _ = script.compute_loss(student, ours, args, context)
    return float(loss_sum) / ours["num_items"] / temperature**2, ours["num_items"]


@pytest.fixture(scope="module")
def gkd(models, tiny, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher = models
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    rows = [json.loads(line) for line in (tiny / "data" / "chat.jsonl").read_text().splitlines()[:8]]
    config = GKDConfig(output_dir=str(tmp_path_factory.mktemp("gkd")), report_to=[], per_device_train_batch_size=8, max_length=512, lmbda=0.0, use_cpu=True, bf16=False)
    trainer = GKDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    return trainer, batch, tokenizer


def test_gkd_trainer_compute_loss_equals_our_generalized_jsd(kb, tmp_path, models, gkd):
    trainer, batch, tokenizer = gkd
    assert trainer.beta == 0.5 and trainer.lmbda == 0.0
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, dict(batch)))
    ours, tokens = our_mean(kd_script(kb, tmp_path, "jsd"), models[0], models[1], batch, tokenizer)
    assert tokens > 20
    assert math.isclose(ours, theirs, rel_tol=1e-5), (ours, theirs)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_trainer_chunked_divergence_equals_ours(kb, tmp_path, models, gkd, beta, temperature):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    student, teacher = models
    _, batch, tokenizer = gkd
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student_hidden = student.model(**inputs).last_hidden_state[:, :-1]  # position t predicts token t + 1
        teacher_hidden = teacher.model(**inputs).last_hidden_state[:, :-1]
        mask = (batch["labels"][:, 1:] != -100).long()
        theirs, _, count = _chunked_divergence_loss(student_hidden, teacher_hidden, student.lm_head.weight, teacher.lm_head.weight, mask, beta, temperature=temperature)
    script = kd_script(kb, tmp_path, DIVERGENCE_OF_TRL_BETA[beta])  # jsd_beta defaults to 0.5
    ours, tokens = our_mean(script, student, teacher, batch, tokenizer, temperature)
    assert tokens == int(count)
    assert math.isclose(ours, float(theirs), rel_tol=1e-5), (beta, temperature, ours, float(theirs))
