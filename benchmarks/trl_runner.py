"""The TRL 1.16 side of a benchmark case: the same model, data, batch, length and precision as the emitted
script, trained by TRL's own trainer, with per-step wall times and peak GPU memory recorded by a callback.

    python benchmarks/trl_runner.py CASE MODEL_DIR DATA.jsonl OUT.json --seq N --batch B --steps S [--lora-r R]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


class StepTimer:
    """A TrainerCallback that records each optimizer step's wall time (synchronising the GPU first)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                outer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                outer.seconds.append(time.perf_counter() - outer.started)
                outer.tokens_seen.append(state.num_input_tokens_seen)  # counted when include_num_input_tokens_seen is set

        self.seconds: list[float] = []
        self.tokens_seen: list[int] = []
        self.started = 0.0
        self.callback = Callback()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["sft", "lora", "dpo", "grpo", "sft-packed"])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8, help="grpo: completions per prompt (--batch is prompts)")
    parser.add_argument("--completion", type=int, default=256, help="grpo: completion tokens")
    args = parser.parse_args()

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if args.case != "lora" else torch.bfloat16, attn_implementation="sdpa")
    dataset = load_dataset("json", data_files=args.data, split="train")
    common = dict(
        output_dir=args.out + ".trl-run", per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[], bf16=cuda,
        use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch", gradient_checkpointing=False,
        dataloader_num_workers=0, seed=0,
    )
    if args.case != "grpo":
        common["max_length"] = args.seq
    timer = StepTimer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.case in ("sft", "lora", "sft-packed"):
        from trl import SFTConfig, SFTTrainer

        peft_config = None
        if args.case == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        if args.case == "sft-packed":
            # TRL's default packing (best-fit decreasing, padding-free rows with restarting position ids), and the
            # real tokens of every step counted, since packed steps hold different numbers of them.
            config = SFTConfig(**common, packing=True, dataset_text_field="text", include_num_input_tokens_seen="non_padding")
        else:
            config = SFTConfig(**common, packing=False, dataset_text_field="text")
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config, callbacks=[timer.callback])
    elif args.case == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        # The prompt as a user message, so TRL applies the same chat template the emitted script applies.
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})

        def no_reward(completions, **kwargs):  # the emitted script's math reward is 0 for every random completion too
            return [0.0] * len(completions)

        # per_device_train_batch_size counts completions in TRL: prompts x generations, all sampled at once.
        common["per_device_train_batch_size"] = args.batch * args.generations
        config = GRPOConfig(**common, num_generations=args.generations, max_completion_length=args.completion, beta=0.0,
                            temperature=1.0, top_p=1.0, top_k=0, steps_per_generation=1, num_iterations=1, loss_type="grpo")
        trainer = GRPOTrainer(model=model, reward_funcs=no_reward, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer.callback])
    else:
        from trl import DPOConfig, DPOTrainer

        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
        config = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer.callback])
    trainer.train()
    result = {
        "step_seconds": timer.seconds,
        "step_tokens": [b - a for a, b in zip([0] + timer.tokens_seen, timer.tokens_seen)] if args.case == "sft-packed" else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trl_version": __import__("trl").__version__,
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
