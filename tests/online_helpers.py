"""Shared by the tests of the online families (ppo, online-preference, gkd): small models trained in-process.

The learning tests need a policy that can already write the task's answers, and judges that can tell good
answers from bad ones; a random-init tiny model does neither. Everything here is a short supervised fit of the
embedded tiny model (seconds on a CPU), cached on disk under the test session's base temporary directory.

The "polite" task reuses the bundled preference data (compiler/tiny_data.py): the prompt "Describe the cat."
is answered "The cat is <adjective>.", with a polite adjective (GOOD) preferred to a rude one (BAD). The
warm-started policy picks its adjective uniformly from GOOD + BAD, so half its samples are polite: an online
method has room to raise that fraction, and it must learn to from its judge alone.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ptcompile.tiny_data import ANIMALS, BAD, GOOD

POLITE = re.compile(r"\b(" + "|".join(GOOD) + r")\b")
RUDE = re.compile(r"\b(" + "|".join(BAD) + r")\b")

# Short judge prompts for the tiny model (the scripts' defaults are long rubrics meant for real LLMs).
LABELLER_TEMPLATE = "{prompt}\n1: {first}\n2: {second}\nWhich is politer?"
SELF_JUDGE_TEMPLATE = "Judge: {prompt} {response}"


def describe_prompts() -> list[str]:
    return [f"Describe the {animal}." for animal in ANIMALS]


def _encode(tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], int]:
    """Token ids of prompt + reply (chat template) and where the reply starts."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    return list(full), len(prompt_ids)


def fit(tiny: Path, out: Path, examples: list[tuple[list[dict], str]], steps: int, lr: float = 3e-3, batch: int = 64, seed: int = 0, start: Path | None = None) -> Path:
    """Supervised fit of the tiny model (or the model at `start`) on (prompt messages, reply) examples, loss on
    the reply tokens only; saved with its tokenizer to `out` (reused when it exists)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(start or tiny / "model", dtype=torch.float32)
    encoded = [_encode(tokenizer, prompt, reply) for prompt, reply in examples]
    width, pad = max(len(ids) for ids, _ in encoded), tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in encoded])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in encoded])
    labels = torch.tensor([[-100] * b + s[b:] + [-100] * (width - len(s)) for s, b in encoded])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randperm(len(encoded), generator=generator)[:batch]
        logits = model(input_ids=ids[index], attention_mask=mask[index]).logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), labels[index][:, 1:], ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def polite_policy_examples(seed: int = 0, n: int = 512) -> list[tuple[list[dict], str]]:
    """Describe-an-animal replies with an adjective drawn uniformly from GOOD + BAD (half polite)."""
    rng = random.Random(seed)
    return [([{"role": "user", "content": f"Describe the {animal}."}], f"The {animal} is {rng.choice(GOOD + BAD)}.") for animal in (rng.choice(ANIMALS) for _ in range(n))]


def labeller_examples(seed: int = 1, n: int = 2048) -> list[tuple[list[dict], str]]:
    """The RLAIF labelling task in LABELLER_TEMPLATE's format: which of a polite and a rude reply is better,
    in both orders; the reply starts with 'Preferred response=' as the script's labeller does."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        animal = rng.choice(ANIMALS)
        good, bad = f"The {animal} is {rng.choice(GOOD)}.", f"The {animal} is {rng.choice(BAD)}."
        first_is_good = rng.random() < 0.5
        first, second = (good, bad) if first_is_good else (bad, good)
        request = LABELLER_TEMPLATE.format(prompt=f"Describe the {animal}.", first=first, second=second)
        examples.append(([{"role": "user", "content": request}], "Preferred response=" + ("1" if first_is_good else "2")))
    return examples


def self_judge_examples(seed: int = 2, n: int = 512) -> list[tuple[list[dict], str]]:
    """Yuan et al.'s EFT data for the tiny task: the judge prompt of a candidate and its verdict,
    'Score: 5' for a polite reply and 'Score: 1' for a rude one."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        animal = rng.choice(ANIMALS)
        polite = rng.random() < 0.5
        reply = f"The {animal} is {rng.choice(GOOD if polite else BAD)}."
        examples.append(([{"role": "user", "content": SELF_JUDGE_TEMPLATE.format(prompt=f"Describe the {animal}.", response=reply)}], "Score: 5" if polite else "Score: 1"))
    return examples


def hardened_preference_rows(tiny: Path, seed: int = 0) -> list[dict]:
    """The bundled preference rows (polite > rude) plus, for each, the polite reply preferred to a degenerate
    variant of itself: cut off ("The cat is", ""), words shuffled or repeated ("is is is kind"), or followed by
    junk. A reward model that never saw such text scores it at random, and PPO or online DPO find that out
    within a few steps (reward hacking); the online tests also penalise completions without an EOS token."""
    rng = random.Random(seed)
    rows = []
    for line in (tiny / "data" / "preference.jsonl").read_text().splitlines():
        row = json.loads(line)
        words = row["chosen"].split()
        degenerate = [
            " ".join(words[: rng.randint(0, len(words) - 1)]),  # cut off
            " ".join(rng.sample(words, len(words))),  # shuffled
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))),  # word salad
            row["chosen"] + " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))),  # trailing junk
        ]
        rows.append(row)
        rows.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": rng.choice(degenerate) or "."})
    return rows


def train_reward_model(kb, tiny: Path, workdir: Path) -> Path:
    """A Bradley-Terry reward model trained by the generated reward-model script (h-rm's family) on
    hardened_preference_rows; returns its final/ directory, a scorer in the ptcompile_scorer.json contract
    that the PPO and online-DPO scripts load (polite replies score about +5, rude or degenerate ones -5)."""
    from conftest import train_tiny

    if (workdir / "reward-model" / "final" / "ptcompile_scorer.json").is_file():
        return workdir / "reward-model" / "final"
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "hardened-preference.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in hardened_preference_rows(tiny)))
    train_tiny(kb, "reward-model", tiny, workdir, ["--dataset", str(data), "--max_steps", "120", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16"], name="reward-model")
    return workdir / "reward-model" / "final"


@torch.no_grad()
def polite_fraction(model_dir: Path, samples: int = 4, seed: int = 0, temperature: float = 1.0) -> float:
    """Fraction of the model's sampled replies to the describe prompts that use a polite adjective
    (and no rude one): `samples` replies per animal, at `temperature`, up to 12 new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for p in describe_prompts()]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts for _ in range(samples)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(samples)])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(1 for t in texts if POLITE.search(t) and not RUDE.search(t)) / len(texts)


def cached(tmp_path_factory, name: str) -> Path:
    """Where a helper model lives for this test session (one directory per xdist worker)."""
    return tmp_path_factory.getbasetemp() / "online-models" / name


def polite_args(policy: Path, tiny: Path) -> list[str]:
    """Point a prompt-format online script at the warm-started policy and the describe-an-animal prompts
    (the prompt column of the bundled preference data)."""
    return ["--model_name_or_path", str(policy), "--dataset", str(tiny / "data" / "preference.jsonl")]


def chat_examples(tiny: Path) -> list[tuple[list[dict], str]]:
    """The bundled chat data as (every message before the last assistant turn, that turn)."""
    examples = []
    for line in (tiny / "data" / "chat.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        examples.append((messages[:last], messages[last]["content"]))
    return examples


@torch.no_grad()
def response_nll(model_dir: Path, examples: list[tuple[list[dict], str]]) -> float:
    """Mean per-token negative log-likelihood of the replies of `examples` under the model at `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 64):
        encoded = [_encode(tokenizer, p, r) for p, r in examples[start : start + 64]]
        width = max(len(s) for s, _ in encoded)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s, _ in encoded])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in encoded])
        labels = torch.tensor([[-100] * b + s[b:] + [-100] * (width - len(s)) for s, b in encoded])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        total += float(F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"))
        count += int((labels[:, 1:] != -100).sum())
    return total / count
