"""A reader of ptcompile_scorer.json written only from the card's contract (templates/reward/script.py.j2 and
templates/prm/script.py.j2), not from the training scripts' code. Tests of the scorer scripts use it to check
the contract; tests of scripts that consume a scorer (best-of-N, PPO, online DPO, search) can use it as the
reference they must agree with."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_scorer(final_dir: Path):
    """(model in eval mode, tokenizer, card) as the card says to load them."""
    import transformers

    card = json.loads((Path(final_dir) / "ptcompile_scorer.json").read_text())
    model_class = getattr(transformers, card["model_class"])
    model = model_class.from_pretrained(final_dir, num_labels=card["num_labels"]).eval()
    model.config.pad_token_id = card["pad_token_id"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(final_dir)
    return model, tokenizer, card


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def reward_input_ids(tokenizer, card: dict, prompt, response: str) -> list[int]:
    assert card["kind"] == "reward" and card["input"] == "chat_template"
    messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def reward_scores(model, tokenizer, card: dict, pairs: list[tuple], padding_side: str = "right") -> list[float]:
    """Rewards of (prompt, response) pairs scored as one padded batch."""
    assert card["read"] == "last_non_pad_token"
    sequences = [reward_input_ids(tokenizer, card, prompt, response) for prompt, response in pairs]
    width = max(map(len, sequences))
    pad = card["pad_token_id"]
    rows, masks = [], []
    for s in sequences:
        fill = [pad] * (width - len(s))
        rows.append(s + fill if padding_side == "right" else fill + s)
        masks.append([1] * len(s) + [0] * len(fill) if padding_side == "right" else [0] * len(fill) + [1] * len(s))
    logits = model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks)).logits
    return logits[:, 0].float().tolist()


def step_input(tokenizer, card: dict, prompt, steps: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + steps and the position where each step's score is read."""
    assert card["kind"] == "process_reward" and card["input"] == "chat_prompt_then_steps"
    text = tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids = ids + tokenizer(step, add_special_tokens=False)["input_ids"] + card["separator_ids"]
        ends.append(len(ids) - 1)
    return ids, ends


@torch.no_grad()
def step_scores(model, tokenizer, card: dict, prompt, steps: list[str]) -> list[float]:
    """P(correct) of every step of one solution."""
    assert card["read"] == "separator_ends"
    ids, ends = step_input(tokenizer, card, prompt, steps)
    probabilities = model(input_ids=torch.tensor([ids])).logits[0].float().softmax(-1)
    return [float(probabilities[end, card["correct_class"]]) for end in ends]
