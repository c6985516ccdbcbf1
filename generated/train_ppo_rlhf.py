"""PPO-RLHF (InstructGPT-style) (ppo-rlhf): a single-file training script compiled by ptcompile.

Papers:
    - Training language models to follow instructions with human feedback (Ouyang et al., 2022), arXiv 2203.02155 [ouyang2022training]
    - Proximal Policy Optimization Algorithms (Schulman et al., 2017), arXiv 1707.06347 [schulman2017proximal]
    - High-Dimensional Continuous Control Using Generalized Advantage Estimation (Schulman et al., 2015), arXiv 1506.02438 [schulman2015highdimensional]
    - Learning to summarize from human feedback (Stiennon et al., 2020), arXiv 2009.01325 [stiennon2020learning]

Objective (InstructGPT Eq. 2 (reward minus KL to the SFT model); PPO Eq. 7 (clipped surrogate) and Eqs. 11-12 (truncated GAE) of ouyang2022training):
    r_t = R(x,y)·[t=T] − β·log(π_old(y_t|s_t)/π_ref(y_t|s_t)); δ_t = r_t + γ·V_old(s_{t+1}) −
    V_old(s_t); Â_t = Σ_l (γλ)^l·δ_{t+l}; ρ_t = π_θ(y_t|s_t)/π_old(y_t|s_t); L = −E_t[ min(ρ_t·Â_t,
    clip(ρ_t, 1−ε, 1+ε)·Â_t) ] + c_v·½·E_t[ max((V(s_t) − R̂_t)², (clip(V(s_t), V_old(s_t)−ε_v,
    V_old(s_t)+ε_v) − R̂_t)²) ], R̂_t = Â_t + V_old(s_t) (s_t = prompt x plus y_<t; E_t = mean over
    completion tokens)

The classic RLHF loop: the policy writes completions for prompts, a learned reward model scores each
completion once at its end, and a per-token penalty on the log-ratio to the frozen SFT model keeps
the policy from drifting into text the reward model misjudges. A value head trained alongside the
policy turns these rewards into per-token advantages with GAE, and PPO's clipped surrogate lets
several minibatch updates reuse one batch of rollouts.

Model:   Qwen2.5-0.5B-Instruct (Qwen/Qwen2.5-0.5B-Instruct), full fine-tuning
Data:    UltraFeedback prompts (trl-lib/ultrafeedback-prompt, split train), format "prompt"
Every hyperparameter in `Args` names its source (paper and section, or common practice and why).

Compiled with:
    ptcompile ppo-rlhf --model qwen2.5-0.5b-instruct

Run:
    python train_ppo_rlhf.py --help
    python train_ppo_rlhf.py                          # one process: a GPU if there is one, else the CPU
    accelerate launch train_ppo_rlhf.py               # data parallel over all GPUs (`accelerate config` for FSDP)
    python train_ppo_rlhf.py --resume_from_checkpoint latest   # continue an interrupted run exactly

Requires: torch, transformers>=5, accelerate, datasets.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
import re
from fractions import Fraction
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


@dataclass
class Args:
    """Every setting of the run. Each field is a command-line flag: --name value (booleans: true/false)."""

    # --- Model and data ------------------------------------------------------------------------------
    model_name_or_path: str = 'Qwen/Qwen2.5-0.5B-Instruct'
    """Hub id or local directory of the model (preset 'qwen2.5-0.5b-instruct')."""
    model_dtype: str = 'float32'
    """dtype the weights are loaded in: float32, bfloat16 or float16. Full fine-tuning keeps
    float32 master weights and computes in bf16 through --mixed_precision."""
    attn_implementation: str = 'sdpa'
    """Attention kernel: sdpa (PyTorch), eager, or flash_attention_2 if installed."""
    dataset: str = 'trl-lib/ultrafeedback-prompt'
    """A local .jsonl / .json / .parquet file or a Hub dataset id (preset 'ultrafeedback-prompts')."""
    dataset_config: str = ''
    """Hub dataset configuration name ('' for none)."""
    dataset_split: str = 'train'
    """Hub dataset split."""
    prompt_column: str = 'prompt'
    """Column holding prompt: a string or a list of messages."""
    answer_column: str = 'answer'
    """Column holding answer: the reference answer, for verifiable rewards."""
    answer_format: str = 'plain'
    """How the answer column is written: plain, gsm8k ('#### 42') or boxed (\\boxed{42})."""
    reward_model_path: str = 'runs/reward-model/final'
    """Directory written by a ptcompile reward-model script (AutoModelForSequenceClassification +
    ptcompile_scorer.json)."""
    reward_batch_size: int = 16
    """Completions scored per reward-model forward pass."""
    output_dir: str = 'runs/ppo-rlhf'
    """Where checkpoints, metrics.jsonl and the final model go."""

    # --- Method hyperparameters: PPO-RLHF (InstructGPT-style) ----------------------------------------
    kl_coef: float = 0.02
    """Weight β of the per-token penalty log(π_old/π_ref) subtracted from the reward; larger keeps
    the policy nearer the SFT model. Typical range: [0.0, 1.0]. Source: ouyang2022training, App.
    C.4: KL reward computed as in Stiennon et al. with β = 0.02 (Eq. 2)."""
    cliprange: float = 0.2
    """PPO clip range ε on the policy probability ratio. Typical range: [0.05, 0.5]. Source:
    ouyang2022training, App. C.4: 'The PPO clip ratio is set to 0.2'."""
    cliprange_value: float = 0.2
    """Clip range ε_v of the value prediction around its rollout-time value in the clipped value
    loss. Typical range: [0.01, 10.0]. Source: common practice: Default of TRL's former
    PPOConfig (trl.experimental.ppo, removed before 1.16); neither paper gives a value."""
    vf_coef: float = 0.1
    """Weight c_v of the value loss added to the policy loss. Typical range: [0.0, 2.0]. Source:
    common practice: Default of TRL's former PPOConfig; PPO Eq. 9's c1 is task-specific and
    InstructGPT uses a separate 6B value model."""
    gamma: float = 1.0
    """Discount γ in GAE; 1 means no discount over the completion's tokens. Typical range: [0.9,
    1.0]. Source: ouyang2022training, App. C.4: 'No discount is applied when estimating the
    generalized advantage'."""
    lam: float = 0.95
    """GAE λ trading bias (low) against variance (high) of the advantage estimates. Typical range:
    [0.8, 1.0]. Source: schulman2017proximal, App. A, Table 3: GAE parameter λ = 0.95 (Mujoco
    benchmark)."""
    num_ppo_epochs: int = 1
    """Passes of minibatch updates over each batch of rollouts. Typical range: [1, 16]. Source:
    ouyang2022training, App. C.4: each batch is trained on for only a single inner epoch."""
    num_mini_batches: int = 8
    """Minibatches each rollout batch is split into for the PPO updates. Typical range: [1, 256].
    Source: ouyang2022training, App. C.4: batch size 512 split into 8 minibatches of 64."""
    whiten_rewards: bool = False
    """Normalise the per-token rewards of a batch (without shifting their mean) before computing
    advantages. Source: common practice: Off in TRL's former PPOConfig and not mentioned by
    InstructGPT; advantages are whitened regardless."""
    reward: str = 'model'
    """Where the sequence score R(x, y) comes from, fixed when the script is compiled: a learned
    reward model (model, as in RLHF), a verifiable answer check (math, math_format, code) or an
    LLM judge (judge). One of: math, math_format, code, model, judge. Source:
    ouyang2022training, Sec. 3.5: the policy is fine-tuned with PPO against the trained reward
    model."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a completion that reaches max_completion_length without an
    end-of-sequence token (0 turns it off); a scorer that only sees the text would otherwise
    reward an answer that never ends. Typical range: [0.0, 100.0]. Source: common practice:
    TRL's online trainers offer missing_eos_penalty, off by default (OnlineDPOConfig in TRL
    1.16); InstructGPT does not describe one."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts. Typical range: [0.1, 2.0]. Source: ouyang2022training,
    App. C.4: 'the sampling temperature is 1 for rollouts'."""
    max_completion_length: int = 512
    """Maximum tokens generated per rollout. Typical range: [16, 32768]. Source: common practice:
    Short enough for small models on one GPU; InstructGPT caps responses at 1k tokens (App. C)."""

    # --- Training defaults of the 'ppo' family -------------------------------------------------------
    max_steps: int = -1
    """Stop after this many PPO iterations (one rollout batch each, followed by num_ppo_epochs x
    num_mini_batches optimizer steps); -1 runs num_train_epochs passes over the prompts. Typical
    range: [-1, 100000000]. Source: common practice: Epoch-based by default, as in transformers'
    Trainer; PPO-RLHF runs are usually capped by a budget of iterations."""
    lr_scheduler_type: str = 'constant'
    """Learning-rate schedule. One of: linear, cosine, constant, constant_with_warmup. Source:
    common practice: RL runs are usually open-ended, so a constant rate is the norm."""
    warmup_ratio: float = 0.0
    """Fraction of steps in linear warm-up. Typical range: [0.0, 0.5]. Source: common practice: No
    warm-up with a constant RL learning rate."""
    learning_rate: float = 1e-06
    """Peak learning rate of the policy. Typical range: [1e-09, 0.001]. Source: common practice:
    1e-6 to 1e-5 for PPO-RLHF on 1-8B models."""
    max_prompt_length: int = 512
    """Prompts longer than this are truncated from the left. Typical range: [8, 1048576]. Source:
    common practice: Chat prompts fit in 512 tokens."""

    # --- Optimisation defaults shared by every method ------------------------------------------------
    seed: int = 42
    """Seed for initialisation of new parameters, data order and sampling; the same seed reproduces
    a run. Typical range: [0, 4294967295]. Source: common practice: Any fixed value; 42 is the
    transformers/TRL default, kept so runs compare."""
    num_train_epochs: int = 1
    """Passes over the training data (ignored when max_steps > 0). Typical range: [1, 100]. Source:
    common practice: Post-training rarely needs more than 1-3 epochs; more overfits small
    corpora."""
    per_device_train_batch_size: int = 4
    """Sequences (or pairs, groups) per device per micro-batch. Typical range: [1, 4096]. Source:
    common practice: Fits a 7-8B model with LoRA or a 1B full fine-tune on one 80 GB GPU at 2k
    tokens; raise it when memory allows."""
    gradient_accumulation_steps: int = 4
    """Micro-batches summed before each optimizer step; effective batch = this x batch size x
    processes. Typical range: [1, 4096]. Source: common practice: Reaches an effective batch of
    16 on one GPU; papers report 32-256 (scale this up)."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay, applied to weight matrices only (not biases or norms). Typical
    range: [0.0, 1.0]. Source: common practice: Fine-tuning recipes (Alpaca, Tulu, TRL) mostly
    use 0; 0.01-0.1 is also seen."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay. Typical range: [0.0, 0.999]. Source: common practice: PyTorch and
    transformers AdamW default."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay. Typical range: [0.9, 0.99999]. Source: common practice: PyTorch
    and transformers AdamW default; 0.95 is common for large-batch pretraining."""
    adam_epsilon: float = 1e-08
    """AdamW denominator epsilon. Typical range: [1e-12, 0.0001]. Source: common practice: PyTorch
    and transformers AdamW default."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping). Typical range: [0.0,
    1000.0]. Source: common practice: Clipping at 1.0 is the transformers/TRL default and
    stabilises fine-tuning."""

    # --- Run -----------------------------------------------------------------------------------------
    mixed_precision: str = 'auto'
    """auto (bf16 on a GPU that supports it, else fp32), no, bf16 or fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    logging_steps: int = 10
    """Log metrics to the progress bar and output_dir/metrics.jsonl every N optimizer steps."""
    save_steps: int = 500
    """Write a checkpoint every N optimizer steps (0: only the final model)."""
    save_total_limit: int = 2
    """Keep only the newest N checkpoints."""
    resume_from_checkpoint: str = ''
    """'latest' or a checkpoint directory: continue that run exactly."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir (otherwise the run refuses); the previous run's
    checkpoints and metrics.jsonl there are removed."""
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping at the first one."""
    report_to: str = ''
    """Experiment tracker for accelerate: tensorboard, wandb, ... ('' for none)."""
    use_vllm: bool = False
    """Generate with vLLM (must be installed; one engine per GPU, weights copied in before each
    generation) instead of transformers' generate."""
    vllm_gpu_memory_utilization: float = 0.3
    """Fraction of each GPU's memory vLLM may take for its weights and KV cache (--use_vllm true)."""


def field_docstrings(cls) -> dict[str, str]:
    """Read each field's docstring (the string literal under it) from this file, for --help."""
    tree = ast.parse(inspect.getsource(cls)).body[0]
    docs = {}
    for node, after in zip(tree.body, tree.body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> Args:
    docs = field_docstrings(Args)
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Args):
        parser.add_argument(f"--{f.name}", type=parse_bool if f.type is bool else f.type, default=f.default, help=docs.get(f.name, ""))
    return Args(**vars(parser.parse_args(argv)))


# ==================================================================================================
# Data: read rows, check them, turn them into token ids
# ==================================================================================================


class DataError(ValueError):
    """A malformed training row. The message starts with the file and line (or dataset and row)."""


def json_line(raw: bytes, where: str, first: bool) -> dict | None:
    """One line of a .jsonl file as a dict (None for a blank line); DataError when it is not a JSON object."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def iter_rows(args: Args, skipped: list[str] | None = None):
    """Yield (where, row) for every row of a local .jsonl/.json/.parquet file or a Hugging Face Hub dataset.

    `where` names the row for error messages: "data.jsonl:17" (1-based line) or "org/name[train] row 16".
    A line that is not a JSON object stops the run, or with --skip_bad_rows true (and a `skipped` list to
    count in) is skipped like any other bad row.
    """
    path = Path(args.dataset)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix == ".jsonl":
            with path.open("rb") as handle:
                for line_number, raw in enumerate(handle, start=1):
                    where = f"{path}:{line_number}"
                    try:
                        row = json_line(raw, where, first=line_number == 1)
                    except DataError as error:
                        if skipped is None:
                            raise
                        keep_or_raise(args, error, skipped)
                        continue
                    if row is not None:
                        yield where, row
            return
        if path.suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8-sig"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    error = DataError(f"{path} item {index}: expected a JSON object, got {type(row).__name__}")
                    if skipped is None:
                        raise error
                    keep_or_raise(args, error, skipped)
                    continue
                yield f"{path} item {index}", row
            return
        import datasets  # only needed for Parquet and Hub datasets

        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        for index, row in enumerate(table):
            yield f"{path} row {index}", row
        return
    import datasets

    table = datasets.load_dataset(args.dataset, args.dataset_config or None, split=args.dataset_split)
    for index, row in enumerate(table):
        yield f"{args.dataset}[{args.dataset_split}] row {index}", row


def column(row: dict, name: str, where: str):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field '{name}' (present: {', '.join(sorted(map(str, row))) or 'none'}; map another column with --{name}_column)")
    return row[name]


def text_field(row: dict, name: str, where: str, allow_empty: bool = False) -> str:
    value = column(row, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def as_messages(value, where: str, name: str, role: str) -> list[dict]:
    """A string becomes one message with `role`; a list must already be [{"role": ..., "content": ...}, ...]."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        messages = []
        for index, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
                raise DataError(f"{where}: field '{name}' item {index}: expected an object with string 'role' and 'content'")
            messages.append({"role": message["role"], "content": message["content"]})
        return messages
    raise DataError(f"{where}: field '{name}' must be a non-empty string or list of messages, got {type(value).__name__}")


def completion_messages(value, prompt: list[dict], where: str, name: str) -> list[dict]:
    """A completion is a string or assistant message(s). Datasets such as UltraFeedback repeat the prompt
    inside the completion's message list; that shared prefix is dropped."""
    messages = as_messages(value, where, name, role="assistant")
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt) :]
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise DataError(f"{where}: field '{name}' must hold the assistant's reply (got roles {[m['role'] for m in messages]})")
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{where}: field '{name}' is an empty completion")
    return messages


class ChatEncoder:
    """Renders conversations with the tokenizer's own chat template and says which tokens are the model's.

    The assistant's tokens are found by rendering growing prefixes of the conversation: the tokens between
    the render of messages[:i] (with the generation prompt) and the render of messages[:i+1] are turn i.
    This needs a template whose render of a prefix is a prefix of the full render; we check it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "a row") -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # e.g. a template that rejects a role order: that row's problem, not a crash
            raise DataError(f"{where}: the chat template cannot render this conversation ({type(exc).__name__}: {exc})") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_completion(self, prompt: list[dict], completion: list[dict], where: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.ids(prompt, add_generation_prompt=True, where=where)
        full_ids = self.ids(prompt + completion, where=where)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the conversation; cannot locate the completion's tokens")
        return prompt_ids, full_ids[len(prompt_ids) :]

    def conversation(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and labels that keep only assistant tokens (others are -100)."""
        ids = self.ids(messages, where=where)
        labels = [-100] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.ids(messages[:turn], add_generation_prompt=True, where=where)) if turn else 0
            end_ids = self.ids(messages[: turn + 1], where=where)
            if ids[: len(end_ids)] != end_ids:
                raise DataError(f"{where}: the chat template is not prefix-stable at turn {turn}; cannot mask the prompt")
            labels[start : len(end_ids)] = ids[start : len(end_ids)]
        return ids, labels


def keep_or_raise(args: Args, error: DataError, skipped: list[str]) -> None:
    """Bad rows stop the run with their location, unless --skip_bad_rows true: then they are counted."""
    if not args.skip_bad_rows:
        raise error
    skipped.append(str(error))


def encode_row(row: dict, where: str, encoder: ChatEncoder, args: Args) -> dict:
    """One row -> the prompt's messages and token ids."""
    prompt = as_messages(column(row, args.prompt_column, where), where, args.prompt_column, role="user")
    prompt_ids = encoder.ids(prompt, add_generation_prompt=True)
    if len(prompt_ids) > args.max_prompt_length:
        prompt_ids = prompt_ids[-args.max_prompt_length :]  # keep the end of a long conversation
    return {"prompt": prompt, "prompt_ids": prompt_ids, "answer": ""}  # the reward model reads no answer column


def build_items(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    encoder, items, skipped = ChatEncoder(tokenizer), [], []
    for where, row in iter_rows(args, skipped):
        try:
            items.append(encode_row(row, where, encoder, args))
        except DataError as error:
            keep_or_raise(args, error, skipped)
    return items, skipped


def collate_rollouts(rollouts: list[dict], pad_id: int, device: torch.device) -> dict:
    """Right-padded prompt + completion rows with their rollout-time quantities as [rows, completion] tensors."""
    batch = sequence_batch([r["prompt_ids"] for r in rollouts], [r["completion_ids"] for r in rollouts], pad_id, device)
    width = batch["completion_mask"].shape[1]
    for key in ("old_logps", "old_values", "advantages", "returns"):
        batch[key] = torch.tensor([r[key] + [0.0] * (width - len(r[key])) for r in rollouts], device=device)
    batch["num_items"] = int(sum(len(r["completion_ids"]) for r in rollouts))  # the loss is a mean over completion tokens
    return batch


# ==================================================================================================
# Model and tokenizer
# ==================================================================================================


def load_tokenizer(args: Args):
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token works; EOS is always present.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(args: Args, accelerator: Accelerator, trainable: bool = True):
    """The causal LM (with its PEFT adapters when `trainable`), on this process's device."""
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=DTYPES[args.model_dtype], attn_implementation=args.attn_implementation
    )
    model.config.use_cache = False  # the KV cache only helps generation
    if not trainable:
        return model.eval().requires_grad_(False)
    if args.gradient_checkpointing:
        # Recompute activations in the backward pass: ~30% slower steps for far less activation memory.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ==================================================================================================
# Rollouts: sample completions with the policy, mark their ends, score their tokens
# ==================================================================================================


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left (generation appends on the right), and their attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(row) for row in rows))
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return ids, mask


_MASK64 = (1 << 64) - 1


def stream_seed(*parts: int) -> int:
    """A 64-bit seed that depends only on `parts` (e.g. run seed, step, global completion index).

    Folds the parts through the splitmix64 finaliser. Every completion gets its own random stream named by
    where it sits in the run, not by which process or batch generates it: one process or eight, any batch
    size, an interrupted and resumed run, all sample exactly the same completions.
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for int64 tensors holding 32-bit values, without int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit integers with full avalanche (the 'lowbias32' constants of Wellons' hash prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] uniform numbers in (0, 1), a pure function of (row seed, position, token id).

    A counter-based generator: nothing is stateful, so the numbers a completion sees never depend on the
    other rows of the batch. `seeds` holds one 64-bit seed per row, split into two 32-bit keys.
    """
    key_low, key_high = seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF
    row = _hash32(_hash32(key_low ^ _hash32(torch.full_like(key_low, position))) ^ key_high)
    tokens = torch.arange(vocab_size, device=seeds.device)
    bits = _hash32(_hash32(row[:, None] ^ tokens[None, :]) ^ key_low[:, None])
    return (bits.double() + 0.5) / 4294967296.0


class SeededSampler(LogitsProcessor):
    """Turns greedy decoding into exact sampling from softmax(logits / temperature), nucleus-truncated.

    Gumbel-max: argmax_v(logit_v / T + g_v) with g_v = -log(-log u_v), u_v ~ U(0, 1) i.i.d., is a draw from
    softmax(logit / T). Tokens outside the top-p nucleus get -inf first, so the draw is from the renormalised
    nucleus, as with top-p sampling. The u_v come from counter_uniform, keyed by each row's seed. With
    top_k > 0 only the k most likely tokens (and any tied with the k-th) can be drawn; top-k is applied
    before top-p, as transformers does.
    """

    def __init__(self, seeds: torch.Tensor, prompt_width: int, temperature: float, top_p: float, top_k: int = 0):
        self.seeds, self.prompt_width, self.temperature, self.top_p, self.top_k = seeds, prompt_width, temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            # Keep the smallest set of most likely tokens whose probability reaches top_p (always >= 1 token).
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            before = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1)
            drop_sorted = before >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        uniform = counter_uniform(self.seeds, input_ids.shape[1] - self.prompt_width, scores.shape[-1])
        gumbel = -torch.log(-torch.log(uniform))
        return scores + gumbel.to(scores.dtype)


@dataclass
class Rollout:
    """Sampled completions, one row per requested prompt (in the order given)."""

    prompt_ids: list[list[int]]
    """Each row's prompt tokens (unpadded)."""
    completion_ids: list[list[int]]
    """Each row's completion tokens up to and including its first end-of-sequence token; nothing after it."""
    truncated: list[bool]
    """True where generation hit max_new_tokens before any end-of-sequence token."""
    texts: list[str]
    """Each completion decoded without special tokens (what rewards and judges read)."""
    stopped: list[bool] = dataclasses.field(default_factory=list)
    """With a stop string: True where the row ended at it (the row is cut right after it). Empty otherwise."""


def end_of_sequence_ids(tokenizer, model) -> set[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def cut_at_end(rows: list[list[int]], eos_ids: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Keep each row up to and including its first EOS. Rows without one are flagged as truncated."""
    kept, truncated = [], []
    for row in rows:
        end = next((i for i, token in enumerate(row) if token in eos_ids), None)
        kept.append(row if end is None else row[: end + 1])
        truncated.append(end is None)
    return kept, truncated


def cut_at_stop(rows: list[list[int]], stop: str, tokenizer) -> tuple[list[list[int]], list[bool]]:
    """Cut each row right after the token that completes the first occurrence of `stop` in its text; rows
    without it are kept whole. (The shortest such prefix is found by bisection: containment is monotone.)"""
    kept, stopped = [], []
    for row in rows:
        if stop not in tokenizer.decode(row):
            kept.append(row)
            stopped.append(False)
            continue
        low, high = 1, len(row)
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if stop in tokenizer.decode(row[:middle]) else (middle + 1, high)
        kept.append(row[:low])
        stopped.append(True)
    return kept, stopped


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    seeds: list[int],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    greedy: bool = False,
    accelerator: Accelerator,
    vllm=None,
    top_k: int = 0,
    stop: str | None = None,
) -> Rollout:
    """Generate one completion per entry of `prompts` (token lists), batched with left padding.

    `seeds[i]` names row i's random stream (see stream_seed); with greedy=True the most likely token is
    taken at every step and the seeds are unused. With a VLLMGenerator the same seeds go to vLLM's
    per-request sampler instead (vLLM draws differently from transformers, so runs are reproducible with
    either engine, not across the two). top_k > 0 restricts sampling to the k most likely tokens; a `stop`
    string ends a row where its text first contains it (Rollout.stopped), e.g. at the end of a reasoning step.
    """
    eos_ids = end_of_sequence_ids(tokenizer, accelerator.unwrap_model(model))
    if vllm is not None:
        if top_k or stop:
            raise SystemExit("error: top_k and stop strings are not passed on to vLLM here; run with --use_vllm false")
        rows = vllm.generate(prompts, seeds, temperature, top_p, max_new_tokens, greedy)
    else:
        policy = accelerator.unwrap_model(model)
        was_training = policy.training
        policy.eval()
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, accelerator.device)
        config = GenerationConfig(
            do_sample=False,  # sampling happens in SeededSampler; argmax of (logits/T + Gumbel noise) is a sample
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos_ids),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            # Neutralise anything the model's own generation_config.json would add (Qwen ships a repetition penalty):
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
        )
        processors = LogitsProcessorList()
        if not greedy:
            seed_tensor = torch.tensor([s & ((1 << 63) - 1) for s in seeds], dtype=torch.long, device=accelerator.device)
            processors.append(SeededSampler(seed_tensor, ids.shape[1], temperature, top_p, top_k))
        stopping = {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}
        with accelerator.autocast():
            output = policy.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors, **stopping)
        rows = output[:, ids.shape[1] :].tolist()
        policy.train(was_training)
    completions, truncated = cut_at_end(rows, eos_ids)
    stopped = []
    if stop:
        completions, stopped = cut_at_stop(completions, stop, tokenizer)
        truncated = [cut_short and not ended for cut_short, ended in zip(truncated, stopped)]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollout(prompt_ids=[list(p) for p in prompts], completion_ids=completions, truncated=truncated, texts=texts, stopped=stopped)


def sequence_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device: torch.device) -> dict:
    """Rows of prompt + completion, right-padded (positions start at 0, as in an unpadded forward pass).

    `logp_index[i, t]` is where completion token t of row i is predicted in the shifted logits, and
    `completion_mask[i, t]` is 1 on the completion's real tokens (its EOS included), 0 on padding.
    """
    ids, mask = right_pad([p + c for p, c in zip(prompt_ids, completion_ids)], pad_id, device)
    width = max(len(c) for c in completion_ids)
    last = ids.shape[1] - 2
    index = [[min(len(p) - 1 + t, last) for t in range(width)] for p in prompt_ids]
    completion_mask = [[1] * len(c) + [0] * (width - len(c)) for c in completion_ids]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "logp_index": torch.tensor(index, device=device),
        "completion_mask": torch.tensor(completion_mask, device=device, dtype=torch.float32),
    }


def completion_token_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """[rows, completion tokens] log π(o_t | q, o_<t) at the sampling temperature; 0 on padding.

    Dividing the logits by the temperature scores the tokens under the distribution they were drawn from.
    Gradients flow unless called under torch.no_grad().
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float() / temperature
    token_logps = -F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return token_logps.gather(1, batch["logp_index"]) * batch["completion_mask"]


@torch.no_grad()
def score_tokens(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, temperature: float, pad_id: int, accelerator: Accelerator, batch_size: int) -> list[list[float]]:
    """Per-token log-probs of many completions under `model`, in chunks of `batch_size` rows, as lists."""
    results = []
    for start in range(0, len(prompt_ids), batch_size):
        completions = completion_ids[start : start + batch_size]
        batch = sequence_batch(prompt_ids[start : start + batch_size], completions, pad_id, accelerator.device)
        with accelerator.autocast():
            logps = completion_token_logps(model, batch, temperature)
        results += [row[: len(c)] for row, c in zip(logps.tolist(), completions)]
    return results


@torch.no_grad()
def reference_scores(model, reference, prompt_ids, completion_ids, *, temperature: float, pad_id: int, accelerator: Accelerator, batch_size: int) -> list[list[float]]:
    """Per-token log π_ref of the completions (see score_tokens)."""
    return score_tokens(reference, prompt_ids, completion_ids, temperature=temperature, pad_id=pad_id, accelerator=accelerator, batch_size=batch_size)


class VLLMGenerator:
    """Optional fast generation with vLLM, colocated on each process's GPU (--use_vllm true).

    The engine holds its own copy of the weights; load_weights() copies the policy's current weights into
    it before each generation (with a LoRA-style adapter: merged for the copy, then unmerged). Not tested
    by ptcompile's CPU test suite; the transformers path above is the reference behaviour.
    """

    def __init__(self, args: Args, accelerator: Accelerator):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise SystemExit("error: --use_vllm true needs the vllm package (pip install vllm); or run with --use_vllm false") from None
        self.sampling_params = SamplingParams
        self.llm = LLM(
            model=args.model_name_or_path,
            dtype="bfloat16" if args.model_dtype == "float32" else args.model_dtype,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            seed=args.seed,
            # Each process drives its own engine on its own GPU.
            distributed_executor_backend="external_launcher" if accelerator.num_processes > 1 else None,
        )

    def load_weights(self, model, accelerator: Accelerator) -> None:
        policy = accelerator.unwrap_model(model)
        self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(policy.state_dict().items())
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], seeds: list[int], temperature: float, top_p: float, max_new_tokens: int, greedy: bool) -> list[list[int]]:
        params = [
            self.sampling_params(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, max_tokens=max_new_tokens, seed=seed % (2**63))
            for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]


# ==================================================================================================
# Rewards: a learned reward model
# ==================================================================================================


def last_boxed(text: str) -> str | None:
    r"""The contents of the last \boxed{...} (or \fbox{...}) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth, begin = 0, text.index("{", start)
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin + 1 : index]
    return None


def reference_answer(text: str, answer_format: str) -> str:
    r"""The final answer inside a dataset's answer column: 'plain' (the whole string), 'gsm8k' (after the last
    '####') or 'boxed' (the last \boxed{...})."""
    if answer_format == "gsm8k":
        return text.split("####")[-1].strip()
    if answer_format == "boxed":
        boxed = last_boxed(text)
        return boxed if boxed is not None else text.strip()
    return text.strip()


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(completion: str) -> str | None:
    r"""The final answer a completion gives: its last \boxed{...}, else what follows its last '####', else its
    last number. None when it gives none."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if "####" in completion:
        tail = completion.split("####")[-1].strip()
        return tail.splitlines()[0] if tail else None
    numbers = NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def normalise_answer(answer: str) -> Fraction | str:
    r"""A number as an exact fraction when the answer reads as one ('1,234', '3.50', '-2', '1/2', '\frac{1}{2}',
    '$5', '50\%'), otherwise the answer with spacing, '$' and LaTeX sizing removed, lower-cased."""
    text = answer.strip().strip("$").strip()
    for noise in ("\\left", "\\right", "\\!", "\\,", "\\ ", "\\$", "\\%", "%", ",", " "):
        text = text.replace(noise, "")
    text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text).rstrip(".")
    match = re.fullmatch(r"\(?(-?[\d.]+)\)?(?:/\(?(-?[\d.]+)\)?)?", text)
    if match:
        try:
            value = Fraction(match.group(1))
            return value / Fraction(match.group(2)) if match.group(2) else value
        except (ValueError, ZeroDivisionError):
            pass
    return text.lower()


def answers_match(predicted: str | None, reference: str) -> bool:
    """Equal as exact numbers ('3.50' == '7/2' == '\\frac{7}{2}') or else as normalised strings."""
    return predicted is not None and normalise_answer(predicted) == normalise_answer(reference)


def math_reward(completion: str, answer: str, answer_format: str) -> float:
    """1.0 when the completion's final answer equals the reference answer, else 0.0 (a verifiable reward)."""
    return 1.0 if answers_match(extract_answer(completion), reference_answer(answer, answer_format)) else 0.0


class RewardModelScorer:
    """A learned reward model, as written by ptcompile's reward-model scripts (output_dir/final).

    Contract: the directory loads with AutoModelForSequenceClassification and AutoTokenizer and holds
    ptcompile_scorer.json with "kind": "reward". The score of a completion is the model's logit (label 0)
    for the chat-templated conversation prompt + completion, read at its last non-pad token (what the
    sequence-classification head does); rows are right-padded so that token is the conversation's last.
    """

    def __init__(self, path: str, accelerator: Accelerator, batch_size: int):
        from transformers import AutoModelForSequenceClassification

        description_file = Path(path) / "ptcompile_scorer.json"
        if not description_file.is_file():
            raise SystemExit(f"error: {path} has no ptcompile_scorer.json; train a reward model with a ptcompile reward script first")
        description = json.loads(description_file.read_text())
        if description.get("kind") != "reward":
            raise SystemExit(f"error: {description_file} describes a '{description.get('kind')}' scorer, not an outcome reward model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(accelerator.device).eval().requires_grad_(False)
        self.accelerator, self.batch_size = accelerator, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        texts = [
            self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
            for prompt, completion in zip(prompts, completions)
        ]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start : start + self.batch_size], add_special_tokens=False, padding=True, return_tensors="pt").to(self.accelerator.device)
            with self.accelerator.autocast():
                scores += self.model(**encoded).logits[:, 0].float().tolist()
        return scores


def build_reward(args: Args, accelerator: Accelerator):
    """The reward of this script: score(prompts, completions, answers) -> one float per completion."""
    scorer = RewardModelScorer(args.reward_model_path, accelerator, args.reward_batch_size)

    def score(prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        return scorer(prompts, completions)

    return score


# ==================================================================================================
# Value head and loss
# ==================================================================================================


class ValueHead(torch.nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden state h_t at the position that predicts token t.

    Zero-initialised, so every value starts at 0 and the first advantages are the plain returns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def logps_and_values(model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: log π(y_t|s_t) at the sampling temperature and V(s_t), both [rows, completion
    tokens] and 0 on padding. The value head is a submodule of the policy (see attach_value_head)."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    logits = outputs.logits[:, :-1].float() / temperature
    token_logps = -F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    hidden = outputs.hidden_states[-1][:, :-1]
    values = value_head_of(model)(hidden)
    mask = batch["completion_mask"]
    return token_logps.gather(1, batch["logp_index"]) * mask, values.gather(1, batch["logp_index"]) * mask


def attach_value_head(model) -> None:
    """Give the policy its value head: a submodule, so it trains, saves and resumes with the policy's weights."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model.value_head = ValueHead(config.hidden_size)


def value_head_of(model) -> ValueHead:
    return (model.module if hasattr(model, "module") else model).value_head


def disable_dropout(model) -> None:
    """Switch dropout off: the log-probabilities computed when sampling and when updating must come from the
    same function (TRL's online trainers do the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0

def kl_penalised_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of InstructGPT's objective (Eq. 2 of Ouyang et al. 2022, as in Stiennon et al. 2020):

        r_t = −β·(log π_old(y_t|s_t) − log π_ref(y_t|s_t)) + R(x, y)·[t = T]

    The sequence's score R (from the reward model or rule) is paid at its last completion token T; every token
    pays the KL penalty of its own log-ratio to the reference (the k1 estimate, summed over tokens it is the
    sequence KL). Shapes: scores [B]; logps, ref_logps, mask [B, T]. Returns (rewards, per-token log-ratio).
    """
    log_ratio = (logps - ref_logps) * mask
    rewards = -kl_coef * log_ratio
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # completions are right-padded: the last real token
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, log_ratio


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance); with shift_mean=False the mean is added
    back, so only the scale changes (used for rewards, whose sign carries meaning). Zero where mask is 0."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated GAE, Eqs. 11-12 of Schulman et al. (2017) (Schulman et al. 2015, Eq. 16):

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t),   Â_t = Σ_{l≥0} (γλ)^l·δ_{t+l},   R̂_t = Â_t + V(s_t)

    over each completion's tokens; the state after the last token is terminal (V = 0). Rewards and values at
    padding are zeroed first, so padding contributes nothing. Returns (advantages, returns), zero at padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.size(1)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def ppo_clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective, Eq. 7 of Schulman et al. (2017), negated into a loss per token:

        ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t),   l_t = −min(ρ_t·Â_t, clip(ρ_t, 1−ε, 1+ε)·Â_t)

    Returns the SUM of l_t over the masked tokens and the number of tokens where the clipped term was the
    smaller one (the "clip fraction" once divided by the token count)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * advantages
    losses = -torch.min(unclipped, clipped)
    return (losses * mask).sum(), ((clipped < unclipped).float() * mask).sum()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value loss with the prediction clipped around its rollout-time value, per token:

        l_t = ½·max( (V(s_t) − R̂_t)², (clip(V(s_t), V_old(s_t) − ε_v, V_old(s_t) + ε_v) − R̂_t)² )

    PPO's combined objective (Eq. 9 of Schulman et al. 2017) adds c_v times a squared value error; the clipping
    is the form of OpenAI's baselines and of TRL's former PPO trainer, which the PPO paper does not state.
    Returns the SUM over masked tokens and the number of tokens where the clipped error was the larger one."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    losses = 0.5 * torch.max(unclipped_error, clipped_error)
    return (losses * mask).sum(), ((clipped_error > unclipped_error).float() * mask).sum()


def compute_loss(model, batch: dict, args: Args, context: dict) -> tuple[torch.Tensor, dict]:
    """Summed PPO loss over the micro-batch's completion tokens (the loop divides by the minibatch's global
    token count): clipped surrogate + vf_coef x clipped value loss, and summed per-token metrics."""
    mask = batch["completion_mask"]
    logps, values = logps_and_values(model, batch, args.temperature)
    policy_sum, clipped = ppo_clipped_surrogate(logps, batch["old_logps"], batch["advantages"], mask, args.cliprange)
    value_sum, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, args.cliprange_value)
    log_ratio = (logps.detach() - batch["old_logps"]) * mask
    metrics = {
        "loss/policy": policy_sum.detach(),
        "loss/value": value_sum.detach(),
        "clipfrac": clipped,
        "value_clipfrac": value_clipped,
        "ratio": (log_ratio.exp() * mask).sum(),
        "approx_kl": (0.5 * log_ratio**2).sum(),  # ½·E[(log ρ)²], how far this update moved from π_old
    }
    return policy_sum + args.vf_coef * value_sum, metrics


# ==================================================================================================
# Optimiser and schedule
# ==================================================================================================


def make_optimizer(model, args: Args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only: decaying biases and norm gains hurts fine-tuning."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=device.type == "cuda",  # one kernel for all parameters on GPU
    )


def items_per_step(args: Args, num_processes: int) -> int:
    """Items one optimizer step uses: batch per device x accumulation x processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes


def plan_steps(num_items: int, args: Args, num_processes: int) -> tuple[int, int, int]:
    """(items per optimizer step, optimizer steps per epoch, total optimizer steps)."""
    per_step = items_per_step(args, num_processes)
    steps_per_epoch = num_items // per_step  # the last incomplete step of an epoch is dropped
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {num_items} training items are fewer than one optimizer step uses ({per_step} = batch "
            f"{args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} x {num_processes} processes)"
        )
    total = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    return per_step, steps_per_epoch, total


def step_indices(step: int, num_items: int, per_step: int, steps_per_epoch: int, args: Args, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches (lists of item indices) for optimizer step `step`.

    The order is a seeded permutation per epoch, so it depends only on (seed, step): a resumed run sees
    exactly the items the uninterrupted run would have. Each process takes a contiguous slice of the
    step's items, so the union over processes is the same global batch whatever the process count.
    """
    epoch, offset = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    items = order[offset * per_step : (offset + 1) * per_step]
    share = per_step // world
    mine = items[rank * share : (rank + 1) * share]
    size = args.per_device_train_batch_size
    return [mine[i : i + size] for i in range(0, len(mine), size)]


# ==================================================================================================
# Checkpoints: atomic saves, exact resume
# ==================================================================================================


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_DONE = "complete.json"
"""Written last into a checkpoint's temporary directory; a checkpoint without it is never resumed from."""


def fsync_tree(directory: Path) -> None:
    """Flush a directory's files and the directory itself to disk, so a rename publishes complete data even
    across a power cut (a killed process alone cannot lose written data: the kernel keeps it)."""
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. Temporary directories (.checkpoint-N.tmp) left by a run
    killed mid-save, and directories without the completion marker, are not checkpoints."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name[len("checkpoint-") :]
        if suffix.isdigit() and path.is_dir() and (path / CHECKPOINT_DONE).is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(step: int, accelerator: Accelerator, model, optimizer, scheduler, args: Args, loss_state: dict | None = None) -> Path:
    """Write output_dir/checkpoint-<step>: trainable weights, optimiser, schedule, every process's RNG, and
    `loss_state`, the running statistics of a stateful loss (e.g. BCO's reward shift), when there is one.

    Atomic: everything goes to a hidden temporary directory that is flushed to disk, marked complete and
    only then renamed, so a run killed mid-save still has its previous checkpoint intact (and `latest`
    never picks a half-written one). Only trainable parameters are stored (with PEFT that is the adapter,
    not the frozen base model).
    """
    output_dir = Path(args.output_dir)
    final, temporary = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # Every process checks its own parameters (or shard) and all learn the verdict, so all stop together.
    broken = [name for name, p in unwrapped.named_parameters() if p.requires_grad and not torch.isfinite(p.detach()).all()]
    if accelerator.reduce(torch.tensor(float(len(broken)), device=accelerator.device), reduction="sum").item() > 0:
        raise SystemExit(
            f"error: parameter {(broken or ['(on another process)'])[0]} holds NaN/inf values at step {step}; this "
            f"checkpoint is not saved. Last good checkpoint: {(list_checkpoints(output_dir) or ['none yet'])[-1]}."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainable = {name: p.detach().cpu() for name, p in unwrapped.named_parameters() if p.requires_grad}
        state = {"step": step, "model": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        if loss_state is not None:
            state["loss_state"] = dict(loss_state)
        torch.save(state, temporary / "state.pt")
        (temporary / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    torch.save(rng_state(), temporary / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / CHECKPOINT_DONE).write_text(json.dumps({"step": step, "processes": accelerator.num_processes}))
        fsync_tree(temporary)
        if final.exists():  # only when a run re-saves a step (resumed from an older checkpoint)
            stale = output_dir / f".checkpoint-{step}.old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(temporary, final)  # rename(2): atomic within one filesystem
        checkpoints = list_checkpoints(output_dir)
        for old in checkpoints[: max(0, len(checkpoints) - args.save_total_limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(args: Args) -> Path:
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not (path / "state.pt").is_file():
            raise SystemExit(f"error: {path} is not a checkpoint (no state.pt)")
        return path
    checkpoints = list_checkpoints(Path(args.output_dir))
    if not checkpoints:
        raise SystemExit(f"error: --resume_from_checkpoint latest: no complete checkpoint-* in {args.output_dir}")
    return checkpoints[-1]


def load_checkpoint(path: Path, accelerator: Accelerator, model, optimizer, scheduler, loss_state: dict | None = None) -> int:
    """Restore a checkpoint written by save_checkpoint; returns the step to continue from. A stateful loss
    passes its `loss_state` dict, which is updated in place with the saved values."""
    # Our own files (written above), so full unpickling is safe; the RNG state holds Python tuples.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    missing, unexpected = unwrapped.load_state_dict(state["model"], strict=False)
    trainable = {name for name, p in unwrapped.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise SystemExit(f"error: {path} does not match this model (unexpected {unexpected[:3]}, missing {sorted(trainable & set(missing))[:3]})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if loss_state is not None:
        if "loss_state" not in state:
            raise SystemExit(f"error: {path} holds no loss state (running statistics); it was not written by this method's script")
        loss_state.update(state["loss_state"])
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return int(state["step"])


def prepare_output_dir(args: Args, start_step: int) -> None:
    """Main process, before the first step: create output_dir and make metrics.jsonl match the run.

    A resumed run keeps the rows up to its checkpoint's step and drops later ones (written after that
    checkpoint by the interrupted run, or cut short by the kill), so the file reads as one uninterrupted
    run. A fresh run starts an empty file; with --overwrite_output_dir true it also removes the previous
    run's checkpoints, which `--resume_from_checkpoint latest` would otherwise mistake for its own.
    """
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = output_dir / "metrics.jsonl"
    if start_step == 0:
        if args.overwrite_output_dir:
            stale = [path for path in output_dir.glob("checkpoint-*") if path.name[len("checkpoint-") :].isdigit()]
            stale += list(output_dir.glob(".checkpoint-*.tmp"))
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path)
        metrics.unlink(missing_ok=True)
        return
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
            kept.append(line)
    temporary = output_dir / ".metrics.jsonl.tmp"
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temporary, metrics)


def start_or_resume(args: Args, accelerator: Accelerator, model, optimizer, scheduler, say, unit: str = "step", loss_state: dict | None = None):
    """(first step, the checkpoint resumed from or None). With --resume_from_checkpoint the checkpoint is
    loaded (see load_checkpoint); either way the main process then makes output_dir match the run's start."""
    start, checkpoint = 0, None
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args)
        start = load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler, loss_state)
        say(f"resumed from {checkpoint} at {unit} {start}")
    if accelerator.is_main_process:
        prepare_output_dir(args, start)
    return start, checkpoint


# ==================================================================================================
# Training loop
# ==================================================================================================


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def count_tokens(batch: dict) -> int:
    """Non-padding tokens of a micro-batch (for the tokens/s figure)."""
    if "num_tokens" in batch:  # counted by collate (packed rows have no attention mask to count)
        return batch["num_tokens"]
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel()) if "input_ids" in batch else 0


def stop_if_not_finite(what: str, value: float, step: int, last_checkpoint) -> None:
    """A NaN or inf stops the run before the optimizer applies it; the newest checkpoint stays good."""
    if not math.isfinite(value):
        raise SystemExit(
            f"error: the {what} became {value} at step {step + 1}; stopped before the update. "
            f"Last good checkpoint: {last_checkpoint or 'none yet'}. Check the data or start again with a lower "
            "learning rate (a run resumed with --resume_from_checkpoint keeps the checkpoint's optimizer and schedule)."
        )


def report_data(say, args: Args, count: int, skipped: list[str], noun: str = "training items") -> None:
    """What was read, and the first bad rows that --skip_bad_rows true left out (each with its file:line)."""
    say(f"{count} {noun} from {args.dataset}" + (f"; skipped {len(skipped)} bad rows (--skip_bad_rows true)" if skipped else ""))
    for reason in skipped[:3]:
        say(f"  skipped {reason}")


def check_output_dir(args: Args) -> None:
    """Never mix two runs in one directory by accident."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"error: output directory {output_dir} exists and is a file")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise SystemExit(
            f"error: output directory {output_dir} exists and is not empty. Use --resume_from_checkpoint latest "
            "to continue that run, --overwrite_output_dir true to write into it anyway, or another --output_dir."
        )


def plan_iterations(num_items: int, args: Args, num_processes: int) -> tuple[int, int, int, int]:
    """(prompts per rollout batch, per minibatch, iterations per epoch, total iterations).

    A minibatch (one optimizer step) is per_device_train_batch_size x gradient_accumulation_steps x
    processes rollouts; a rollout batch holds num_mini_batches minibatches."""
    minibatch = items_per_step(args, num_processes)
    per_iteration = minibatch * args.num_mini_batches
    per_epoch = num_items // per_iteration
    if per_epoch == 0:
        raise SystemExit(
            f"error: {num_items} prompts are fewer than one rollout batch ({per_iteration} = minibatch {minibatch} x {args.num_mini_batches} minibatches); "
            "use more prompts, fewer --num_mini_batches or a smaller batch"
        )
    total = args.max_steps if args.max_steps > 0 else per_epoch * args.num_train_epochs
    return per_iteration, minibatch, per_epoch, total


@torch.no_grad()
def collect_rollouts(model, reference, tokenizer, items: list[dict], indices: list[int], iteration: int, score, args: Args, accelerator: Accelerator, vllm) -> list[dict]:
    """This process's rollouts: sample a completion per prompt, score it, and record per-token log π_old,
    log π_ref and V_old. Random streams are named by (seed, iteration, prompt), so the rollouts do not depend
    on how prompts are spread over processes and batches."""
    rollouts = []
    policy = accelerator.unwrap_model(model)
    for start in range(0, len(indices), args.per_device_train_batch_size):
        chunk = indices[start : start + args.per_device_train_batch_size]
        sampled = sample_completions(
            model, tokenizer, [items[i]["prompt_ids"] for i in chunk], seeds=[stream_seed(args.seed, iteration, i) for i in chunk],
            temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_completion_length, accelerator=accelerator, vllm=vllm,
        )
        scores = score([items[i]["prompt"] for i in chunk], sampled.texts, [items[i]["answer"] for i in chunk])
        # A completion cut off at max_completion_length loses missing_eos_penalty: the scorer only sees its text.
        scores = [s - args.missing_eos_penalty * cut for s, cut in zip(scores, sampled.truncated)]
        batch = sequence_batch(sampled.prompt_ids, sampled.completion_ids, tokenizer.pad_token_id, accelerator.device)
        with accelerator.autocast():
            old_logps, old_values = logps_and_values(policy, batch, args.temperature)
        ref_logps = reference_scores(model, reference, sampled.prompt_ids, sampled.completion_ids, temperature=args.temperature, pad_id=tokenizer.pad_token_id, accelerator=accelerator, batch_size=len(chunk))
        for k, i in enumerate(chunk):
            length = len(sampled.completion_ids[k])
            rollouts.append({
                "index": i, "prompt_ids": sampled.prompt_ids[k], "completion_ids": sampled.completion_ids[k], "score": float(scores[k]),
                "truncated": sampled.truncated[k], "old_logps": old_logps[k, :length].tolist(), "old_values": old_values[k, :length].tolist(),
                "ref_logps": ref_logps[k],
            })
    return rollouts


def compute_advantages(rollouts: list[dict], args: Args) -> dict:
    """Per-token rewards (KL penalty + score at the end), optional reward whitening, GAE, and whitened
    advantages over the whole rollout batch (every process holds all of it, so the statistics are global).
    Stores "advantages" and "returns" in each rollout; returns batch statistics for the log."""
    width = max(len(r["completion_ids"]) for r in rollouts)
    pad = lambda key: torch.tensor([r[key] + [0.0] * (width - len(r[key])) for r in rollouts], dtype=torch.float64)  # noqa: E731
    mask = torch.tensor([[1.0] * len(r["completion_ids"]) + [0.0] * (width - len(r["completion_ids"])) for r in rollouts], dtype=torch.float64)
    scores = torch.tensor([r["score"] for r in rollouts], dtype=torch.float64)
    rewards, log_ratio = kl_penalised_rewards(scores, pad("old_logps"), pad("ref_logps"), mask, args.kl_coef)
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = generalized_advantages(rewards, pad("old_values"), mask, args.gamma, args.lam)
    advantages = masked_whiten(advantages, mask)
    for r, adv, ret in zip(rollouts, advantages.tolist(), returns.tolist()):
        length = len(r["completion_ids"])
        r["advantages"], r["returns"] = [float(a) for a in adv[:length]], [float(v) for v in ret[:length]]
    count = len(rollouts)
    return {
        "score": float(scores.mean()),
        "kl": float(log_ratio.sum()) / count,  # Σ_t log(π_old/π_ref) per sequence: the sampled KL estimate
        "non_score_reward": float(-args.kl_coef * log_ratio.sum()) / count,
        "returns": float((returns * mask).sum() / mask.sum()),
        "completion_length": float(mask.sum()) / count,
        "truncated": sum(float(r["truncated"]) for r in rollouts) / count,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_output_dir(args)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=args.report_to or None,
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    say = accelerator.print

    tokenizer = load_tokenizer(args)
    items, skipped = build_items(args, tokenizer)
    report_data(say, args, len(items), skipped, "training items (prompts)")
    per_iteration, minibatch, iterations_per_epoch, total_iterations = plan_iterations(len(items), args, accelerator.num_processes)
    updates_per_iteration = args.num_ppo_epochs * args.num_mini_batches
    model = load_model(args, accelerator)
    disable_dropout(model)
    attach_value_head(model)
    # π_ref is the starting (SFT) model, frozen. It is not wrapped by accelerate: it never needs gradients.
    reference = load_model(args, accelerator, trainable=False).to(accelerator.device)
    score = build_reward(args, accelerator)
    vllm = VLLMGenerator(args, accelerator) if args.use_vllm else None
    optimizer = make_optimizer(model, args, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    total_updates = total_iterations * updates_per_iteration
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_updates), num_training_steps=total_updates)
    start, last_checkpoint = start_or_resume(args, accelerator, model, optimizer, scheduler, say, unit="iteration")
    if args.report_to:
        accelerator.init_trackers(output_dir.name, config=dataclasses.asdict(args))
    say(
        f"{total_iterations} PPO iterations of {per_iteration} prompts, each {args.num_ppo_epochs} epoch(s) x {args.num_mini_batches} minibatches of {minibatch} "
        f"({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes)"
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    progress = tqdm(total=total_iterations, initial=start, disable=not accelerator.is_local_main_process, desc="ppo")
    for iteration in range(start, total_iterations):
        started = time.perf_counter()
        # 1. Rollouts: this iteration's prompts (a seeded permutation per epoch), each process sampling its share.
        epoch, offset = divmod(iteration, iterations_per_epoch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch_indices = order[offset * per_iteration : (offset + 1) * per_iteration]
        share = per_iteration // world
        if vllm is not None:
            vllm.load_weights(model, accelerator)
        mine = collect_rollouts(model, reference, tokenizer, items, batch_indices[rank * share : (rank + 1) * share], iteration, score, args, accelerator, vllm)
        # 2. Every process gets the whole batch (in prompt order), so advantage whitening and the minibatch
        #    split are the same whatever the process count.
        from accelerate.utils import gather_object

        position = {index: k for k, index in enumerate(batch_indices)}
        rollouts = sorted(gather_object(mine), key=lambda r: position[r["index"]])
        logs = compute_advantages(rollouts, args)
        generated = time.perf_counter()
        # 3. num_ppo_epochs passes of num_mini_batches optimizer steps over the rollouts.
        model.train()
        sums: dict[str, float] = {}
        for ppo_epoch in range(args.num_ppo_epochs):
            shuffled = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(args.seed + 7919 * iteration + ppo_epoch)).tolist()
            for m in range(args.num_mini_batches):
                members = shuffled[m * minibatch : (m + 1) * minibatch]
                part = members[rank * (minibatch // world) : (rank + 1) * (minibatch // world)]
                micro_batches = [
                    collate_rollouts([rollouts[i] for i in part[k : k + args.per_device_train_batch_size]], tokenizer.pad_token_id, accelerator.device)
                    for k in range(0, len(part), args.per_device_train_batch_size)
                ]
                # Sum over the minibatch's tokens on all processes / their global count: exact accumulation and DDP.
                global_count = sum(len(rollouts[i]["completion_ids"]) for i in members)
                step_sums: dict[str, float] = {}
                for index, batch in enumerate(micro_batches):
                    with nullcontext() if index == len(micro_batches) - 1 else accelerator.no_sync(model):
                        loss_sum, metrics = compute_loss(model, batch, args, {})
                        accelerator.backward(loss_sum * world / global_count)
                    for name, value in {"loss": loss_sum.detach(), **metrics}.items():
                        step_sums[name] = step_sums.get(name, 0.0) + value
                names = sorted(step_sums)
                totals = accelerator.reduce(torch.stack([torch.as_tensor(step_sums[n], device=accelerator.device, dtype=torch.float32) for n in names]), reduction="sum")
                for name, value in zip(names, totals.tolist()):
                    sums[name] = sums.get(name, 0.0) + value / global_count / updates_per_iteration
                stop_if_not_finite("loss", sums["loss"], iteration, last_checkpoint)
                if args.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                    stop_if_not_finite("gradient norm", grad_norm, iteration, last_checkpoint)
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm / updates_per_iteration
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        logs.update(sums)
        logs.update(step=iteration + 1, epoch=(iteration + 1) / iterations_per_epoch, learning_rate=scheduler.get_last_lr()[0], rollout_seconds=generated - started, step_seconds=time.perf_counter() - started)
        progress.update(1)
        if (iteration + 1) % args.logging_steps == 0 or iteration + 1 == total_iterations:
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("score", "kl", "loss")})
            if accelerator.is_main_process:
                with (output_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(logs) + "\n")
            if args.report_to:
                accelerator.log(logs, step=iteration + 1)
        if args.save_steps > 0 and (iteration + 1) % args.save_steps == 0 and iteration + 1 < total_iterations:
            last_checkpoint = save_checkpoint(iteration + 1, accelerator, model, optimizer, scheduler, args)
    progress.close()
    # The final directory holds the policy alone; its value head is saved beside it for inspection.
    value_head = value_head_of(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        (output_dir / "final").mkdir(parents=True, exist_ok=True)
        torch.save(value_head.state_dict(), output_dir / "final" / "value_head.pt")
    del accelerator.unwrap_model(model).value_head
    save_final(accelerator, model, tokenizer, args)
    if args.report_to:
        accelerator.end_training()
    say(f"done: {output_dir / 'final'}")


def save_final(accelerator: Accelerator, model, tokenizer, args: Args) -> None:
    """The trained weights in Hugging Face format (the full model).

    Written to a temporary directory first and renamed to output_dir/final when complete.
    """
    final, final_dir = Path(args.output_dir) / "final", Path(args.output_dir) / ".final.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    unwrapped.save_pretrained(final_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final_dir)
    if accelerator.is_main_process:
        fsync_tree(final_dir)
        if final.exists():
            shutil.rmtree(final)
        os.replace(final_dir, final)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        # Bad training data is the user's to fix: say where, without a traceback.
        raise SystemExit(f"error: {error}\n(a malformed row stops the run; --skip_bad_rows true skips and counts such rows instead)") from None
