"""Shared set-up of the TRL parity tests: a tiny policy that has moved away from its reference, a compiled
script imported as a module, and the script's own encoding of the bundled tiny rows.

Both sides see the same token ids and the same weights, in float32; TRL's trainers are built as a user would
build them (with bf16=False) and driven through their own collators and loss code (compute_loss /
get_batch_loss_metrics).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from conftest import compile_script, load_script_module


def tiny_models(tiny: Path, seed: int = 0):
    """(policy, reference): the tiny model, and a copy whose weights moved by N(0, 0.05²) noise."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, reference


def compiled_module(kb, method: str, tmp_path: Path, overrides: list[str] | None = None, dataset: str | None = None):
    path = tmp_path / f"parity_{method.replace('-', '_')}.py"
    path.write_text(compile_script(kb, method, overrides=overrides, dataset=dataset))
    return load_script_module(path, name=f"parity_{method.replace('-', '_')}_{abs(hash(tuple(overrides or [])))}")


def conversational(rows: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """The rows with every prompt a message list and every reply an assistant message list (TRL's
    conversational format; a datasets.Dataset cannot mix strings and lists in one column)."""
    out = []
    for row in rows:
        new = dict(row)
        if isinstance(new["prompt"], str):
            new["prompt"] = [{"role": "user", "content": new["prompt"]}]
        for field in fields:
            new[field] = [{"role": "assistant", "content": new[field]}]
        out.append(new)
    return out


def rows(tiny: Path, name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (tiny / "data" / name).read_text().splitlines()[:n]]


def accelerator():
    """The scripts' accelerator, in float32. TRL's configs default to bf16=True, which would put bf16
    autocast into accelerate's process-wide state: every TRL config here passes bf16=False."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert acc.mixed_precision == "no", acc.mixed_precision
    return acc
