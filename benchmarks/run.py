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
    # GRPO (anchor: 4 prompts x 8 generations, prompt 64, completion 256, beta 0): time per step
    python benchmarks/run.py --cases grpo --shape llama3.2-1b --steps 12 --out benchmarks/results/h100-grpo.json
    # the CPU check of the harness itself (CI)
    python benchmarks/run.py --shape tiny --seq 64 --batch 2 --steps 4 --warmup 1 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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


def write_data(path: Path, case: str, rows: int, seq: int, tokenizer, lengths: list[int] | None = None) -> None:
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
            if case == "grpo":  # seq = prompt tokens (the chat template adds a few); the answer is never produced
                handle.write(json.dumps({"prompt": text(i, seq - 8), "answer": "7"}) + "\n")
            elif case == "sft-packed":  # real-length documents: row i is lengths[i] tokens
                handle.write(json.dumps({"text": text(i, lengths[i])}) + "\n")
            elif case == "dpo":
                handle.write(json.dumps({"prompt": text(i, seq - 16), "chosen": text(i + 1, 2 * seq), "rejected": text(i + 2, 2 * seq)}) + "\n")
            else:
                handle.write(json.dumps({"text": text(i, seq + 32) + " " + text(i + 1, seq)}) + "\n")


def ultrachat_like_lengths(rows: int, seq: int, seed: int = 0) -> list[int]:
    """Conversation lengths drawn from benchmarks/ultrachat_like_lengths.json (log-normal; see its derivation),
    cut at seq tokens as the scripts' max_length would."""
    import random

    spec = json.loads((ROOT / "benchmarks" / "ultrachat_like_lengths.json").read_text())
    mu = math.log(spec["mean_tokens"]) - spec["sigma"] ** 2 / 2  # the log-normal whose mean is mean_tokens
    generator = random.Random(seed)
    return [max(spec["min_tokens"], min(seq, round(generator.lognormvariate(mu, spec["sigma"])))) for _ in range(rows)]


def padding_fractions(lengths: list[int], batch: int, seq: int, pack) -> dict:
    """Share of the computed positions that are padding, for micro-batches of `batch` rows padded to their
    longest row and drawn in a seeded random order (as the scripts draw them): the examples one per row, and
    packed into rows of at most seq tokens by `pack` (the emitted script's own pack())."""
    import random

    def padding(rows: list[int]) -> float:
        rows = rows[:]
        random.Random(0).shuffle(rows)
        micro_batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        return 1 - sum(rows) / sum(len(group) * max(group) for group in micro_batches)

    examples = [{"input_ids": [0] * n, "labels": [0] * n, "position_ids": list(range(n))} for n in lengths]
    packed = [len(row["input_ids"]) for row in pack(examples, seq)]
    return {"real_tokens": sum(lengths), "unpacked": padding(lengths), "packed": padding(packed), "packed_rows": len(packed)}


def flops_per_token(kb, shape: str, seq: int) -> float:
    """6N for the dense matmuls (forward + backward) plus 12·layers·hidden·seq for attention (PaLM, App. B)."""
    from ptcompile.estimate import parameter_counts

    arch = kb.model(shape).architecture
    counts = parameter_counts(arch)
    dense = counts["linear"] + (counts["head"] or counts["embed"])
    return 6 * dense + 12 * arch.num_layers * arch.hidden_size * seq


def script_function(method: str, name: str):
    """A function of the method's emitted script (compiled for the tiny preset; the function does not depend on it)."""
    from fake_memory import load_script

    return getattr(load_script(method, "tiny", None)[2], name)


CASE_METHOD = {"sft": ("sft", "tiny-text"), "sft-packed": ("sft", "tiny-text"), "lora": ("sft", "tiny-text"), "dpo": ("dpo", "tiny-preference"), "grpo": ("grpo", "tiny-math")}


def run_ours(case: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    script = work / f"ours_{case}.py"
    method, dataset = CASE_METHOD[case]
    command = [sys.executable, "-m", "ptcompile.cli", method, "--model", "tiny", "-o", str(script), "--force", "--dataset", dataset]
    if case == "lora":
        command += ["--peft", "lora", "--set", f"r={args.lora_r}", "--set", f"lora_alpha={2 * args.lora_r}"]
    sh(command)
    output = work / f"ours_{case}_run"
    run = [
        sys.executable, str(script), "--model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(output),
        "--overwrite_output_dir", "true", "--max_steps", str(args.steps), "--gradient_accumulation_steps", "1",
        "--logging_steps", "1", "--save_steps", "0", "--warmup_ratio", "0", "--seed", "0",
        "--model_dtype", "bfloat16" if case == "lora" else "float32",
    ]
    if case == "grpo":
        run += ["--per_device_train_batch_size", str(args.grpo_prompts), "--num_generations", str(args.grpo_generations),
                "--max_completion_length", str(args.grpo_completion), "--max_prompt_length", str(4 * args.grpo_prompt),
                "--beta", "0", "--steps_per_generation", "1", "--num_iterations", "1", "--temperature", "1.0", "--top_p", "1.0"]
    else:
        run += ["--per_device_train_batch_size", str(args.batch), "--max_length", str(args.seq if case != "dpo" else 2 * args.seq)]
    if case == "dpo":
        run += ["--max_prompt_length", str(args.seq)]
    elif case != "grpo":
        run += ["--text_column", "text", "--packing", "true" if case == "sft-packed" else "false"]
    run += args.ours_flags.split()
    sh(run, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [m["step_seconds"] for m in metrics], "step_tokens": [m["num_tokens"] for m in metrics] if case == "sft-packed" else None, "peak_memory_gib": max((m.get("peak_memory_gib") or 0) for m in metrics) or None}


def run_trl(case: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    out = work / f"trl_{case}.json"
    seq = args.seq if case != "dpo" else 2 * args.seq
    batch = args.grpo_prompts if case == "grpo" else args.batch
    command = [sys.executable, str(ROOT / "benchmarks" / "trl_runner.py"), case, str(model_dir), str(data), str(out), "--seq", str(seq), "--batch", str(batch), "--steps", str(args.steps), "--lora-r", str(args.lora_r)]
    if case == "grpo":
        command += ["--generations", str(args.grpo_generations), "--completion", str(args.grpo_completion)]
    sh(command)
    return json.loads(out.read_text())


def summarise(side: dict, items_per_step: int, tokens_per_step: int, flops_token: float | None, args) -> dict:
    timed = side["step_seconds"][args.warmup :] or side["step_seconds"]
    seconds = statistics.median(timed)
    tokens_per_second = tokens_per_step / seconds
    if side.get("step_tokens"):  # packed steps differ in size: real tokens over the timed steps' total time
        first = args.warmup if len(side["step_seconds"]) > args.warmup else 0
        tokens_per_second = sum(side["step_tokens"][first:]) / sum(side["step_seconds"][first:])
    mfu = tokens_per_second * flops_token / (args.peak_tflops * 1e12) if args.device_is_gpu and flops_token else None
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
    parser.add_argument("--grpo-prompts", type=int, default=4, help="GRPO: prompts per step")
    parser.add_argument("--grpo-generations", type=int, default=8, help="GRPO: completions per prompt")
    parser.add_argument("--grpo-prompt", type=int, default=64, help="GRPO: prompt tokens")
    parser.add_argument("--grpo-completion", type=int, default=256, help="GRPO: completion tokens (a random model runs every one to this limit)")
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
        if case == "grpo":
            # items = prompts; tokens = every sampled sequence (prompt + completion); MFU is not reported: the
            # step is dominated by token-by-token generation, not by the dense matmuls MFU counts.
            write_data(data, case, args.grpo_prompts * (args.steps + 2), args.grpo_prompt, tokenizer)
            items, tokens, flops = args.grpo_prompts, args.grpo_prompts * args.grpo_generations * (args.grpo_prompt + args.grpo_completion), None
        elif case == "sft-packed":
            # Enough real-length conversations for every step's packed rows, whichever packer fills them better.
            lengths = ultrachat_like_lengths(3 * args.batch * (args.steps + 2) * args.seq // 1000 + 8, args.seq)
            write_data(data, case, len(lengths), args.seq, tokenizer, lengths)
            padding = padding_fractions(lengths, args.batch, args.seq, script_function(CASE_METHOD[case][0], "pack"))
            items, tokens, flops = args.batch, args.batch * args.seq, flops_per_token(kb, args.shape, args.seq)
        else:
            write_data(data, case, args.batch * (args.steps + 2), args.seq, tokenizer)
            seq = 2 * args.seq if case == "dpo" else args.seq
            items, tokens, flops = args.batch, args.batch * (2 if case == "dpo" else 1) * seq, flops_per_token(kb, args.shape, seq)
        ours = summarise(run_ours(case, model_dir, data, work, args), items, tokens, flops, args)
        trl = summarise(run_trl(case, model_dir, data, work, args), items, tokens, flops, args)
        memory_ratio = ours["peak_memory_gib"] / trl["peak_memory_gib"] if ours["peak_memory_gib"] and trl["peak_memory_gib"] else None
        if case == "sft-packed":
            shape = f"UltraChat-like lengths packed into rows of {args.seq}, batch {args.batch} rows"
        elif case == "grpo":
            shape = (f"{args.grpo_prompts} prompts x {args.grpo_generations} generations, prompt ~{args.grpo_prompt} + completion "
                     f"{args.grpo_completion} tokens, beta 0, transformers generate")
        else:
            shape = f"seq {2 * args.seq if case == 'dpo' else args.seq}, batch {args.batch}{' pairs' if case == 'dpo' else ''}"
        results.append({
            "case": case,
            "setting": f"{args.shape} random init, {shape}, "
                       f"{'bf16 autocast, fp32 master' if case != 'lora' else 'bf16 base, LoRA r=' + str(args.lora_r) + ' all linear'}, no checkpointing"
                       f"{', ours with ' + args.ours_flags if args.ours_flags else ''}",
            "ours_flags": args.ours_flags,
            "ours": ours, "trl": trl,
            "throughput_ratio": ours["tokens_per_second"] / trl["tokens_per_second"],
            "memory_ratio": memory_ratio,
        })
        if case == "sft-packed":
            results[-1]["padding"] = padding  # share of computed positions that are padding, without and with packing
        print(json.dumps(results[-1], indent=2), flush=True)
    report = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "shape": args.shape, "cases": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = ["| case | setting | ours | TRL | throughput ratio | peak memory ours / TRL (GiB) |", "|---|---|---|---|---|---|"]
    for r in results:
        unit = {"dpo": "pairs/s", "grpo": "s/step"}.get(r["case"], "tokens/s")
        value = lambda side: {"dpo": side["items_per_second"], "grpo": side["seconds_per_step"]}.get(r["case"], side["tokens_per_second"])  # noqa: E731
        memory = f"{r['ours']['peak_memory_gib']:.1f} / {r['trl']['peak_memory_gib']:.1f}" if r["memory_ratio"] else "n/a (CPU)"
        table.append(f"| {r['case']} | {r['setting']} | {value(r['ours']):,.1f} {unit} | {value(r['trl']):,.1f} {unit} | {r['throughput_ratio']:.2f} | {memory} |")
    for r in results:
        if "padding" in r:
            p = r["padding"]
            table.append(f"\nsft-packed padding: {p['unpacked']:.1%} of the computed positions are padding without packing, "
                         f"{p['packed']:.1%} with it ({p['real_tokens']:,} real tokens).")
    out.with_suffix(".md").write_text(f"Device: {device}, {report['date']}, torch {torch.__version__}\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
