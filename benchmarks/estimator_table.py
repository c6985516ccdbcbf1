"""Compare `ptcompile estimate` with fake-tensor measurements of the emitted scripts' real training step.

Each configuration runs benchmarks/fake_memory.py's measurement (exact tensor accounting of the script's own
collate, compute_loss, backward and AdamW step at the preset's real dimensions, on fake tensors) and the
estimator's `tensor_peak` for the same setting, and prints the markdown table of docs/memory-estimator.md.
With --fit it also prints the ACT_H / ACT_I constants that a least-squares fit of the activation term to the
measurements would give (the estimator's constants are set by hand from that output).

    python benchmarks/estimator_table.py [--fit] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_memory import measure  # noqa: E402

GiB = 1024**3

# (method, preset, seq, batch, script flags). The first rows are the ones the constants were fitted on.
CONFIGURATIONS = [
    ("sft", "smollm2-135m", 1024, 4, []),
    ("sft", "qwen2.5-0.5b", 1024, 1, []),
    ("sft", "llama3.2-1b", 512, 2, []),
    ("sft", "qwen3-0.6b", 768, 2, []),
    ("sft", "llama3.2-1b", 2048, 1, []),
    ("sft", "qwen2.5-1.5b-instruct", 512, 1, []),
    ("sft", "llama3.2-1b", 2048, 4, []),
    ("sft", "llama3.2-1b", 2048, 4, ["--chunked_loss", "false"]),
    ("sft", "qwen2.5-0.5b", 2048, 4, ["--chunked_loss", "false"]),
    ("sft", "qwen2.5-0.5b", 2048, 4, []),
    # DPO, the anchor's shape (prompt 512 + completion 512, 4 pairs), with the reference's log-probs precomputed
    # (fake tensors cannot account a frozen reference model's parameters; see docs/memory-estimator.md)
    ("dpo", "llama3.2-1b", 1024, 4, ["--precompute_ref_log_probs", "true"]),
    ("dpo", "llama3.2-1b", 1024, 4, ["--precompute_ref_log_probs", "true", "--chunked_loss", "false"]),
]


def predicted(method: str, model: str, seq: int, batch: int, flags: list[str], peft: str | None = None):
    """(recipe, `ptcompile estimate`'s result) for the script run with `flags` (--name value pairs)."""
    from ptcompile.estimate import estimate
    from ptcompile.knowledge_base import KnowledgeBase
    from ptcompile.recipe import resolve

    kb = KnowledgeBase.load()
    recipe = resolve(kb, method, model, peft)
    # Script flags that are taxonomy hyperparameters (precompute_ref_log_probs) become --set overrides.
    pairs = dict(zip(flags[::2], flags[1::2]))
    overrides = [f"{flag[2:]}={value}" for flag, value in pairs.items() if recipe.has(flag[2:])]
    recipe = resolve(kb, method, model, peft, overrides)
    return recipe, estimate(recipe, seq, batch, gradient_checkpointing=pairs.get("--gradient_checkpointing") == "true",
                            chunked_loss=pairs.get("--chunked_loss", "true") == "true")


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least-squares ACT_H, ACT_I so that estimate - activations + fitted activations = measured."""
    import torch

    design, target = [], []
    for row in rows:
        recipe, result = predicted(row["method"], row["model"], row["seq"], row["batch"], row["flags"].split())
        arch = recipe.model.architecture
        per_unit = result.tokens * arch.num_layers
        other = result.tensor_peak - result.activations
        # activations = per_unit * (ACT_H * h + ACT_I * i - 2 * h * (4 - residual)); residual = 4 for full FT
        design.append([per_unit * arch.hidden_size, per_unit * arch.intermediate_size])
        target.append(row["measured_bytes"] - other)
    solution = torch.linalg.lstsq(torch.tensor(design, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)[:, None]).solution
    return float(solution[0]), float(solution[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print("| method | model | seq | batch | chunked loss | measured (GiB) | estimated (GiB) | error |")
    print("|---|---|---|---|---|---|---|---|")
    for method, model, seq, batch, flags in CONFIGURATIONS:
        row = measure(method, model, seq, batch, None, flags)
        _, result = predicted(method, model, seq, batch, flags)
        row["estimated_bytes"] = result.tensor_peak
        rows.append(row)
        error = (result.tensor_peak - row["measured_bytes"]) / row["measured_bytes"]
        chunked = "no" if "--chunked_loss" in flags else "yes"
        print(f"| {method} | {model} | {seq} | {batch} | {chunked} | {row['measured_bytes'] / GiB:.2f} | {result.tensor_peak / GiB:.2f} | {error:+.1%} |", flush=True)
    if args.fit:
        act_h, act_i = fit(rows)
        print(f"least-squares fit: ACT_H = {act_h:.2f}, ACT_I = {act_i:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
