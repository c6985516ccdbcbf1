"""Rejection-sampling fine-tuning (rejection-sampling-ft): a single-file training script compiled by ptcompile.

Papers:
    - Scaling Relationship on Learning Mathematical Reasoning with Large Language Models (Yuan et al., 2023), arXiv 2308.01825 [yuan2023scaling]
    - RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment (Dong et al., 2023), arXiv 2304.06767 [dong2023raft]
    - Reinforced Self-Training (ReST) for Language Modeling (Gulcehre et al., 2023), arXiv 2308.08998 [gulcehre2023reinforced]

Objective (No loss equation: SFT cross-entropy on the accepted samples (RFT collects correct, distinct reasoning paths) of yuan2023scaling):
    D' = { (x, y) : y ~ π_0(·|x), k = num_samples draws per prompt, accept(x, y) (correct answer;
    distinct; at most keep_top_k per prompt) }; L = -(1/Σ|y|) · Σ_(x,y)∈D' Σ_t log π(y_t | x, y_<t)

Sample several responses per prompt from the current model and keep only those that pass a filter: a
correct final answer (RFT), the top reward-model score (RAFT), or a reward threshold (ReST). Then
fine-tune on the kept responses with ordinary cross-entropy. A simple, stable substitute for RL that
improves the model on its own outputs.

Model:   Qwen2.5-0.5B-Instruct (Qwen/Qwen2.5-0.5B-Instruct), full fine-tuning
Data:    GSM8K (openai/gsm8k, split train), format "prompt"
Every hyperparameter in `Args` names its source (paper and section, or common practice and why).

Compiled with:
    ptcompile rejection-sampling-ft --model qwen2.5-0.5b-instruct

Run:
    python train_rejection_sampling_ft.py --help
    python train_rejection_sampling_ft.py                          # one process: a GPU if there is one, else the CPU
    accelerate launch train_rejection_sampling_ft.py               # data parallel over all GPUs (`accelerate config` for FSDP)
    python train_rejection_sampling_ft.py --resume_from_checkpoint latest   # continue an interrupted run exactly

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
import sys

from accelerate.utils import gather_object


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
    dataset: str = 'openai/gsm8k'
    """A local .jsonl / .json / .parquet file or a Hub dataset id (preset 'gsm8k')."""
    dataset_config: str = 'main'
    """Hub dataset configuration name ('' for none)."""
    dataset_split: str = 'train'
    """Hub dataset split."""
    prompt_column: str = 'question'
    """Column holding prompt: a string or a list of messages."""
    answer_column: str = 'answer'
    """Column holding answer: the reference answer, for verifiable rewards."""
    answer_format: str = 'gsm8k'
    """How the answer column is written: plain, gsm8k ('#### 42') or boxed (\\boxed{42})."""
    reward_model_path: str = ''
    """The final/ directory of a ptcompile reward model run (AutoModelForSequenceClassification +
    ptcompile_scorer.json) that scores each sample; '' uses the answer verifier instead (1 when
    the final answer equals the reference, else 0)."""
    reward_batch_size: int = 16
    """Sequences per forward pass of the reward model or PRM."""
    max_prompts: int = 0
    """Use only the first N usable prompts of the dataset (0: all)."""
    output_dir: str = 'runs/rejection-sampling-ft'
    """Where checkpoints, metrics.jsonl and the final model go."""

    # --- Method hyperparameters: Rejection-sampling fine-tuning --------------------------------------
    num_samples: int = 100
    """Responses sampled per prompt (k). More samples find more distinct correct paths but
    generation cost grows linearly. Typical range: [1, 1000]. Source: yuan2023scaling, RFT k =
    100: 100 sampled reasoning paths per GSM8K training question (results tables; official code
    runs 100 sampling seeds)."""
    temperature: float = 0.7
    """Sampling temperature; high enough for diverse reasoning paths, low enough that many are
    still correct. Typical range: [0.0, 2.0]. Source: common practice: Official RFT code
    (OFA-Sys/gsm8k-ScRel, single_inference_7b_13b.py) samples at temperature 0.7."""
    max_new_tokens: int = 256
    """Maximum tokens generated per sample; longer generations are cut and usually fail the answer
    check. Typical range: [16, 32768]. Source: common practice: Official RFT code
    (OFA-Sys/gsm8k-ScRel) generates at most 256 new tokens, enough for GSM8K solutions."""
    deduplicate: bool = True
    """Keep only distinct reasoning paths per prompt (RFT treats two paths as the same when they
    contain the same list of equations); duplicates otherwise overweight easy prompts. Source:
    yuan2023scaling, RFT keeps correct paths with distinct reasoning; official
    collect_rejection_sampling.py keeps a path only if its equation list is new and every
    equation checks."""
    keep_top_k: int = 0
    """Keep at most this many accepted samples per prompt (1 = RAFT's best-of-k selection); 0 keeps
    every accepted distinct sample, as RFT does. Typical range: [0, 1000]. Source: common
    practice: RFT keeps all distinct correct paths (0 here); RAFT keeps the single
    highest-reward sample per prompt (1)."""
    reward_threshold: float = 0.0
    """Only with a reward model (--reward_model_path): accept samples whose reward is at least
    this. The answer verifier ignores it and accepts exactly the samples with the correct final
    answer. Typical range: [-1000.0, 1000.0]. Source: common practice: ReST's Improve step
    filters by a reward threshold; 0 is the neutral point of a Bradley-Terry reward model, so
    set it from the score distribution of your own reward model."""
    num_rounds: int = 1
    """Sample-filter-fine-tune rounds; round r samples from the model that round r-1 trained and
    fine-tunes it further. Typical range: [1, 100]. Source: common practice: One round as in
    RFT, which samples once from the SFT model; RAFT and ReST repeat the round several times."""

    # --- Training defaults of the 'rejection-sampling' family ----------------------------------------
    learning_rate: float = 2e-05
    """Peak learning rate for the fine-tuning phase. Typical range: [1e-08, 0.01]. Source: common
    practice: As for SFT."""
    max_length: int = 1024
    """Maximum tokens of prompt plus kept completion. Typical range: [16, 1048576]. Source: common
    practice: Generated completions are bounded by max_new_tokens; 1024 leaves room for the
    prompt."""

    # --- Optimisation defaults shared by every method ------------------------------------------------
    seed: int = 42
    """Seed for initialisation of new parameters, data order and sampling; the same seed reproduces
    a run. Typical range: [0, 4294967295]. Source: common practice: Any fixed value; 42 is the
    transformers/TRL default, kept so runs compare."""
    num_train_epochs: int = 1
    """Passes over the training data (ignored when max_steps > 0). Typical range: [1, 100]. Source:
    common practice: Post-training rarely needs more than 1-3 epochs; more overfits small
    corpora."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 trains for num_train_epochs. Typical range: [-1,
    100000000]. Source: common practice: Epoch-based by default, as in transformers' Trainer."""
    per_device_train_batch_size: int = 4
    """Sequences (or pairs, groups) per device per micro-batch. Typical range: [1, 4096]. Source:
    common practice: Fits a 7-8B model with LoRA or a 1B full fine-tune on one 80 GB GPU at 2k
    tokens; raise it when memory allows."""
    gradient_accumulation_steps: int = 4
    """Micro-batches summed before each optimizer step; effective batch = this x batch size x
    processes. Typical range: [1, 4096]. Source: common practice: Reaches an effective batch of
    16 on one GPU; papers report 32-256 (scale this up)."""
    lr_scheduler_type: str = 'cosine'
    """Learning-rate schedule after warm-up. One of: linear, cosine, constant,
    constant_with_warmup. Source: common practice: Cosine decay after a short linear warm-up is
    the standard fine-tuning schedule."""
    warmup_ratio: float = 0.03
    """Fraction of optimizer steps spent linearly warming the learning rate up from 0. Typical
    range: [0.0, 0.5]. Source: common practice: 3% warm-up is the Alpaca/TRL SFT default; 3-10%
    is typical."""
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
    """One (prompt, answer) row -> the prompt's messages, its token ids (with the generation prompt) and
    the normalised reference answer (read only by the answer verifier)."""
    prompt = as_messages(column(row, args.prompt_column, where), where, args.prompt_column, role="user")
    answer = reference_answer(str(row[args.answer_column]), args.answer_format) if row.get(args.answer_column) is not None else None
    if not answer and not args.reward_model_path:
        raise DataError(f"{where}: no reference answer in field '{args.answer_column}': the answer verifier needs one (or pass --reward_model_path)")
    return {"where": where, "prompt": prompt, "prompt_ids": encoder.ids(prompt, add_generation_prompt=True), "answer": answer}


def read_prompts(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    encoder, prompts, skipped = ChatEncoder(tokenizer), [], []
    for where, row in iter_rows(args, skipped):
        if args.max_prompts and len(prompts) == args.max_prompts:
            break
        try:
            prompts.append(encode_row(row, where, encoder, args))
        except DataError as error:
            keep_or_raise(args, error, skipped)
    if not prompts:
        raise SystemExit(f"error: no usable prompts in {args.dataset}")
    return prompts, skipped


def training_item(prompt_ids: list[int], completion_ids: list[int], args: Args, where: str) -> dict:
    """prompt + completion -> {"input_ids", "labels"}: labels are -100 on the prompt (no loss there)."""
    if len(prompt_ids) >= args.max_length:
        raise DataError(f"{where}: prompt is {len(prompt_ids)} tokens, not shorter than max_length={args.max_length}")
    input_ids = (prompt_ids + completion_ids)[: args.max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[: args.max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(items: list[dict], tokenizer, args: Args, device: torch.device) -> dict:
    """Right-pad a micro-batch; num_items is its number of trained tokens (the loss is a token mean)."""
    width = max(len(item["input_ids"]) for item in items)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([i["input_ids"] + [pad] * (width - len(i["input_ids"])) for i in items]),
        "labels": torch.tensor([i["labels"] + [-100] * (width - len(i["labels"])) for i in items]),
        "attention_mask": torch.tensor([[1] * len(i["input_ids"]) + [0] * (width - len(i["input_ids"])) for i in items]),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["num_items"] = int((batch["labels"][:, 1:] != -100).sum())
    return batch


def build_items(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    """The training items are the accepted samples: read the prompts, sample num_samples completions for
    each, keep what the filter accepts (see rejection_sample). A resumed run reuses the saved samples."""
    samples_file = Path(args.output_dir) / "samples.jsonl"
    if args.resume_from_checkpoint and samples_file.is_file():
        records = [json.loads(line) for line in samples_file.read_text().splitlines()]
        skipped = []
    else:
        prompts, skipped = read_prompts(args, tokenizer)
        records = rejection_sample(prompts, tokenizer, args)
    items = []
    for record in records:
        for candidate in record["samples"]:
            if candidate["kept"]:
                items.append(training_item(record["prompt_ids"], candidate["ids"], args, record["where"]))
    if not items:
        raise SystemExit("error: no sample was accepted, so there is nothing to fine-tune on. Sample more (--num_samples), "
                         "start from a stronger model, or loosen the filter.")
    return items, skipped


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
# Rejection sampling: sample, score, filter
# ==================================================================================================


def sample_candidates(model, tokenizer, prefix_ids: list[list[int]], n: int, args: Args, accelerator: Accelerator, key: tuple, max_new_tokens: int, stop: str | None = None) -> list[dict]:
    """n sampled continuations of each token sequence in `prefix_ids` (rows: prefix 0 n times, then prefix
    1 n times, ...), as {"ids", "text", "end"}. end is "eos" (the reply is complete), "stop" (the text reached
    `stop`, e.g. the end of a reasoning step) or "length" (max_new_tokens ran out).

    Row j of prefix p draws from the random stream stream_seed(seed, *key, p, j), so the samples depend on
    the run's seed and the key (the prompt's index, ...), never on batching or on the number of processes.
    Sampling is from softmax(logits / temperature); the model's own
    generation_config defaults (top_p, repetition penalty) are switched off by sample_completions.
    """
    prompts = [list(prefix) for prefix in prefix_ids for _ in range(n)]
    seeds = [stream_seed(args.seed, *key, p, j) for p in range(len(prefix_ids)) for j in range(n)]
    rollout = sample_completions(
        model, tokenizer, prompts, seeds=seeds, temperature=args.temperature, top_p=1.0, top_k=0,
        max_new_tokens=max_new_tokens, accelerator=accelerator, stop=stop,
    )
    stopped = rollout.stopped or [False] * len(prompts)
    return [
        {"ids": ids, "text": text, "end": "stop" if at_stop else "length" if truncated else "eos"}
        for ids, text, at_stop, truncated in zip(rollout.completion_ids, rollout.texts, stopped, rollout.truncated)
    ]


def reasoning_signature(text: str) -> tuple:
    """What makes two reasoning paths 'the same' for deduplication. RFT compares the list of equations a
    path computes; GSM8K-style solutions carry them as calculator annotations <<48/2=24>>, used when present.
    Otherwise (our approximation) the sequence of numbers the path writes (digits, optional decimals)."""
    equations = re.findall(r"<<([^<>]*)>>", text)
    if equations:
        return tuple(equation.replace(" ", "") for equation in equations)
    return tuple(re.findall(r"\d+(?:\.\d+)?", text.replace(",", "")))


def score_samples(reward_model, prompt: dict, samples: list[dict]) -> list[float]:
    """The filter's score of each sample: the reward model's, or without one the answer verifier's
    (1.0 when the final answer equals the reference, else 0.0)."""
    if reward_model is not None:
        return reward_model([prompt["prompt"]] * len(samples), [candidate["text"] for candidate in samples])
    return [1.0 if candidate["correct"] else 0.0 for candidate in samples]


def select_samples(samples: list[dict], args: Args, with_reward_model: bool) -> list[int]:
    """Which samples of one prompt become training data (the accept(x, y) of D' in the objective):

      1. accept: the verifier's score is 1 (a correct final answer), or the reward is >= reward_threshold;
         a sample cut off by max_new_tokens is never accepted (it would teach the model not to stop);
      2. rank the accepted samples by score, best first (ties: sampling order);
      3. deduplicate (if enabled): keep only the first sample of each reasoning signature (RFT);
      4. keep at most keep_top_k of them (0: all; 1: RAFT's best-of-k).

    Sets candidate["accepted"] and returns the kept indices.
    """
    for candidate in samples:
        passes = candidate["score"] >= args.reward_threshold if with_reward_model else candidate["score"] == 1.0
        candidate["accepted"] = passes and candidate["end"] != "length"
    accepted = sorted((i for i, c in enumerate(samples) if c["accepted"]), key=lambda i: (-samples[i]["score"], i))
    if args.deduplicate:
        seen, distinct = set(), []
        for i in accepted:
            signature = reasoning_signature(samples[i]["text"])
            if signature not in seen:
                seen.add(signature)
                distinct.append(i)
        accepted = distinct
    return accepted[: args.keep_top_k] if args.keep_top_k > 0 else accepted


def generation_accelerator(args: Args) -> Accelerator:
    """The accelerator for the generation phase (build_items runs before main() hands its own around); the
    process state is shared, so this is the same device, process index and mixed precision as main()'s."""
    return Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )


def sampling_model(args: Args, accelerator: Accelerator):
    """A frozen copy of the starting model for generation, in bf16 where the training computes in bf16.
    It is freed before training starts, so it never shares memory with the model being trained."""
    load_args = args
    if resolve_mixed_precision(args.mixed_precision) == "bf16" and args.model_dtype == "float32":
        load_args = dataclasses.replace(args, model_dtype="bfloat16")
    return load_model(load_args, accelerator, trainable=False).to(accelerator.device)


def release_memory() -> None:
    """Return the memory of models the caller has just deleted (`del model`) to the accelerator."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rejection_sample(prompts: list[dict], tokenizer, args: Args) -> list[dict]:
    """Sample num_samples completions per prompt with the starting model, score and filter them.

    Processes share the prompts and every prompt has its own seed, so the samples (and the training data)
    do not depend on the number of processes. Writes output_dir/samples.jsonl (every sample, its score and
    whether it was kept) and output_dir/sampling.json (acceptance statistics).
    """
    accelerator = generation_accelerator(args)
    model = sampling_model(args, accelerator)
    reward_model = RewardModelScorer(args.reward_model_path, accelerator, args.reward_batch_size) if args.reward_model_path else None
    records = []
    mine = range(accelerator.process_index, len(prompts), accelerator.num_processes)
    for index in tqdm(mine, desc="sampling", disable=not accelerator.is_local_main_process):
        prompt = prompts[index]
        samples = sample_candidates(model, tokenizer, [prompt["prompt_ids"]], args.num_samples, args, accelerator, (index,), args.max_new_tokens)
        for candidate in samples:
            candidate["answer"] = extract_answer(candidate["text"])
            candidate["correct"] = prompt["answer"] is not None and answers_match(candidate["answer"], prompt["answer"])
        for candidate, score in zip(samples, score_samples(reward_model, prompt, samples)):
            candidate["score"] = score
        kept = set(select_samples(samples, args, reward_model is not None))
        for position, candidate in enumerate(samples):
            candidate["kept"] = position in kept
        records.append({"index": index, "where": prompt["where"], "prompt": prompt["prompt"], "prompt_ids": prompt["prompt_ids"], "reference": prompt["answer"], "samples": samples})
    del model, reward_model
    release_memory()
    records = sorted(gather_object(records), key=lambda record: record["index"])
    summary = sampling_summary(records)
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / "samples.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        (output_dir / "sampling.json").write_text(json.dumps(summary, indent=2))
        print(
            f"sampled {summary['samples']} completions for {summary['prompts']} prompts: {summary['correct_rate']:.1%} correct, "
            f"{summary['accepted_rate']:.1%} accepted, {summary['kept']} kept for training "
            f"({summary['prompts_with_kept']} prompts have at least one)"
        )
    accelerator.wait_for_everyone()
    return records


def sampling_summary(records: list[dict]) -> dict:
    samples = [candidate for record in records for candidate in record["samples"]]
    return {
        "prompts": len(records),
        "samples": len(samples),
        "correct_rate": sum(c["correct"] for c in samples) / len(samples),
        "accepted_rate": sum(c["accepted"] for c in samples) / len(samples),
        "kept": sum(c["kept"] for c in samples),
        "prompts_with_kept": sum(any(c["kept"] for c in record["samples"]) for record in records),
        "mean_score": sum(c["score"] for c in samples) / len(samples),
    }


# ==================================================================================================
# Loss: supervised fine-tuning on the generated completions
# ==================================================================================================


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained (label != -100) tokens.

        L_SFT = -(1 / N) * sum_i sum_t log p_theta(y_i,t | x_i, y_i,<t)

    with N the number of trained tokens in the whole optimizer step (Ouyang et al. 2022, Sec. 3.5; the usual
    token-level mean). This function returns the sum; the training loop divides by N across micro-batches
    and processes, so every token weighs the same however the batch is split.
    """
    vocab = logits.size(-1)
    # Position t predicts token t+1.
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def compute_loss(model, batch: dict, args: Args, context: dict) -> tuple[torch.Tensor, dict]:
    """Summed loss of one micro-batch (the loop divides by the step's global token count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum = causal_lm_loss(logits, batch["labels"])
    return loss_sum, {}


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_output_dir(args)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=args.report_to or None,
        # Several processes without CUDA (e.g. `accelerate launch --multi_gpu` on a CPU box) only form a gloo
        # process group when accelerate is told to use the CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    accelerator.wait_for_everyone()  # every process has checked the output directory before anyone writes to it
    set_seed(args.seed)  # same seed on every process: identical initial adapter weights and data order
    output_dir = Path(args.output_dir)
    say = accelerator.print

    tokenizer = load_tokenizer(args)
    items, skipped = build_items(args, tokenizer)
    report_data(say, args, len(items), skipped)
    per_step, steps_per_epoch, total_steps = plan_steps(len(items), args, accelerator.num_processes)
    model = load_model(args, accelerator)
    context: dict = {}
    optimizer = make_optimizer(model, args, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The schedule is built on the prepared optimiser but not passed to prepare(): accelerate would step it
    # once per process, and then 1 and N processes would follow different learning-rate curves.
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    start_step, last_checkpoint = start_or_resume(args, accelerator, model, optimizer, scheduler, say)
    if args.report_to:
        accelerator.init_trackers(output_dir.name, config=dataclasses.asdict(args))
    say(
        f"{total_steps} optimizer steps of {per_step} items "
        f"({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes)"
    )

    model.train()
    progress = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc="train")
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        micro_batches = [
            collate([items[i] for i in indices], tokenizer, args, accelerator.device)
            for indices in step_indices(step, len(items), per_step, steps_per_epoch, args, accelerator.process_index, accelerator.num_processes)
        ]
        # The loss of a step is a sum over all its micro-batches on all processes divided by the global number
        # of trained tokens, so accumulation and data parallelism give exactly the gradient of one big batch.
        local_count = sum(batch["num_items"] for batch in micro_batches)
        local_tokens = sum(count_tokens(batch) for batch in micro_batches)
        global_count = accelerator.reduce(torch.tensor(float(local_count), device=accelerator.device), reduction="sum").item()
        sums: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            is_last = index == len(micro_batches) - 1
            with nullcontext() if is_last else accelerator.no_sync(model):
                loss_sum, metrics = compute_loss(model, batch, args, context)
                # DDP averages gradients over processes; multiplying by their number turns that into a sum.
                accelerator.backward(loss_sum * accelerator.num_processes / global_count)
            for name, value in {"loss": loss_sum.detach(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value
        names = sorted(sums)
        values = [torch.as_tensor(sums[n], device=accelerator.device, dtype=torch.float32) for n in names]
        totals = accelerator.reduce(torch.stack(values + [torch.tensor(float(local_tokens), device=accelerator.device)]), reduction="sum").tolist()
        logs = {name: value / global_count for name, value in zip(names, totals)}
        logs["num_tokens"] = totals[-1]
        stop_if_not_finite("loss", logs["loss"], step, last_checkpoint)
        # The global gradient norm (clipped to max_grad_norm; an infinite bound only measures it).
        logs["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else math.inf))
        if accelerator.scaler is None:  # fp16 loss scaling expects the odd inf gradient and skips that step itself
            stop_if_not_finite("gradient norm", logs["grad_norm"], step, last_checkpoint)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # honest step times: wait for the GPU to finish
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        logs.update(step=step + 1, epoch=(step + 1) / steps_per_epoch, learning_rate=scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - started)
        progress.update(1)
        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "learning_rate",)})
            if accelerator.is_main_process:
                with (output_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(logs) + "\n")
            if args.report_to:
                accelerator.log(logs, step=step + 1)
        if args.save_steps > 0 and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            last_checkpoint = save_checkpoint(step + 1, accelerator, model, optimizer, scheduler, args)
    progress.close()
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


def run_rounds(argv: list[str] | None = None) -> None:
    """num_rounds rounds of sample -> filter -> fine-tune. Round r is a complete run of main() in
    output_dir/round-r that starts from the model round r-1 saved (one round: main() in output_dir).
    With --resume_from_checkpoint latest, rounds already finished (their final/ exists) are skipped and the
    run continues where it stopped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.num_rounds == 1:
        return main(argv)
    check_output_dir(args)
    model_path = args.model_name_or_path
    for round_index in range(1, args.num_rounds + 1):
        round_dir = Path(args.output_dir) / f"round-{round_index}"
        if not (args.resume_from_checkpoint and (round_dir / "final").is_dir()):
            resume = args.resume_from_checkpoint if any(round_dir.glob("checkpoint-*")) or (round_dir / "samples.jsonl").is_file() else ""
            main(
                argv
                + ["--model_name_or_path", model_path, "--output_dir", str(round_dir), "--seed", str(args.seed + round_index - 1)]
                + ["--resume_from_checkpoint", resume, "--num_rounds", "1"]
            )
            release_memory()
        model_path = str(round_dir / "final")
    print(f"done: {args.num_rounds} rounds; the final model is {model_path}")


if __name__ == "__main__":
    try:
        run_rounds()
    except DataError as error:
        # Bad training data is the user's to fix: say where, without a traceback.
        raise SystemExit(f"error: {error}\n(a malformed row stops the run; --skip_bad_rows true skips and counts such rows instead)") from None
