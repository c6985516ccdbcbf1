"""ReMax (remax): a single-file training script compiled by ptcompile.

Papers:
    - ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models (Li et al., 2023), arXiv 2310.10505 [li2023remax]
    - Simple statistical gradient-following algorithms for connectionist reinforcement learning (Williams, 1992) [williams1992simple]

Objective (Algorithm 1 (ReMax gradient estimator with the greedy response's reward as baseline) of li2023remax):
    y ~ π_θ(·|x) (sampled), ȳ = greedy decode of π_θ for x; L = −(r(x,y) − r(x,ȳ))·Σ_t log
    π_θ(y_t|x,y_<t) (reward difference held constant; mean over prompts)

REINFORCE for language models with a free, per-prompt baseline: besides one sampled completion, the
model also decodes a greedy completion for the same prompt, and the sampled completion's reward
minus the greedy one's weights the gradient of its log-probability. Because the greedy reward does
not depend on the sampled tokens the estimator stays unbiased, and no value network, clipping or GAE
is needed.

Model:   Qwen2.5-0.5B-Instruct (Qwen/Qwen2.5-0.5B-Instruct), full fine-tuning
Data:    GSM8K (openai/gsm8k, split train), format "prompt"
Every hyperparameter in `Args` names its source (paper and section, or common practice and why).

Compiled with:
    ptcompile remax --model qwen2.5-0.5b-instruct

Run:
    python train_remax.py --help
    python train_remax.py                          # one process: a GPU if there is one, else the CPU
    accelerate launch train_remax.py               # data parallel over all GPUs (`accelerate config` for FSDP)
    python train_remax.py --resume_from_checkpoint latest   # continue an interrupted run exactly

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
from accelerate.utils import gather_object
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
    output_dir: str = 'runs/remax'
    """Where checkpoints, metrics.jsonl and the final model go."""

    # --- Method hyperparameters: ReMax ---------------------------------------------------------------
    max_completion_length: int = 512
    """Maximum tokens for both the sampled and the greedy completion. Typical range: [16, 131072].
    Source: common practice: Math solutions on GSM8K fit in 512 tokens."""
    temperature: float = 1.0
    """Temperature of the sampled completion (the baseline completion is always greedy). Typical
    range: [0.1, 2.0]. Source: common practice: Sampling from the model's own distribution keeps
    the gradient estimate unbiased."""

    # --- Training defaults of the 'policy-gradient' family -------------------------------------------
    per_device_train_batch_size: int = 2
    """Prompts per device per micro-batch; each brings its whole group of completions, so rows per
    micro-batch = this x num_generations. Typical range: [1, 4096]. Source: common practice: 2
    prompts x 8-16 completions keeps a 1B policy's micro-batch within one 80 GB GPU at 1k-token
    completions."""
    lr_scheduler_type: str = 'constant'
    """Learning-rate schedule. One of: linear, cosine, constant, constant_with_warmup. Source:
    common practice: RL runs are usually open-ended, so a constant rate is the norm."""
    warmup_ratio: float = 0.0
    """Fraction of steps in linear warm-up. Typical range: [0.0, 0.5]. Source: common practice: No
    warm-up with a constant RL learning rate."""
    learning_rate: float = 1e-06
    """Peak learning rate of the policy. Typical range: [1e-09, 0.001]. Source: common practice: RL
    fine-tunes of 1-8B models use 1e-6 (DeepSeekMath GRPO, DAPO, TRL GRPO default)."""
    max_prompt_length: int = 512
    """Prompts longer than this are truncated from the left. Typical range: [8, 1048576]. Source:
    common practice: Math and code prompts fit in 512 tokens."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1.0 samples from the full distribution). Typical range:
    [0.01, 1.0]. Source: common practice: 1.0 (no truncation) is the TRL, verl and OpenRLHF
    training default; truncation makes the samples off-policy."""
    num_iterations: int = 1
    """Passes μ of policy updates over each batch of rollouts; above 1 the importance ratio and its
    clip become active. Typical range: [1, 16]. Source: common practice: One update per batch
    (fully on-policy) is the default of TRL and of most GRPO recipes."""
    steps_per_generation: int = 1
    """Optimizer steps taken from each batch of rollouts, each on its own slice of the batch; every
    step after the first is off-policy. Typical range: [1, 64]. Source: common practice: One
    optimizer step per rollout batch is TRL's default (steps_per_generation =
    gradient_accumulation_steps)."""
    reward: str = 'math'
    """Reward source, fixed when the script is compiled (ptcompile METHOD --set reward=...): math =
    1 for a final answer equal to the answer column, else 0; math_format = that plus a bonus for
    matching a format pattern; code = 1 when the completion passes the unit tests in the answer
    column; model = a learned reward model's score; judge = an LLM judge's P(correct). One of:
    math, math_format, code, model, judge. Source: common practice: Rule-based verifiable
    rewards are what DeepSeekMath-style RL on GSM8K/MATH uses (DeepSeek-R1 Sec. 2.2.2 adds a
    format reward); a learned reward model is the RLHF alternative."""

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
    """One (prompt, answer) row -> the prompt's messages and token ids (chat template, generation prompt) and its answer."""
    prompt = as_messages(column(row, args.prompt_column, where), where, args.prompt_column, role="user")
    answer = column(row, args.answer_column, where)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: field '{args.answer_column}' must be a non-empty string (the reference answer)")
    # Long prompts lose their beginning: the question at the end matters most.
    prompt_ids = encoder.ids(prompt, add_generation_prompt=True)[-args.max_prompt_length :]
    return {"prompt": prompt, "prompt_ids": prompt_ids, "answer": answer}


def build_items(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    encoder, items, skipped = ChatEncoder(tokenizer), [], []
    for where, row in iter_rows(args, skipped):
        try:
            items.append(encode_row(row, where, encoder, args))
        except DataError as error:
            keep_or_raise(args, error, skipped)
    return items, skipped


def collate(samples: list[dict], tokenizer, args: Args, device: torch.device) -> dict:
    """A training micro-batch from scored rollout samples: prompt + completion rows and their advantages."""
    batch = sequence_batch([s["prompt_ids"] for s in samples], [s["completion_ids"] for s in samples], tokenizer.pad_token_id, device)
    width = batch["completion_mask"].shape[1]
    batch["advantages"] = torch.tensor([s["advantage"] for s in samples], device=device)
    for key in ("old_logps", "ref_logps"):
        if samples[0].get(key) is not None:
            batch[key] = torch.tensor([s[key] + [0.0] * (width - len(s[key])) for s in samples], device=device)
    batch["num_items"] = len(samples)  # the loss is a mean over completions
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
# Rewards: verifiable final answers
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


def build_reward(args: Args, accelerator: Accelerator):
    """The reward of this script: score(prompts, completions, answers) -> one float per completion."""
    def score(prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        return [math_reward(c, a, args.answer_format) for c, a in zip(completions, answers)]

    return score


# ==================================================================================================
# Advantages
# ==================================================================================================


def remax_advantages(rewards: list[float], greedy_rewards: list[float]) -> list[float]:
    """ReMax advantages (Algorithm 1 of Li et al. 2023): A = r(x, a) − r(x, ā), where a is the sampled
    completion and ā the greedy completion of the same prompt under the same policy."""
    return [r - b for r, b in zip(rewards, greedy_rewards)]


# ==================================================================================================
# Loss
# ==================================================================================================


def remax_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """ReMax, Algorithm 1 of Li et al. (2023), as a loss whose gradient is the estimator (negated):

        L = −Σ_i (r(x_i, a_i) − r(x_i, ā_i)) · Σ_t log π_θ(a_i,t | x_i, a_i,<t)

    summed over this micro-batch's completions; the loop divides by the number of completions (the
    paper's 1/N). The reward difference is a constant (no gradient). Returns the summed loss and no metrics.
    """
    return -(advantages * (logps * mask).sum(-1)).sum(), {}


def compute_loss(model, batch: dict, args: Args, context: dict) -> tuple[torch.Tensor, dict]:
    """Summed loss of one micro-batch and summed metrics (the loop divides by the step's global count of completions)."""
    logps = completion_token_logps(model, batch, args.temperature)
    return remax_loss(logps, batch["advantages"], batch["completion_mask"])


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


def check_compiled_choices(args: Args) -> None:
    """Some choices select which code the script contains; they are fixed when it is compiled."""
    compiled = {"reward": 'math'}
    for name, value in compiled.items():
        if getattr(args, name) != value:
            raise SystemExit(f"error: this script was compiled with {name}={value!r}; recompile with `ptcompile remax --set {name}={getattr(args, name)}` instead of --{name}")
    if args.num_iterations != 1 or args.steps_per_generation != 1:
        raise SystemExit("error: ReMax is on-policy REINFORCE (no importance ratio): use --num_iterations 1 --steps_per_generation 1")


def round_prompts(step: int, wave: int, num_items: int, per_round: int, steps_per_epoch: int, args: Args) -> list[int]:
    """Item indices of the prompts of rollout round `step` (wave 0), or of an extra wave of prompts.

    Wave 0 walks a seeded permutation per epoch, so it depends only on (seed, step). Extra waves (dynamic
    sampling refills) draw from a permutation named by (seed, step, wave). Nothing depends on the process
    count, so a resumed or differently parallelised run sees the same prompts.
    """
    if wave == 0:
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        return order[offset * per_round : (offset + 1) * per_round]
    generator = torch.Generator().manual_seed(stream_seed(args.seed, step, wave) % (2**63))
    return torch.randperm(num_items, generator=generator)[:per_round].tolist()


def generate_and_score(step: int, wave: int, prompt_indices: list[int], items: list[dict], model, reference, tokenizer, reward_fn, args: Args, accelerator: Accelerator, vllm) -> list[dict]:
    """Sample the completions of `prompt_indices` (this process generates a contiguous share), score them,
    and return every process's samples in global order: [prompt 0 sample 0..G-1, prompt 1 sample 0..G-1, ...]."""
    num_generations = 1
    share = len(prompt_indices) // accelerator.num_processes
    first = accelerator.process_index * share
    mine = prompt_indices[first : first + share]
    samples = []
    for start in range(0, len(mine), args.per_device_train_batch_size):
        chunk = mine[start : start + args.per_device_train_batch_size]
        rows = [items[i] for i in chunk for _ in range(num_generations)]
        first_row = (first + start) * num_generations
        seeds = [stream_seed(args.seed, step, wave, first_row + r) for r in range(len(rows))]
        rollout = sample_completions(
            model, tokenizer, [row["prompt_ids"] for row in rows], seeds=seeds, temperature=args.temperature,
            top_p=args.top_p, max_new_tokens=args.max_completion_length, accelerator=accelerator, vllm=vllm,
        )
        rewards = reward_fn([row["prompt"] for row in rows], rollout.texts, [row["answer"] for row in rows])
        # ReMax's baseline: the reward of the greedy completion of the same prompt, by the same policy.
        greedy = sample_completions(
            model, tokenizer, [items[i]["prompt_ids"] for i in chunk], seeds=[0] * len(chunk), temperature=args.temperature,
            top_p=1.0, max_new_tokens=args.max_completion_length, greedy=True, accelerator=accelerator, vllm=vllm,
        )
        greedy_rewards = reward_fn([items[i]["prompt"] for i in chunk], greedy.texts, [items[i]["answer"] for i in chunk])
        needs_old = args.num_iterations > 1 or args.steps_per_generation > 1
        old = score_tokens(model, rollout.prompt_ids, rollout.completion_ids, temperature=args.temperature, pad_id=tokenizer.pad_token_id, accelerator=accelerator, batch_size=len(rows)) if needs_old else [None] * len(rows)
        ref = [None] * len(rows)
        for r in range(len(rows)):
            samples.append({
                "item": chunk[r // num_generations], "prompt_ids": rollout.prompt_ids[r], "completion_ids": rollout.completion_ids[r],
                "truncated": rollout.truncated[r], "reward": float(rewards[r]), "old_logps": old[r], "ref_logps": ref[r],
                "greedy_reward": float(greedy_rewards[r // num_generations]),
            })
    return gather_object(samples)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_compiled_choices(args)
    check_output_dir(args)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=args.report_to or None,
        # Several processes without CUDA (e.g. `accelerate launch --multi_gpu` on a CPU box) only form a gloo
        # process group when accelerate is told to use the CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    accelerator.wait_for_everyone()  # every process has checked the output directory before anyone writes to it
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    say = accelerator.print

    tokenizer = load_tokenizer(args)
    items, skipped = build_items(args, tokenizer)
    report_data(say, args, len(items), skipped, "training items (prompts)")
    # One rollout round = steps_per_generation optimizer steps' worth of prompts (each step: batch x accumulation x processes).
    per_update = items_per_step(args, accelerator.num_processes)
    per_round = per_update * args.steps_per_generation
    steps_per_epoch = len(items) // per_round
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(items)} prompts are fewer than one rollout round uses ({per_round})")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    updates_per_step = args.num_iterations * args.steps_per_generation
    model = load_model(args, accelerator)
    reference = None  # ReMax has no KL term: no reference model
    reward_fn = build_reward(args, accelerator)
    optimizer = make_optimizer(model, args, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The schedule counts optimizer updates; it is not passed to prepare() (accelerate would step it per process).
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * total_steps * updates_per_step),
        num_training_steps=total_steps * updates_per_step,
    )
    vllm = VLLMGenerator(args, accelerator) if args.use_vllm else None
    start_step, last_checkpoint = start_or_resume(args, accelerator, model, optimizer, scheduler, say)
    if args.report_to:
        accelerator.init_trackers(output_dir.name, config=dataclasses.asdict(args))
    say(
        f"{total_steps} rollout steps of {per_round} prompts x 1 completions, "
        f"each followed by {updates_per_step} optimizer update(s) of {per_update} prompts "
        f"({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes)"
    )

    model.train()
    progress = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc="rl")
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        if vllm is not None:
            vllm.load_weights(model, accelerator)
        # 1. Rollouts: every process ends up holding the whole round's samples, in the same global order.
        samples = generate_and_score(step, 0, round_prompts(step, 0, len(items), per_round, steps_per_epoch, args), items, model, reference, tokenizer, reward_fn, args, accelerator, vllm)
        logs = rollout_metrics(samples, 1)
        # 2. Advantages over the whole round (identical on every process).
        for sample, advantage in zip(samples, remax_advantages([s["reward"] for s in samples], [s["greedy_reward"] for s in samples])):
            sample["advantage"] = advantage
        # 3. Updates: num_iterations passes over the round, each in steps_per_generation optimizer steps.
        update_logs: dict[str, float] = {}
        share = per_update // accelerator.num_processes
        for _iteration in range(args.num_iterations):
            for update in range(args.steps_per_generation):
                mine = samples_of_update(samples, update, per_update, share, accelerator.process_index, 1)
                micro_batches = [
                    collate(mine[i : i + args.per_device_train_batch_size * 1], tokenizer, args, accelerator.device)
                    for i in range(0, len(mine), args.per_device_train_batch_size * 1)
                ]
                # The loss of an update is a sum over all its micro-batches on all processes divided by the global
                # number of completions: accumulation and data parallelism give the gradient of one big batch.
                local_count = sum(batch["num_items"] for batch in micro_batches)
                global_count = accelerator.reduce(torch.tensor(float(local_count), device=accelerator.device), reduction="sum").item()
                sums: dict[str, float] = {}
                for index, batch in enumerate(micro_batches):
                    is_last = index == len(micro_batches) - 1
                    with nullcontext() if is_last else accelerator.no_sync(model):
                        loss_sum, metrics = compute_loss(model, batch, args, {})
                        # DDP averages gradients over processes; multiplying by their number turns that into a sum.
                        accelerator.backward(loss_sum * accelerator.num_processes / max(global_count, 1.0))
                    for name, value in {"loss": loss_sum.detach(), **metrics}.items():
                        sums[name] = sums.get(name, 0.0) + value
                names = sorted(sums)
                totals = accelerator.reduce(torch.stack([torch.as_tensor(sums[n], device=accelerator.device, dtype=torch.float32) for n in names]), reduction="sum")
                this_update = {name: value / max(global_count, 1.0) for name, value in zip(names, totals.tolist())}
                stop_if_not_finite("loss", this_update["loss"], step, last_checkpoint)
                if args.max_grad_norm > 0:
                    this_update["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                    stop_if_not_finite("gradient norm", this_update["grad_norm"], step, last_checkpoint)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for name, value in this_update.items():
                    update_logs[name] = update_logs.get(name, 0.0) + value / updates_per_step
        logs.update(update_logs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # honest step times: wait for the GPU to finish
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        logs.update(step=step + 1, epoch=(step + 1) / steps_per_epoch, learning_rate=scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - started)
        progress.update(1)
        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "reward", "completion_length")})
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


def samples_of_update(samples: list[dict], update: int, per_update: int, share: int, rank: int, num_generations: int) -> list[dict]:
    """This process's samples for optimizer step `update` of the round: update u trains on prompts
    [u * per_update, (u + 1) * per_update) of the round, and process r on its contiguous `share` of them,
    so the union over processes is the same whatever their number."""
    first = (update * per_update + rank * share) * num_generations
    return samples[first : first + share * num_generations]


def rollout_metrics(samples: list[dict], num_generations: int) -> dict:
    """What the policy did this round, before any filtering: mean/std reward, lengths, truncation."""
    rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float64)
    lengths = torch.tensor([len(s["completion_ids"]) for s in samples], dtype=torch.float64)
    groups = rewards.view(-1, num_generations)
    logs = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(samples) > 1 else 0.0,
        "completion_length": lengths.mean().item(),
        "truncated_fraction": sum(s["truncated"] for s in samples) / len(samples),
    }
    if num_generations > 1:
        logs["zero_std_group_fraction"] = (groups.max(1).values == groups.min(1).values).double().mean().item()
    logs["greedy_reward"] = sum(s["greedy_reward"] for s in samples) / len(samples)
    return logs


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
