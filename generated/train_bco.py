"""Binary Classifier Optimization (unpaired) (bco): a single-file training script compiled by ptcompile.

Paper:
    - Binary Classifier Optimization for Large Language Model Alignment (Jung et al., 2024), arXiv 2404.04656 [jung2024binary]

Objective (BCO loss with reward shift δ (equation number not verified) of jung2024binary):
    L = -E_desirable[ log σ(r - δ) ] - E_undesirable[ log σ(-(r - δ)) ], r =
    β·log(π(y|x)/π_ref(y|x)), δ = moving average of recent rewards (no gradient)

Aligns on thumbs-up / thumbs-down feedback by training a binary classifier whose logit is the
implicit reward β·log(π/π_ref): desirable completions are classified as positive and undesirable
ones as negative, both relative to a running mean δ of the rewards. Needs no pairs and, unlike KTO,
no in-batch KL estimate.

Model:   Qwen2.5-0.5B-Instruct (Qwen/Qwen2.5-0.5B-Instruct), full fine-tuning
Data:    KTO mix 14k (trl-lib/kto-mix-14k, split train), format "unpaired"
Every hyperparameter in `Args` names its source (paper and section, or common practice and why).

Compiled with:
    ptcompile bco --model qwen2.5-0.5b-instruct

Run:
    python train_bco.py --help
    python train_bco.py                          # one process: a GPU if there is one, else the CPU
    accelerate launch train_bco.py               # data parallel over all GPUs (`accelerate config` for FSDP)
    python train_bco.py --resume_from_checkpoint latest   # continue an interrupted run exactly

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
from accelerate.utils import TorchDynamoPlugin, extract_model_from_parallel, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler


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
    dataset: str = 'trl-lib/kto-mix-14k'
    """A local .jsonl / .json / .parquet file or a Hub dataset id (preset 'kto-mix-14k')."""
    dataset_config: str = ''
    """Hub dataset configuration name ('' for none)."""
    dataset_split: str = 'train'
    """Hub dataset split."""
    prompt_column: str = 'prompt'
    """Column holding prompt: a string or a list of messages."""
    completion_column: str = 'completion'
    """Column holding completion: the reply."""
    label_column: str = 'label'
    """Column holding label: true when the reply is desirable."""
    output_dir: str = 'runs/bco'
    """Where checkpoints, metrics.jsonl and the final model go."""

    # --- Method hyperparameters: Binary Classifier Optimization (unpaired) ---------------------------
    beta: float = 0.1
    """Scale of the implicit reward that serves as the classifier logit. Typical range: [0.001,
    1.0]. Source: common practice: Default of TRL's BCOConfig (trl.experimental.bco, present in
    TRL 1.9, gone by 1.16); the paper's paired runs used 0.01 (see bco-pair)."""

    # --- Training defaults of the 'unpaired' family --------------------------------------------------
    warmup_ratio: float = 0.1
    """Fraction of steps in linear warm-up. Typical range: [0.0, 0.5]. Source: common practice: As
    for DPO-style training."""
    learning_rate: float = 5e-07
    """Peak learning rate. Typical range: [1e-09, 0.001]. Source: common practice: Same scale as
    DPO for full fine-tuning."""
    max_length: int = 1024
    """Maximum tokens of prompt plus completion. Typical range: [16, 1048576]. Source: common
    practice: 1024 fits most feedback datasets."""
    max_prompt_length: int = 512
    """Prompts longer than this are truncated from the left. Typical range: [8, 1048576]. Source:
    common practice: Half of max_length."""
    precompute_ref_log_probs: bool = False
    """Compute the reference model's log-probabilities (of every completion, and for KTO of every
    mismatched completion) in one pass before training and free the reference model. Source:
    common practice: Offered by TRL's KTOTrainer; trades one extra forward pass over the data
    for a model's worth of memory."""

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
    chunked_loss: bool = True
    """Form log-probabilities from the final hidden states a chunk of trained tokens at a time,
    never the full logits tensor (same values; false: the plain output layer)."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the output layer with chunked_loss (peak extra memory ~ 10 B x chunk x
    vocabulary)."""
    torch_compile: bool = False
    """Compile the model with torch.compile (inductor, through accelerate): fused kernels and fewer
    saved activations after a one-off compile (a minute or so for a 1B model on a GPU; a few
    recompiles while batch widths vary). Same losses as eager, except that dropout masks come
    from inductor's own random numbers."""


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


def label_field(row: dict, name: str, where: str) -> bool:
    value = column(row, name, where)
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise DataError(f"{where}: field '{name}' must be true/false (desirable or not), got {value!r}")


def encode_completion(prompt: list[dict], value, name: str, label: bool, where: str, encoder: ChatEncoder, args: Args) -> dict:
    """One labelled completion -> token ids of its prompt and of the completion."""
    completion = completion_messages(value, prompt, where, name)
    prompt_ids, completion_ids = encoder.prompt_completion(prompt, completion, where)
    # Long prompts lose their beginning (the end of a conversation matters most); completions lose their end.
    prompt_ids = prompt_ids[-args.max_prompt_length :]
    room = args.max_length - len(prompt_ids)
    if room <= 0:
        raise DataError(f"{where}: prompt of {len(prompt_ids)} tokens leaves no room under max_length={args.max_length}")
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids[:room], "label": label}


def encode_row(row: dict, where: str, encoder: ChatEncoder, args: Args) -> list[dict]:
    """One (prompt, completion, label) row -> one item; label true means the completion is desirable."""
    prompt = as_messages(column(row, args.prompt_column, where), where, args.prompt_column, role="user")
    label = label_field(row, args.label_column, where)
    return [encode_completion(prompt, column(row, args.completion_column, where), args.completion_column, label, where, encoder, args)]


def build_items(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    encoder, items, skipped = ChatEncoder(tokenizer), [], []
    for where, row in iter_rows(args, skipped):
        try:
            items.extend(encode_row(row, where, encoder, args))
        except DataError as error:
            keep_or_raise(args, error, skipped)
    return items, skipped


def pad_rows(prompts: list[list[int]], completions: list[list[int]], pad: int, prefix: str = "") -> dict:
    """Right-padded prompt+completion rows with attention and completion masks."""
    sequences = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in sequences)
    return {
        f"{prefix}input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences]),
        f"{prefix}attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        f"{prefix}completion_mask": torch.tensor([[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in zip(prompts, completions)]),
    }


def collate(items: list[dict], tokenizer, args: Args, device: torch.device) -> dict:
    """One row per labelled completion."""
    prompts = [i["prompt_ids"] for i in items]
    batch = pad_rows(prompts, [i["completion_ids"] for i in items], tokenizer.pad_token_id)
    batch["labels"] = torch.tensor([i["label"] for i in items], dtype=torch.bool)
    if "ref_logps" in items[0]:
        batch["ref_logps"] = torch.tensor([i["ref_logps"] for i in items])
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["num_items"] = len(items)  # the loss is a mean over labelled completions
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


# ==================================================================================================
# Token log-probabilities without the full logits tensor (--chunked_loss true, the default)
# ==================================================================================================
# The output layer's logits are the largest activation of a small model: 16k tokens x 128k vocabulary
# (Llama 3) is 4 GiB in bf16, 8 GiB more for the float32 copy the cross-entropy makes, and as much again
# for its gradient. With chunked_loss the model's output layer becomes a pass-through, so the forward pass
# returns the final hidden states, and the log-probabilities are formed here: only at the trained tokens
# (prompt and padding positions never meet the output layer) and `loss_chunk_size` tokens at a time.
# Per-token log-probabilities (preference losses weigh each sequence differently) recompute each chunk's
# logits in the backward pass; a plain summed cross-entropy (SFT) knows its gradient already in the forward
# pass and recomputes nothing. The results equal the plain path (tests/losses/test_chunked_logps.py: values
# and gradients, float32 and bf16 autocast).

# Architectures whose causal-LM head is exactly `logits = hidden @ W.T` (no bias, soft-capping or scaling
# after it). Others (Gemma 2's soft-capped logits, for one) take the plain path.
PLAIN_HEAD_MODEL_TYPES = ('llama', 'mistral', 'mixtral', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe', 'phi3')


class ChunkedOutputLayer(torch.nn.Module):
    """Stands in for the output layer. Its forward pass returns the hidden states unchanged; the loss applies
    the weight afterwards, a chunk at a time. The weight stays registered under the same name, so DDP
    synchronises its gradient, tied embeddings stay tied and save_pretrained writes the same tensors."""

    def __init__(self, head: torch.nn.Linear, chunk_size: int):
        super().__init__()
        self.weight = head.weight
        self.chunk_size = chunk_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The dtype the output layer's matmul would have run in here (accelerate's autocast wraps the model's
        # forward pass, not the loss): token_logps uses the same one.
        self.matmul_dtype = autocast_dtype(hidden_states.device, self.weight.dtype)
        return hidden_states

    @staticmethod
    def trained_positions(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) indices of the targets that are trained (not -100), in row-major order."""
        return (targets != -100).nonzero(as_tuple=True)

    def token_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) at every position whose target is not -100, and the row each belongs to.

        `hidden` [rows, positions, hidden] are the final hidden states at the positions predicting `targets`.
        """
        rows, positions = self.trained_positions(targets)
        logps = ChunkedTokenLogps.apply(hidden[rows, positions], self.weight, targets[rows, positions], self.chunk_size, self.matmul_dtype)
        return logps, rows


def use_chunked_head(model, args: Args, say) -> None:
    """Swap the output layer for a ChunkedOutputLayer when --chunked_loss is on and the architecture allows it."""
    if not args.chunked_loss:
        return
    if args.loss_chunk_size < 1:
        raise SystemExit(f"error: --loss_chunk_size must be at least 1, got {args.loss_chunk_size}")
    head = model.get_output_embeddings()
    if model.config.model_type not in PLAIN_HEAD_MODEL_TYPES or getattr(head, "bias", None) is not None:
        say(f"note: chunked_loss is not used for model type {model.config.model_type!r} (its head is not a plain linear layer); logits are formed in full")
        return
    model.set_output_embeddings(ChunkedOutputLayer(head, args.loss_chunk_size))


def chunked_output_layer(model) -> ChunkedOutputLayer | None:
    """The ChunkedOutputLayer of `model` (possibly wrapped by accelerate, torch.compile or peft), or None: it
    returns logits."""
    head = extract_model_from_parallel(model, keep_torch_compile=False).get_output_embeddings()
    head = getattr(head, "_orig_mod", head)  # a compiled head
    return head if isinstance(head, ChunkedOutputLayer) else None


def autocast_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The dtype autocast would run a matmul in here (the plain output layer's dtype), else `fallback`."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T)[target] for N tokens, `chunk` tokens at a time; never holds more than one chunk of
    logits. Matmuls run in `dtype` (the output layer's, autocast included) and the softmax in float32, as
    nn.Linear followed by F.cross_entropy(logits.float()) would."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        w = weight.to(dtype)
        logps = torch.empty(hidden.size(0), device=hidden.device, dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), chunk):
                logits = (hidden[start : start + chunk].to(dtype) @ w.T).float()
                target = targets[start : start + chunk, None]
                logps[start : start + chunk] = (logits.gather(1, target) - logits.logsumexp(1, keepdim=True)).squeeze(1)
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), ctx.chunk):
                h = hidden[start : start + ctx.chunk].to(ctx.dtype)
                # d log p(t) / d logits = onehot(t) - softmax(logits), scaled by the incoming gradient; in place,
                # so a chunk costs one float32 [chunk, vocabulary] buffer at a time.
                grad_logits = torch.softmax((h @ w.T).float(), dim=1).neg_()
                grad_logits.scatter_add_(1, targets[start : start + ctx.chunk, None], torch.ones_like(grad_logits[:, :1]))
                grad_logits = grad_logits.mul_(grad_logps[start : start + ctx.chunk, None]).to(ctx.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + ctx.chunk] = (grad_logits @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.add_(grad_logits.T @ h)  # summed in float32 across chunks, cast element by element
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(args: Args, accelerator: Accelerator, trainable: bool = True):
    """The causal LM (with its PEFT adapters when `trainable`), on this process's device."""
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=DTYPES[args.model_dtype], attn_implementation=args.attn_implementation
    )
    model.config.use_cache = False  # the KV cache only helps generation
    use_chunked_head(model, args, accelerator.print)
    if not trainable:
        return model.eval().requires_grad_(False)
    if args.gradient_checkpointing:
        # Recompute activations in the backward pass: ~30% slower steps for far less activation memory.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ==================================================================================================
# Loss
# ==================================================================================================


def completion_logps(model, batch: dict, prefix: str = "") -> torch.Tensor:
    """log π(y|x) summed over each row's completion tokens (prefix "kl_": the mismatched rows)."""
    input_ids = batch[f"{prefix}input_ids"]
    output = model(input_ids=input_ids, attention_mask=batch[f"{prefix}attention_mask"]).logits[:, :-1]
    mask = batch[f"{prefix}completion_mask"][:, 1:]
    head = chunked_output_layer(model)
    if head is not None:  # chunked_loss: `output` holds the final hidden states (see ChunkedOutputLayer)
        token_logps, rows = head.token_logps(output, input_ids[:, 1:].masked_fill(mask == 0, -100))
        return torch.zeros(len(input_ids), device=input_ids.device).index_add(0, rows, token_logps)
    token_logps = -F.cross_entropy(output.transpose(1, 2).float(), input_ids[:, 1:], reduction="none")
    return (token_logps * mask).sum(-1)


def reference_logps(model, batch: dict, context: dict, prefix: str = "") -> torch.Tensor:
    """log π_ref of the batch's completions: precomputed, or from the frozen reference."""
    if f"ref_{prefix}logps" in batch:
        return batch[f"ref_{prefix}logps"]
    with torch.no_grad(), context["accelerator"].autocast():
        return completion_logps(context["reference"], batch, prefix)


def precompute_reference(items: list[dict], reference, tokenizer, args: Args, accelerator: Accelerator) -> None:
    """One pass over the data with the reference model; its log-probs are stored in the items so the
    reference never has to sit in memory during training. Processes split the items and share results."""
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    results = []
    for start in tqdm(range(0, len(mine), args.per_device_train_batch_size), desc="reference log-probs", disable=not accelerator.is_local_main_process):
        indices = mine[start : start + args.per_device_train_batch_size]
        batch = collate([items[i] for i in indices], tokenizer, args, accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            logps = completion_logps(reference, batch).tolist()
        results += list(zip(indices, logps))
    from accelerate.utils import gather_object

    for index, logp in gather_object(results):
        items[index]["ref_logps"] = logp


def bco_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary Classifier Optimization with reward shift δ (Jung et al. 2024), per completion:

        r = β·log[π(y|x) / π_ref(y|x)]
        L = -log σ(r - δ)       if y is desirable
        L = -log σ(-(r - δ))    if y is undesirable

    δ = delta (no gradient) is the running mean of all rewards of the previous optimizer steps (see
    update_reward_shift). Deviations: the paper's density-ratio reweighting of undesirable prompts
    (underlying distribution matching) is omitted; TRL's BCOTrainer (before 1.16) folded the current batch
    into δ before using it, here δ lags by one optimizer step so that every split of a step sees the same
    δ. Also returns the rewards r, detached, for logging.
    """
    rewards = beta * (logps - ref_logps)
    losses = torch.where(desirable, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
    return losses, rewards.detach()


def update_reward_shift(state: dict, step_mean_reward: float, step_rewards: float) -> None:
    """Fold one optimizer step's rewards into the running mean δ (all rewards seen so far, equally weighted).

    Called after each step with the step's global mean reward, so the next step's loss uses δ over every
    earlier step, and 1 process, accumulation and N processes keep the same δ. The state is saved in
    checkpoints, so a resumed run continues with the δ it had.
    """
    count = state["reward_count"] + step_rewards
    state["reward_shift"] += (step_mean_reward - state["reward_shift"]) * step_rewards / count
    state["reward_count"] = count


def compute_loss(model, batch: dict, args: Args, context: dict) -> tuple[torch.Tensor, dict]:
    """Summed loss over the micro-batch's completions, plus summed metrics (the loop divides by the count)."""
    logps = completion_logps(model, batch)
    ref_logps = reference_logps(model, batch, context)
    desirable = batch["labels"]
    losses, rewards = bco_loss(logps, ref_logps, desirable, beta=args.beta, delta=context["state"]["reward_shift"])
    metrics = {
        "rewards/desirable": rewards[desirable].sum(),
        "rewards/undesirable": rewards[~desirable].sum(),
        "logps/desirable": logps.detach()[desirable].sum(),
        "logps/undesirable": logps.detach()[~desirable].sum(),
        "fraction/desirable": desirable.float().sum(),
    }
    return losses.sum(), metrics


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
        # --torch_compile: accelerate compiles the prepared model (after DDP wrapping, as DDP requires).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if args.torch_compile else "no"),
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
    # π_ref is the starting model, frozen. It is not wrapped by accelerate: it never needs gradients.
    reference = load_model(args, accelerator, trainable=False).to(accelerator.device)
    if args.precompute_ref_log_probs:
        precompute_reference(items, reference, tokenizer, args, accelerator)
        reference = None  # freed: training reads the stored log-probs
    context = {"reference": reference, "accelerator": accelerator}
    # The running mean δ of the rewards: starts at 0 (the policy equals the reference before training).
    context["state"] = {"reward_shift": 0.0, "reward_count": 0.0}
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
    start_step, last_checkpoint = start_or_resume(args, accelerator, model, optimizer, scheduler, say, loss_state=context["state"])
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
        # of labelled completions, so accumulation and data parallelism give exactly the gradient of one big batch.
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
        # Every process sees the same all-reduced step means, so δ stays identical across processes.
        logs["reward_shift"] = context["state"]["reward_shift"]  # the δ this step used
        update_reward_shift(context["state"], logs["rewards/desirable"] + logs["rewards/undesirable"], global_count)
        # The loop divided every sum by all completions of the step; report each class's own mean instead
        # (a class with no completion in this step gets no entry).
        share = logs["fraction/desirable"]
        for name in ("rewards", "logps"):
            for kind, part in (("desirable", share), ("undesirable", 1 - share)):
                total = logs.pop(f"{name}/{kind}")
                if part > 0:
                    logs[f"{name}/{kind}"] = total / part
        if 0 < share < 1:
            logs["rewards/margin"] = logs["rewards/desirable"] - logs["rewards/undesirable"]
        progress.update(1)
        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "rewards/margin",)})
            if accelerator.is_main_process:
                with (output_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(logs) + "\n")
            if args.report_to:
                accelerator.log(logs, step=step + 1)
        if args.save_steps > 0 and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            last_checkpoint = save_checkpoint(step + 1, accelerator, model, optimizer, scheduler, args, loss_state=context["state"])
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


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        # Bad training data is the user's to fix: say where, without a traceback.
        raise SystemExit(f"error: {error}\n(a malformed row stops the run; --skip_bad_rows true skips and counts such rows instead)") from None
