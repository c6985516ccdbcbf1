"""Predict the peak GPU memory of one training step of an emitted script, and say which GPUs it fits.

The estimate is the sum of parts whose sizes follow from the model preset's dimensions and the emitted code:

  weights     full fine-tuning keeps float32 master weights (4 B/param, compute in bf16 by autocast); with PEFT
              the frozen base is bfloat16 (2 B/param) or, for QLoRA, NF4 with double quantisation (0.5 B + 0.127
              bit per quantised param, Dettmers et al. 2023) while embeddings, norms and the LM head stay bf16;
  gradients   4 B per trainable parameter (alive at the end of the backward pass: see tensor_peak);
  optimiser   AdamW's two float32 moments, 8 B per trainable parameter;
  activations saved for the backward pass, per token and decoder layer: ACT_H bytes per hidden unit plus ACT_I
              per MLP unit (fp32 residual stream, bf16 matmuls); with full fine-tuning also the bf16 copies
              autocast makes of the float32 linear weights (2 B per parameter, kept for the backward pass,
              whatever the batch); with LoRA each adapted linear also keeps its
              input cast to float32 for the adapter (4 B per input feature; 5 B with dropout: the dropout's
              output and mask); with gradient
              checkpointing only each layer's input (4 or 2 B per hidden unit) plus one layer being recomputed;
  logits      the bf16 logits (2 B per token and vocabulary entry) saved for backward, plus float32 working copies
              in the cross-entropy (8 B per token and entry): the largest single item for 128k-152k vocabularies;
              with chunked_loss (sft, preference, unpaired families; templates/common/chunked_logps.py.j2) only
              one chunk of loss_chunk_size tokens lives at a time (CHUNK_WORK B per token and entry), plus a bf16
              copy of the output weight and, when it trains, its float32 gradient accumulator;
  reference   methods with a frozen reference model and no adapter: a second copy of the weights, and its logits
              while the policy's are still alive;
  generation  online methods: the KV cache of the sampled batch (2 x layers x KV width x 2 B per token);
  overhead    CUDA context, cuBLAS workspaces and allocator fragmentation: OVERHEAD_FIXED + OVERHEAD_FRACTION.

The peak of a step is reached either at the start of the backward pass (activations and logits all alive,
optimiser state allocated, gradients not yet materialised) or, for short sequences, at its end (all gradients
written): `Estimate.tensor_peak` takes the larger.

ACT_H and ACT_I were fitted to fake-tensor measurements of the emitted SFT script's real step at 8192 tokens per
micro-batch, where activations dominate (benchmarks/fake_memory.py: exact byte accounting of every tensor, no GPU
needed; benchmarks/estimator_table.py prints the comparison, docs/memory-estimator.md has it). Validation on a
real H100 is pending: the scripts log peak_memory_gib on CUDA, and benchmarks/run.py records it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass

from .errors import CompileError

GiB = 1024**3
ACT_H = 24.6  # bytes per token, layer and hidden unit (fitted; see module docstring)
ACT_I = 10.7  # bytes per token, layer and MLP unit
LOGITS_SAVED = 2  # bf16 logits kept for backward
LOGITS_WORK = 8  # float32 upcast + log-softmax in the cross-entropy
LOSS_CHUNK_SIZE = 1024  # the scripts' default --loss_chunk_size
CHUNK_WORK = 10  # chunked_loss backward: a chunk's float32 logits and softmax-gradient, and its bf16 gradient
OVERHEAD_FIXED = 0.75 * GiB
OVERHEAD_FRACTION = 0.05
NF4_BYTES = 0.5 + 0.127 / 8

GPUS = {  # usable memory of common cards, GiB
    "24GB": 24.0,
    "40GB": 40.0,
    "80GB": 80.0,
    "141GB": 141.0,
}
GPU_ALIASES = {
    "rtx3090": "24GB", "rtx4090": "24GB", "a10": "24GB", "a10g": "24GB", "l4": "24GB", "24gb": "24GB", "24": "24GB",
    "a100-40gb": "40GB", "a100-40": "40GB", "40gb": "40GB", "40": "40GB",
    "a100": "80GB", "a100-80gb": "80GB", "h100": "80GB", "h100-80gb": "80GB", "80gb": "80GB", "80": "80GB",
    "h200": "141GB", "141gb": "141GB", "141": "141GB",
}

SEQUENCES_PER_ITEM = {"preference": 2, "unpaired": 2, "reward": 2, "online-preference": 2}


@dataclass
class Estimate:
    weights: float
    optimizer: float
    activations: float
    logits: float
    reference: float
    generation: float
    overhead: float
    trainable_params: int
    total_params: int
    tokens: int

    gradients: float = 0.0

    @property
    def tensor_peak(self) -> float:
        """Peak bytes of live tensors (what torch.cuda.max_memory_allocated reports).

        Two moments compete: the start of the backward pass (all activations and logits alive) and its end
        (all gradients written, activations freed, the embedding/LM-head gradient being formed)."""
        start_of_backward = self.weights + self.optimizer + self.activations + self.logits + self.reference + self.generation
        end_of_backward = self.weights + self.optimizer + self.gradients + 0.5 * self.logits + self.reference
        return max(start_of_backward, end_of_backward)

    @property
    def total(self) -> float:
        """What must fit on the card: the tensor peak plus CUDA context and allocator overhead."""
        return self.tensor_peak + self.overhead


def linear_shapes(arch) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one decoder layer, by module name."""
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    h, i = arch.hidden_size, arch.intermediate_size
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "qkv_proj": (h, q + 2 * kv), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        "gate_up_proj": (h, 2 * i), "w1": (h, i), "w3": (h, i), "w2": (i, h),
    }


def parameter_counts(arch) -> dict[str, int]:
    shapes = linear_shapes(arch)
    attention = sum(a * b for n, (a, b) in shapes.items() if n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = 3 * arch.hidden_size * arch.intermediate_size
    if arch.num_experts:
        mlp = arch.num_experts * mlp + arch.hidden_size * arch.num_experts
    layer_linear = attention + mlp
    embed = arch.vocab_size * arch.hidden_size
    head = 0 if arch.tie_word_embeddings else embed
    norms = arch.num_layers * 2 * arch.hidden_size + arch.hidden_size
    return {"linear": arch.num_layers * layer_linear, "embed": embed, "head": head, "norms": norms,
            "total": arch.num_layers * layer_linear + embed + head + norms}


def adapter_params(recipe, arch) -> int:
    """Trainable parameters of the PEFT technique (LoRA family: r x (in + out) per adapted linear)."""
    peft = recipe.peft
    shapes = linear_shapes(arch)
    targets = [m for m in recipe.model.lora_target_modules if m in shapes]
    experts = arch.num_experts or 1
    per_layer_features = sum((shapes[m][0] + shapes[m][1]) * (experts if m in ("w1", "w2", "w3") else 1) for m in targets)
    if peft.id in ("lora", "qlora", "dora", "rslora"):
        rank = recipe.hp("r")
        extra = sum(shapes[m][1] for m in targets) if peft.id == "dora" else 0  # DoRA's magnitude vectors
        return arch.num_layers * (rank * per_layer_features + extra)
    if peft.id == "adalora":
        return arch.num_layers * (recipe.hp("init_r") * (per_layer_features + len(targets)))
    if peft.id in ("prefix-tuning", "p-tuning-v2"):
        kv = arch.num_key_value_heads * arch.head_dim
        return recipe.hp("num_virtual_tokens") * arch.num_layers * 2 * kv
    if peft.id == "prompt-tuning":
        return recipe.hp("num_virtual_tokens") * arch.hidden_size
    return arch.num_layers * (2 * arch.num_key_value_heads * arch.head_dim + arch.intermediate_size)  # IA3


def uses_chunked_loss(recipe) -> bool:
    """Whether the emitted script forms log-probabilities chunk by chunk with its defaults (--chunked_loss true)."""
    from .runtime_args import CHUNKED_LOSS_FAMILIES, PLAIN_HEAD_MODEL_TYPES

    return recipe.family in CHUNKED_LOSS_FAMILIES and recipe.model.architecture.model_type in PLAIN_HEAD_MODEL_TYPES


def output_layer_bytes(recipe, tokens: int, chunked: bool, head_trains: bool) -> float:
    """Memory of forming the log-probabilities of `tokens` tokens (see `logits` in the module docstring)."""
    arch = recipe.model.architecture
    if not chunked:
        return tokens * arch.vocab_size * (LOGITS_SAVED + LOGITS_WORK)
    weight = arch.vocab_size * arch.hidden_size
    return min(tokens, LOSS_CHUNK_SIZE) * arch.vocab_size * CHUNK_WORK + 2.0 * weight + (4.0 * weight if head_trains else 0.0)


def estimate(recipe, seq: int | None = None, batch: int | None = None, gradient_checkpointing: bool = False, chunked_loss: bool = True) -> Estimate:
    arch = recipe.model.architecture
    seq = seq or (recipe.hp("max_length") if recipe.has("max_length") else 1024)
    batch = batch or (recipe.hp("per_device_train_batch_size") if recipe.has("per_device_train_batch_size") else 1)
    counts = parameter_counts(arch)
    total_params = counts["total"]
    sequences = batch * SEQUENCES_PER_ITEM.get(recipe.family, 1)
    tokens = sequences * seq
    h, i = arch.hidden_size, arch.intermediate_size
    mlp_units = i * (arch.num_experts_per_token or 1)

    if recipe.peft is None:
        trainable = total_params
        weights = 4.0 * total_params
        residual_bytes = 4
        adapter_act = 0.0
    else:
        trainable = adapter_params(recipe, arch)
        if recipe.peft.quantized:
            weights = NF4_BYTES * counts["linear"] + 2.0 * (total_params - counts["linear"])
        else:
            weights = 2.0 * total_params
        weights += 4.0 * trainable
        residual_bytes = 2
        shapes = linear_shapes(arch)
        adapted_inputs = sum(shapes[m][0] for m in recipe.model.lora_target_modules if m in shapes)
        # Each adapted linear casts its input to float32 for the adapter (4 B per feature) and, with LoRA dropout,
        # keeps the dropout's output instead plus its mask (4 + 1 B).
        dropout = recipe.has("lora_dropout") and recipe.hp("lora_dropout") > 0
        per_feature = 5.0 if dropout else 4.0
        adapter_act = per_feature * adapted_inputs if recipe.peft.id in ("lora", "qlora", "dora", "rslora", "adalora") else 0.0

    per_token_layer = ACT_H * h + ACT_I * mlp_units - (4 - residual_bytes) * 2 * h + adapter_act
    if gradient_checkpointing:
        activations = tokens * (arch.num_layers * residual_bytes * h + per_token_layer)
    else:
        activations = tokens * arch.num_layers * per_token_layer
    if recipe.peft is None:
        activations += 2.0 * counts["linear"]  # autocast's bf16 copies of the float32 linear weights
    chunked = chunked_loss and uses_chunked_loss(recipe)
    logits = output_layer_bytes(recipe, tokens, chunked, head_trains=recipe.peft is None)
    reference = 0.0
    if recipe.method.needs.reference_model and recipe.peft is None and recipe.family in ("preference", "unpaired", "online-preference", "ppo", "policy-gradient"):
        precomputed = recipe.has("precompute_ref_log_probs") and recipe.hp("precompute_ref_log_probs")
        if not precomputed:
            reference = 4.0 * total_params + output_layer_bytes(recipe, tokens, chunked, head_trains=False)
    generation = 0.0
    if recipe.method.needs.generation:
        kv_width = arch.num_key_value_heads * arch.head_dim
        generation = 2 * arch.num_layers * kv_width * 2 * tokens
    optimizer = 8.0 * trainable
    result = Estimate(weights, optimizer, activations, logits, reference, generation, 0.0, trainable, total_params, tokens, gradients=4.0 * trainable)
    result.overhead = OVERHEAD_FIXED + OVERHEAD_FRACTION * result.tensor_peak
    return result


def resolve_gpu(name: str) -> tuple[str, float]:
    key = re.sub(r"[\s_]", "", name.lower())
    if key in GPU_ALIASES:
        label = GPU_ALIASES[key]
        return label, GPUS[label]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(gb|gib)?", key)
    if match:
        return f"{match.group(1)}GB", float(match.group(1))
    raise CompileError(f"unknown GPU '{name}'; use a size like 24GB or one of {', '.join(sorted(GPU_ALIASES))}")


def suggestions(recipe, result: Estimate, capacity_gib: float, gradient_checkpointing: bool) -> list[str]:
    hints = []
    if not gradient_checkpointing:
        hints.append("--gradient_checkpointing true (activations shrink to one layer's worth)")
    if recipe.peft is None:
        hints.append("--peft lora (frozen bf16 base, no optimiser state for it)")
    elif not recipe.peft.quantized:
        hints.append("--peft qlora (4-bit base weights)")
    hints.append("a smaller --per_device_train_batch_size with more --gradient_accumulation_steps (same effective batch)")
    if recipe.peft is None:
        static = (result.weights + result.optimizer + result.reference) / GiB
        gpus = max(2, math.ceil(static / max(capacity_gib * 0.5, 1e-9)))
        hints.append(f"FSDP over {gpus}+ GPUs (`accelerate config` -> FSDP): weights and optimiser state are sharded")
    return hints


def fit_warning(kb, recipe, gpu: str) -> str | None:
    label, capacity = resolve_gpu(gpu)
    result = estimate(recipe)
    if result.total / GiB <= capacity:
        return None
    hints = suggestions(recipe, result, capacity, False)
    return f"this configuration needs about {result.total / GiB:.1f} GiB per GPU (batch and length from the defaults), more than a {label} GPU has. Try: " + "; ".join(hints)


def main(argv: list[str]) -> int:
    from .knowledge_base import KnowledgeBase
    from .recipe import resolve

    parser = argparse.ArgumentParser(prog="ptcompile estimate", description="Predict peak GPU memory of a compiled script's training step.")
    parser.add_argument("method")
    parser.add_argument("--model", help="model preset (default: the method's)")
    parser.add_argument("--peft", default="none")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the recipe's max_length)")
    parser.add_argument("--batch", type=int, help="per-device micro-batch (default: the recipe's)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-chunked-loss", dest="chunked_loss", action="store_false", help="as the script with --chunked_loss false (full logits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--taxonomy", metavar="DIR")
    args = parser.parse_args(argv)
    from pathlib import Path

    kb = KnowledgeBase.load(Path(args.taxonomy) if args.taxonomy else None)
    recipe = resolve(kb, args.method, args.model, args.peft, args.overrides)
    result = estimate(recipe, args.seq, args.batch, args.gradient_checkpointing, args.chunked_loss)
    verdicts = {label: result.total / GiB <= capacity for label, capacity in GPUS.items()}
    if args.json:
        print(json.dumps({**asdict(result), "tensor_peak": result.tensor_peak, "total": result.total, "total_gib": result.total / GiB, "fits": verdicts}, indent=2))
        return 0
    print(f"{recipe.method.id} x {recipe.model.id} ({recipe.peft.id if recipe.peft else 'full fine-tuning'}), {result.tokens} tokens per micro-batch"
          + (", gradient checkpointing" if args.gradient_checkpointing else "")
          + (", chunked loss" if args.chunked_loss and uses_chunked_loss(recipe) else ""))
    print(f"parameters: {result.total_params / 1e9:.3f} B total, {result.trainable_params / 1e6:.1f} M trainable")
    for name in ("weights", "optimizer", "gradients", "activations", "logits", "reference", "generation"):
        value = getattr(result, name)
        if value:
            print(f"  {name:12s} {value / GiB:8.2f} GiB")
    print(f"  {'tensor peak':12s} {result.tensor_peak / GiB:8.2f} GiB  (what torch.cuda.max_memory_allocated would report)")
    print(f"  {'+ overhead':12s} {result.overhead / GiB:8.2f} GiB  (CUDA context, workspaces, fragmentation)")
    print(f"  {'total':12s} {result.total / GiB:8.2f} GiB")
    for label, capacity in GPUS.items():
        print(f"  {label:>6s}: {'fits' if verdicts[label] else 'does not fit'}")
    smallest_missing = [label for label, ok in verdicts.items() if not ok]
    if smallest_missing:
        capacity = GPUS[smallest_missing[-1]]
        print("to fit a smaller GPU: " + "; ".join(suggestions(recipe, result, capacity, args.gradient_checkpointing)))
    return 0
