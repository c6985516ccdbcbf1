"""Shared by the policy-gradient tests: a warm-started tiny policy for the bundled successor task.

A random-init model never answers "What is a plus 1?" correctly, so no reward can rise. The warm start is a
short supervised fit on a NOISY copy of the task: half of the answers are replaced by a random digit. The
resulting policy's most likely answer is right (greedy accuracy ~1) while sampling at temperature 1 is right
only about half the time, so a policy-gradient method has room to raise the sampled reward, and it must
learn to do so from the reward alone (the noisy labels never tell it which answer is right).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

PG_METHODS = ["grpo", "dapo", "dr-grpo", "gspo", "rloo", "reinforce-pp", "remax"]


def warm_start(tiny: Path, out: Path, noise: float = 0.5, steps: int = 120, lr: float = 3e-3, seed: int = 0) -> Path:
    """Fit the tiny model on the successor task with a fraction `noise` of random answers; save to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (tiny / "data" / "successor.jsonl").read_text().splitlines()]
    sequences, starts = [], []
    for row in rows:
        answer = row["answer"] if rng.random() >= noise else str(rng.randint(0, 9))
        prompt = [{"role": "user", "content": row["prompt"]}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True)["input_ids"]
        sequences.append(list(full))
        starts.append(len(prompt_ids))
    width, pad = max(map(len, sequences)), tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    labels = torch.tensor([[-100] * b + s[b:] + [-100] * (width - len(s)) for s, b in zip(sequences, starts)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randperm(len(sequences), generator=generator)[:64]
        logits = model(input_ids=ids[index], attention_mask=mask[index]).logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), labels[index][:, 1:], ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pg_args(warm: Path, tiny: Path) -> list[str]:
    """Point a policy-gradient script at the warm-started policy and the successor task."""
    return ["--model_name_or_path", str(warm), "--dataset", str(tiny / "data" / "successor.jsonl"), "--max_completion_length", "4"]
