#!/usr/bin/env bash
# Every GPU measurement issue 7 asks for, in one go (about 30 minutes on one H100): throughput and memory
# against TRL for sft / lora / dpo with the scripts' defaults and compiled, GRPO time per step, SFT packing
# on UltraChat-like lengths, and the estimator against the scripts' own peak memory. Results land in
# benchmarks/results/ (JSON + markdown); copy the tables into docs/ when they exist.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
python benchmarks/run.py --cases sft,lora --shape llama3.2-1b --seq 2048 --batch 4 --steps 12 --out benchmarks/results/h100.json
python benchmarks/run.py --cases dpo --shape llama3.2-1b --seq 512 --batch 4 --steps 12 --out benchmarks/results/h100-dpo.json
python benchmarks/run.py --cases sft,lora --shape llama3.2-1b --seq 2048 --batch 4 --steps 12 --ours-flags "--torch_compile true" --out benchmarks/results/h100-compile.json
python benchmarks/run.py --cases dpo --shape llama3.2-1b --seq 512 --batch 4 --steps 12 --ours-flags "--torch_compile true" --out benchmarks/results/h100-dpo-compile.json
python benchmarks/run.py --cases grpo --shape llama3.2-1b --steps 12 --out benchmarks/results/h100-grpo.json
python benchmarks/run.py --cases sft-packed --shape llama3.2-1b --seq 4096 --batch 2 --steps 12 --out benchmarks/results/h100-packed.json
python benchmarks/gpu_memory_check.py --out benchmarks/results/h100-memory.json
