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

        self.seconds: list[float] = []
        self.started = 0.0
        self.callback = Callback()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["sft", "lora", "dpo"])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lora-r", type=int, default=16)
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
        dataloader_num_workers=0, seed=0, max_length=args.seq,
    )
    timer = StepTimer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.case in ("sft", "lora"):
        from trl import SFTConfig, SFTTrainer

        peft_config = None
        if args.case == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        config = SFTConfig(**common, packing=False, dataset_text_field="text")
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config, callbacks=[timer.callback])
    else:
        from trl import DPOConfig, DPOTrainer

        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
        config = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer.callback])
    trainer.train()
    result = {
        "step_seconds": timer.seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trl_version": __import__("trl").__version__,
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
