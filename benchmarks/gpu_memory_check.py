"""Check `ptcompile estimate` against the peak GPU memory the emitted scripts themselves report.

Each configuration compiles a method's script, trains a random-init model of a preset's exact shape for a few
steps on synthetic rows of exactly the given length, and reads `peak_memory_gib` (torch.cuda's
max_memory_allocated, logged by every script on CUDA) from its metrics.jsonl. The estimator's `tensor_peak` for
the same setting is set beside it. The issue's bar: at least 6 configurations within ±15%. Results: JSON plus
a markdown table (docs/memory-estimator.md's GPU section is written from it).

    # on a GPU machine (about 10 minutes on an H100)
    python benchmarks/gpu_memory_check.py --out benchmarks/results/h100-memory.json
    # the plumbing, on a CPU (no peak memory there: the table says so)
    python benchmarks/gpu_memory_check.py --configs tiny --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estimator_table import predicted  # noqa: E402
from run import CASE_METHOD, sh, write_data  # noqa: E402

GiB = 1024**3

# (method, shape preset, PEFT, tokens per sequence, micro-batch (pairs for DPO), script flags)
H100_CONFIGS = [
    ("sft", "llama3.2-1b", None, 2048, 4, []),
    ("sft", "llama3.2-1b", None, 2048, 4, ["--chunked_loss", "false"]),
    ("sft", "qwen2.5-0.5b", None, 2048, 4, []),
    ("sft", "llama3.2-1b", "lora", 2048, 4, []),
    ("sft", "llama3.2-1b", "qlora", 2048, 4, []),
    ("sft", "llama3.2-1b", None, 2048, 4, ["--gradient_checkpointing", "true"]),
    ("dpo", "llama3.2-1b", None, 1024, 4, []),
    ("dpo", "llama3.2-1b", None, 1024, 4, ["--precompute_ref_log_probs", "true"]),
]
TINY_CONFIGS = [("sft", "tiny", None, 64, 2, []), ("dpo", "tiny", None, 64, 2, [])]


def measure(config, work: Path, steps: int) -> float | None:
    """Run the emitted script; its largest logged peak_memory_gib (None without CUDA)."""
    method, shape, peft, seq, batch, flags = config
    model_dir = work / f"model-{shape}"
    if not (model_dir / "model" / "config.json").exists():
        sh([sys.executable, "-m", "ptcompile.cli", "tiny", str(model_dir), "--shape", shape, "--force"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "model")
    name = f"{method}-{shape}-{peft or 'full'}-{seq}x{batch}-{'-'.join(f.strip('-') for f in flags) or 'default'}"
    data = work / f"{name}.jsonl"
    case = "dpo" if method == "dpo" else "sft"
    write_data(data, case, batch * (steps + 2), seq // 2 if case == "dpo" else seq, tokenizer)
    script = work / f"{name}.py"
    command = [sys.executable, "-m", "ptcompile.cli", method, "--model", "tiny", "-o", str(script), "--force", "--dataset", CASE_METHOD[case][1]]
    if peft:
        command += ["--peft", peft]
    sh(command)
    output = work / f"{name}-run"
    run = [sys.executable, str(script), "--model_name_or_path", str(model_dir / "model"), "--dataset", str(data), "--output_dir", str(output),
           "--overwrite_output_dir", "true", "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--max_length", str(seq), "--gradient_accumulation_steps", "1",
           "--logging_steps", "1", "--save_steps", "0", "--warmup_ratio", "0", "--model_dtype", "bfloat16" if peft else "float32"]
    run += ["--max_prompt_length", str(seq // 2)] if case == "dpo" else ["--text_column", "text"]
    sh(run + flags, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    peaks = [m["peak_memory_gib"] for m in metrics if m.get("peak_memory_gib")]
    return max(peaks) if peaks else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", choices=["h100", "tiny"], default="h100")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="benchmarks/work-memory")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in H100_CONFIGS if args.configs == "h100" else TINY_CONFIGS:
        method, shape, peft, seq, batch, flags = config
        measured = measure(config, work, args.steps)
        estimated = predicted(method, shape, seq, batch, flags, peft)[1].tensor_peak / GiB
        error = (estimated - measured) / measured if measured else None
        rows.append({"method": method, "shape": shape, "peft": peft or "none", "seq": seq, "batch": batch, "flags": " ".join(flags),
                     "measured_gib": measured, "estimated_gib": estimated, "error": error})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    within = [r for r in rows if r["error"] is not None and abs(r["error"]) <= 0.15]
    report = {"device": device, "date": datetime.date.today().isoformat(), "rows": rows, "within_15_percent": len(within)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = [f"Device: {device}, {report['date']}; {len(within)} of {len(rows)} configurations within ±15%", "",
             "| method | shape | PEFT | seq | batch | flags | measured peak (GiB) | estimated (GiB) | error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = f"{r['measured_gib']:.2f}" if r["measured_gib"] else "n/a (no CUDA)"
        error = f"{r['error']:+.1%}" if r["error"] is not None else "n/a"
        table.append(f"| {r['method']} | {r['shape']} | {r['peft']} | {r['seq']} | {r['batch']} | {r['flags'] or '-'} | {measured} | {r['estimated_gib']:.2f} | {error} |")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
