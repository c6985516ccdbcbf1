"""Side-by-side benchmark: an emitted ptcompile script against its TRL 1.16 counterpart, in one run.

Both sides train the same random-init model (a preset's exact shape, e.g. Llama-3.2-1B), on the same synthetic
data (every row exactly --seq tokens), with the same micro-batch, precision (fp32 master weights + bf16
autocast on a GPU) and optimiser (fused AdamW), no gradient checkpointing. Steps after --warmup are timed.
Reported per case: tokens/s (pairs/s for DPO), peak GPU memory, MFU (against --peak-tflops), and the ratios
ours/TRL. Results go to a JSON file (device name, date, cases with ratio fields) and a markdown table.

    # the H100 run (issue: >= 1.5x TRL throughput at <= TRL memory)
    python benchmarks/run.py --shape llama3.2-1b --seq 2048 --batch 4 --steps 12 --out benchmarks/results/h100.json
    # the same with our scripts compiled (every row is --seq tokens: one compile, inside the untimed warm-up)
    python benchmarks/run.py --shape llama3.2-1b --seq 2048 --batch 4 --steps 12 --ours-flags "--torch_compile true" --out benchmarks/results/h100-compile.json
    # the CPU check of the harness itself (CI)
    python benchmarks/run.py --shape tiny --seq 64 --batch 2 --steps 4 --warmup 1 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "seven", "table", "light", "north"]


def sh(command: list[str], **kwargs) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def write_data(path: Path, case: str, rows: int, seq: int, tokenizer) -> None:
    """Rows sized with the model's tokenizer so that every sequence is exactly --seq tokens after truncation.

    SFT/LoRA: a text of a little more than seq tokens (truncated to seq). DPO: a prompt just under seq tokens
    (the emitted script keeps the last max_prompt_length of it; TRL keeps the whole prompt) and completions
    longer than seq (truncated), so both sides score seq + seq tokens per sequence.
    """

    def text(i: int, tokens: int) -> str:
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(tokens)]
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > tokens:
            words = words[: int(len(words) * 0.9)]
        return " ".join(words)

    with path.open("w") as handle:
        for i in range(rows):
            if case == "dpo":
                handle.write(json.dumps({"prompt": text(i, seq - 16), "chosen": text(i + 1, 2 * seq), "rejected": text(i + 2, 2 * seq)}) + "\n")
            else:
                handle.write(json.dumps({"text": text(i, seq + 32) + " " + text(i + 1, seq)}) + "\n")


def flops_per_token(kb, shape: str, seq: int) -> float:
    """6N for the dense matmuls (forward + backward) plus 12·layers·hidden·seq for attention (PaLM, App. B)."""
    from ptcompile.estimate import parameter_counts

    arch = kb.model(shape).architecture
    counts = parameter_counts(arch)
    dense = counts["linear"] + (counts["head"] or counts["embed"])
    return 6 * dense + 12 * arch.num_layers * arch.hidden_size * seq


def run_ours(case: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    script = work / f"ours_{case}.py"
    method = "dpo" if case == "dpo" else "sft"
    command = [sys.executable, "-m", "ptcompile.cli", method, "--model", "tiny", "-o", str(script), "--force", "--dataset", "tiny-preference" if case == "dpo" else "tiny-text"]
    if case == "lora":
        command += ["--peft", "lora", "--set", f"r={args.lora_r}", "--set", f"lora_alpha={2 * args.lora_r}"]
    sh(command)
    output = work / f"ours_{case}_run"
    run = [
        sys.executable, str(script), "--model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(output),
        "--overwrite_output_dir", "true", "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
        "--gradient_accumulation_steps", "1", "--max_length", str(args.seq if case != "dpo" else 2 * args.seq),
        "--logging_steps", "1", "--save_steps", "0", "--warmup_ratio", "0", "--seed", "0",
        "--model_dtype", "bfloat16" if case == "lora" else "float32",
    ]
    if case == "dpo":
        run += ["--max_prompt_length", str(args.seq)]
    else:
        run += ["--text_column", "text"]
    run += args.ours_flags.split()
    sh(run, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [m["step_seconds"] for m in metrics], "peak_memory_gib": max((m.get("peak_memory_gib") or 0) for m in metrics) or None}


def run_trl(case: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    out = work / f"trl_{case}.json"
    seq = args.seq if case != "dpo" else 2 * args.seq
    sh([sys.executable, str(ROOT / "benchmarks" / "trl_runner.py"), case, str(model_dir), str(data), str(out), "--seq", str(seq), "--batch", str(args.batch), "--steps", str(args.steps), "--lora-r", str(args.lora_r)])
    return json.loads(out.read_text())


def summarise(side: dict, items_per_step: int, tokens_per_step: int, flops_token: float, args) -> dict:
    timed = side["step_seconds"][args.warmup :] or side["step_seconds"]
    seconds = statistics.median(timed)
    tokens_per_second = tokens_per_step / seconds
    mfu = tokens_per_second * flops_token / (args.peak_tflops * 1e12) if args.device_is_gpu else None
    return {"seconds_per_step": seconds, "items_per_second": items_per_step / seconds, "tokens_per_second": tokens_per_second,
            "peak_memory_gib": side.get("peak_memory_gib"), "mfu": mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="sft,lora,dpo")
    parser.add_argument("--shape", default="llama3.2-1b", help="model preset whose dimensions the random-init model takes")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (DPO: prompt and completion each)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--ours-flags", default="", help="extra flags for our scripts, e.g. '--torch_compile true' or '--chunked_loss false'")
    parser.add_argument("--work", default="benchmarks/work")
    parser.add_argument("--out", default="benchmarks/results/latest.json")
    args = parser.parse_args()

    import torch

    from ptcompile.knowledge_base import KnowledgeBase

    args.device_is_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if args.device_is_gpu else "cpu"
    kb = KnowledgeBase.load()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"model-{args.shape}"
    if not (model_dir / "model" / "config.json").exists():
        sh([sys.executable, "-m", "ptcompile.cli", "tiny", str(model_dir), "--shape", args.shape, "--force"])
    model_dir = model_dir / "model"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = []
    for case in args.cases.split(","):
        data = work / f"data-{case}.jsonl"
        write_data(data, case, args.batch * (args.steps + 2), args.seq, tokenizer)
        sequences = args.batch * (2 if case == "dpo" else 1)
        seq = 2 * args.seq if case == "dpo" else args.seq
        tokens = sequences * seq
        flops = flops_per_token(kb, args.shape, seq)
        ours = summarise(run_ours(case, model_dir, data, work, args), args.batch, tokens, flops, args)
        trl = summarise(run_trl(case, model_dir, data, work, args), args.batch, tokens, flops, args)
        memory_ratio = ours["peak_memory_gib"] / trl["peak_memory_gib"] if ours["peak_memory_gib"] and trl["peak_memory_gib"] else None
        results.append({
            "case": case,
            "setting": f"{args.shape} random init, seq {seq}, batch {args.batch}{' pairs' if case == 'dpo' else ''}, "
                       f"{'bf16 autocast, fp32 master' if case != 'lora' else 'bf16 base, LoRA r=' + str(args.lora_r) + ' all linear'}, no checkpointing"
                       f"{', ours with ' + args.ours_flags if args.ours_flags else ''}",
            "ours_flags": args.ours_flags,
            "ours": ours, "trl": trl,
            "throughput_ratio": ours["items_per_second"] / trl["items_per_second"],
            "memory_ratio": memory_ratio,
        })
        print(json.dumps(results[-1], indent=2), flush=True)
    report = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "shape": args.shape, "cases": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = ["| case | setting | ours | TRL | throughput ratio | peak memory ours / TRL (GiB) |", "|---|---|---|---|---|---|"]
    for r in results:
        unit = "pairs/s" if r["case"] == "dpo" else "tokens/s"
        value = lambda side: side["items_per_second"] if r["case"] == "dpo" else side["tokens_per_second"]  # noqa: E731
        memory = f"{r['ours']['peak_memory_gib']:.1f} / {r['trl']['peak_memory_gib']:.1f}" if r["memory_ratio"] else "n/a (CPU)"
        table.append(f"| {r['case']} | {r['setting']} | {value(r['ours']):,.1f} {unit} | {value(r['trl']):,.1f} {unit} | {r['throughput_ratio']:.2f} | {memory} |")
    out.with_suffix(".md").write_text(f"Device: {device}, {report['date']}, torch {torch.__version__}\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
