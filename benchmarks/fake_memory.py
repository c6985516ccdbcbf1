"""Measure the tensor memory of one training step of an emitted script at a real model's shape, on a CPU.

The step (the script's own collate, compute_loss, backward and optimiser step, under bf16 autocast as on a GPU
with --mixed_precision bf16) runs on *fake* tensors (torch's FakeTensorMode): every tensor has its real shape
and dtype but no storage, so an 8B model "runs" on a laptop in seconds. torch's MemTracker counts the bytes of
every live tensor and reports the peak. This is the exact tensor accounting of the code path; a real GPU adds
the CUDA context and allocator fragmentation on top (see compiler/estimate.py, OVERHEAD_*).

    python benchmarks/fake_memory.py sft qwen2.5-0.5b --seq 512 --batch 2 [--peft lora] [script flags, e.g. --chunked_loss false]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_script(method: str, model: str, peft: str | None):
    from ptcompile.knowledge_base import KnowledgeBase
    from ptcompile.recipe import resolve
    from ptcompile.render import render_script

    import importlib.util

    kb = KnowledgeBase.load()
    recipe = resolve(kb, method, model, peft)
    path = Path(tempfile.mkdtemp()) / f"fake_{method.replace('-', '_')}.py"
    path.write_text(render_script(recipe))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return kb, recipe, module


def synthetic_items(family: str, seq: int, batch: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, vocab, (n,), generator=generator).tolist()  # noqa: E731
    if family == "sft":
        items = []
        for _ in range(batch):
            tokens = ids(seq)
            items.append({"input_ids": tokens, "labels": [-100] + tokens[1:], "position_ids": list(range(seq))})
        return items
    if family in ("preference", "unpaired", "reward"):
        half = seq // 2
        return [{"prompt_ids": ids(half), "chosen_ids": ids(seq - half), "rejected_ids": ids(seq - half)} for _ in range(batch)]
    raise SystemExit(f"fake_memory: family {family} is not covered yet")


def select_trained_tokens_from_real_data(script, family: str, batch: dict) -> None:
    """Fake tensors carry no values, so ChunkedOutputLayer.trained_positions (a nonzero() over the targets)
    cannot run under FakeTensorMode. It is replaced by the answer for the real batch (the same mask
    compute_loss builds from it); the rest of the step is the script's own code."""
    if family == "sft":
        trained = batch["labels"][:, 1:] != -100
    else:  # preference and unpaired rows: the completion tokens
        trained = batch["completion_mask"][:, 1:] > 0
    rows, positions = trained.nonzero(as_tuple=True)

    def trained_positions(targets):
        assert targets.shape == trained.shape, "a batch this benchmark does not know"
        return rows, positions

    script.ChunkedOutputLayer.trained_positions = staticmethod(trained_positions)


def measure(method: str, model: str, seq: int, batch: int, peft: str | None = None, extra: list[str] | None = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptcompile.tiny import config_kwargs

    kb, recipe, script = load_script(method, model, peft)
    preset = recipe.model
    argv = ["--per_device_train_batch_size", str(batch), "--max_length", str(seq)] + (extra or [])
    args = script.parse_args(argv)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.model_dtype]
    config = AutoConfig.for_model(preset.architecture.model_type, **config_kwargs(preset))
    config._attn_implementation = "sdpa"

    class Tokenizer:  # collate only needs the pad id
        pad_token_id = 0

    items = synthetic_items(recipe.family, seq, batch, preset.architecture.vocab_size)
    precomputed = getattr(args, "precompute_ref_log_probs", False)
    if precomputed and recipe.family == "preference":  # what precompute_reference() stores in each item
        for item in items:
            item["ref_chosen_logps"], item["ref_rejected_logps"] = -100.0, -110.0
    batch_tensors = script.collate(items, Tokenizer(), args, torch.device("cpu"))  # real (small) index tensors
    if hasattr(script, "ChunkedOutputLayer"):
        select_trained_tokens_from_real_data(script, recipe.family, batch_tensors)
    started = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
        policy.config.use_cache = False
        if hasattr(script, "use_chunked_head"):  # what load_model does (--chunked_loss, on by default)
            script.use_chunked_head(policy, args, print)
        if recipe.peft is not None:
            policy = script.apply_peft(policy, args)
        context: dict = {}
        if getattr(script, "reference_logps", None) is not None and recipe.peft is None and not precomputed:
            context["reference"] = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
            if hasattr(script, "use_chunked_head"):
                script.use_chunked_head(context["reference"], args, print)

        class Autocast:  # what accelerator.autocast() does on a GPU with mixed_precision=bf16
            def autocast(self):
                return torch.autocast("cpu", dtype=torch.bfloat16)

        context["accelerator"] = Autocast()
        optimizer = script.make_optimizer(policy, args, torch.device("cpu"))
        tracker = MemTracker()
        tracker.track_external(policy, optimizer)
        with tracker:
            for step in range(2):  # the second step has optimiser state: the steady-state peak
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss_sum, _ = script.compute_loss(policy, batch_tensors, args, context)
                loss_sum.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {
        "method": method, "model": model, "peft": peft or "none", "seq": seq, "batch": batch, "flags": " ".join(extra or []),
        "measured_bytes": int(peak["Total"]),
        "by_kind": {str(k).split(".")[-1]: int(v) for k, v in peak.items() if k != "Total"},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("model")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--peft")
    args, script_flags = parser.parse_known_args()  # anything else goes to the script, e.g. --chunked_loss false
    print(json.dumps(measure(args.method, args.model, args.seq, args.batch, args.peft, script_flags), indent=2))


if __name__ == "__main__":
    main()
