"""Iterative / self-rewarding DPO (iterative-dpo): a single-file training script compiled by ptcompile.

Papers:
    - Self-Rewarding Language Models (Yuan et al., 2024), arXiv 2401.10020 [yuan2024selfrewarding]
    - Iterative Preference Learning from Human Feedback: Bridging Theory and Practice for RLHF under KL-Constraint (Xiong et al., 2023), arXiv 2312.11456 [xiong2023iterative]
    - Direct Preference Optimization: Your Language Model is Secretly a Reward Model (Rafailov et al., 2023), arXiv 2305.18290 [rafailov2023direct]

Objective (Self-Rewarding LMs Sec. 2.3 (AI feedback pairs) and Sec. 3.1.3 (training details), with the DPO loss of Rafailov et al. Eq. 7 of yuan2024selfrewarding):
    round t: for each prompt x sample y_1..y_N ~ M_t(·|x); score s_n = mean of J judgements of y_n
    by M_t itself (0-5 additive rubric); y_w = highest-scored, y_l = lowest-scored (skip x if tied);
    M_{t+1} = argmin_θ −E[ log σ( β·log(π_θ(y_w|x)/M_t(y_w|x)) − β·log(π_θ(y_l|x)/M_t(y_l|x)) ) ]
    (reference = M_t)

DPO run in rounds on data the model generates and judges itself. In each round the current model
samples several answers per prompt, scores each with an LLM-as-a-judge rubric (the same model acting
as judge, averaged over a few judgements), takes the best and worst as a preference pair, and trains
the next model with DPO using the current one as reference. Xiong et al. run the same loop with an
external reward model as the judge; either way each round's pairs are on-policy for the model being
improved.

Model:   Qwen2.5-0.5B-Instruct (Qwen/Qwen2.5-0.5B-Instruct), full fine-tuning
Data:    UltraFeedback prompts (trl-lib/ultrafeedback-prompt, split train), format "prompt"
Every hyperparameter in `Args` names its source (paper and section, or common practice and why).

Compiled with:
    ptcompile iterative-dpo --model qwen2.5-0.5b-instruct

Run:
    python train_iterative_dpo.py --help
    python train_iterative_dpo.py                          # one process: a GPU if there is one, else the CPU
    accelerate launch train_iterative_dpo.py               # data parallel over all GPUs (`accelerate config` for FSDP)
    python train_iterative_dpo.py --resume_from_checkpoint latest   # continue an interrupted run exactly

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
    judge_template: str = "Evaluate the response to the user's question with an additive 5-point score. Add 1 point if the response is relevant and offers some information on the question, even if incomplete. Add a 2nd point if it covers a substantial part of the question without fully answering it. Add a 3rd point if it usefully answers the basic elements of the question. Add a 4th point if it is written from an AI assistant's perspective, addresses the question directly and completely, and is well organised. Add a 5th point if it is tailored to the question with no extraneous content and shows expert knowledge.\n\nQuestion: {prompt}\n\nResponse: {response}\n\nJustify your total in at most 100 words, then end with the line 'Score: <total points>'."
    """The judge's instructions, with {prompt} and {response} filled in; sent as a user message
    (edit it to fit your task)."""
    output_dir: str = 'runs/iterative-dpo'
    """Where checkpoints, metrics.jsonl and the final model go."""

    # --- Method hyperparameters: Iterative / self-rewarding DPO --------------------------------------
    learning_rate: float = 1e-06
    """Peak learning rate of each round (the paper decays it to 1e-7). Typical range: [1e-09,
    0.001]. Source: yuan2024selfrewarding, Sec. 3.1.3: learning rate 1e-6 decaying to 1e-7,
    batch size 16."""
    top_p: float = 0.9
    """Nucleus sampling threshold of the candidates. Typical range: [0.0, 1.0]. Source:
    yuan2024selfrewarding, Sec. 3.1.3: candidates sampled with p = 0.9."""
    num_generations: int = 4
    """Candidate responses N sampled per prompt in each round. Typical range: [2, 64]. Source:
    yuan2024selfrewarding, Sec. 3.1.3: 'we sample N = 4 candidate responses with temperature T =
    0.7, p = 0.9'."""
    temperature: float = 0.7
    """Sampling temperature of the candidates. Typical range: [0.1, 2.0]. Source:
    yuan2024selfrewarding, Sec. 3.1.3: candidates sampled at temperature T = 0.7."""
    judge_samples: int = 3
    """Judgements sampled per candidate and averaged into its score. Typical range: [1, 16].
    Source: yuan2024selfrewarding, Sec. 3.1.3: the judge's evaluation is sampled three times and
    averaged."""
    beta: float = 0.1
    """DPO β of each round's update. Typical range: [0.01, 1.0]. Source: yuan2024selfrewarding,
    Sec. 3.1.3: DPO with β = 0.1."""
    num_rounds: int = 2
    """Generate-judge-train rounds after the seed model (M1 to M2 to M3 in the paper). Typical
    range: [1, 10]. Source: yuan2024selfrewarding, Sec. 2.4: M2 and M3 are trained by two
    successive DPO rounds from the SFT model M1."""

    # --- Training defaults of the 'online-preference' family -----------------------------------------
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 trains for num_train_epochs); in the round-based
    methods (self-rewarding, SPIN) the limit applies to each round. Typical range: [-1,
    100000000]. Source: common practice: Epoch-based by default, as in transformers' Trainer;
    rounds are separate training runs in the papers, so each gets the budget."""
    max_prompt_length: int = 512
    """Prompts longer than this are truncated from the left. Typical range: [8, 1048576]. Source:
    common practice: Half of a 1024-token budget."""
    max_new_tokens: int = 256
    """Maximum tokens per sampled completion (the data's own responses are cut to the same budget).
    Typical range: [8, 32768]. Source: common practice: Enough for most chat answers; TRL's
    online DPO default of 64 truncates many of them."""

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
    response_ids = []
    answer = ""  # this script's judge does not read a reference answer
    if len(prompt_ids) > args.max_prompt_length:
        prompt_ids = prompt_ids[-args.max_prompt_length :]  # keep the end of a long conversation
    return {"prompt": prompt, "prompt_ids": prompt_ids, "response_ids": response_ids, "answer": answer}


def build_items(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    encoder, items, skipped = ChatEncoder(tokenizer), [], []
    for where, row in iter_rows(args, skipped):
        try:
            items.append(encode_row(row, where, encoder, args))
        except DataError as error:
            keep_or_raise(args, error, skipped)
    return items, skipped


def collate_pairs(pairs: list[dict], pad_id: int, device: torch.device) -> dict:
    """Rows 0..n-1 are prompt + chosen completion, rows n..2n-1 prompt + rejected: one forward pass scores both."""
    batch = sequence_batch(
        [p["prompt_ids"] for p in pairs] * 2, [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs], pad_id, device
    )
    batch["weight"] = torch.tensor([p["weight"] for p in pairs], device=device)
    batch["ref_chosen_logps"] = torch.tensor([p["ref_chosen_logps"] for p in pairs], device=device)
    batch["ref_rejected_logps"] = torch.tensor([p["ref_rejected_logps"] for p in pairs], device=device)
    batch["num_pairs"] = len(pairs)
    batch["num_items"] = float(sum(p["weight"] for p in pairs))  # the loss is a mean over pairs that carry a preference
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
# Loss
# ==================================================================================================


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """log π(y|x) of every row's completion: its tokens' log-probabilities (temperature 1) summed."""
    return completion_token_logps(model, batch, temperature=1.0).sum(-1)


def disable_dropout(model) -> None:
    """Switch dropout off: the log-probabilities computed when sampling and when updating must come from the
    same function (TRL's online trainers do the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0

def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss (Rafailov et al. 2023, Eq. 7) of one self-rewarding round (Yuan et al. 2024, Sec. 2.3),
    per pair, with the round's starting model M_t as the reference:

        L = −log σ( β·log[π(y_w|x) / M_t(y_w|x)] − β·log[π(y_l|x) / M_t(y_l|x)] )

    y_w and y_l are the highest- and lowest-scored of the round's candidates. Inputs are log-probabilities
    summed over each completion's tokens, shape [pairs]. Also returns the implicit rewards, detached.
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


JUDGE_SCORE = re.compile(r"Score:\s*([0-5](?:\.\d+)?)")


def parse_judge_score(judgement: str) -> float | None:
    """The points a judgement awards: the number after its last 'Score:' (0 to 5), or None if it gives none.

    Yuan et al. (2024) end their LLM-as-a-judge prompt by asking for 'Score: <total points>'; judgements
    that do not follow the format are discarded rather than counted as zero.
    """
    found = JUDGE_SCORE.findall(judgement)
    return float(found[-1]) if found else None


def select_pair(scores: list[float | None]) -> tuple[int, int] | None:
    """(index of the best, index of the worst) candidate by mean judge score, or None when there is no
    preference: fewer than two scored candidates, or best and worst tie (Yuan et al. 2024, Sec. 2.3)."""
    scored = [(score, index) for index, score in enumerate(scores) if score is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda pair: (pair[0], -pair[1]))
    worst = min(scored, key=lambda pair: (pair[0], pair[1]))
    return None if best[0] == worst[0] else (best[1], worst[1])


def compute_loss(model, batch: dict, args: Args, context: dict) -> tuple[torch.Tensor, dict]:
    """Summed loss over the micro-batch's pairs, plus summed metrics (the loop divides by the pair count)."""
    pairs = batch["num_pairs"]
    logps = sequence_logps(model, batch)
    chosen_logps, rejected_logps = logps[:pairs], logps[pairs:]
    # The reference is this round's starting model; its log-probs were stored when the round's pairs were made.
    ref_chosen_logps, ref_rejected_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=args.beta)
    weight = batch["weight"]
    metrics = {
        "rewards/chosen": (chosen_rewards * weight).sum(),
        "rewards/rejected": (rejected_rewards * weight).sum(),
        "rewards/margin": ((chosen_rewards - rejected_rewards) * weight).sum(),
        "rewards/accuracy": ((chosen_rewards > rejected_rewards).float() * weight).sum(),
        "logps/chosen": (chosen_logps.detach() * weight).sum(),
        "logps/rejected": (rejected_logps.detach() * weight).sum(),
    }
    return (losses * weight).sum(), metrics


# ==================================================================================================
# Self-rewarding rounds: the model samples candidates, judges them itself, and keeps best vs worst
# ==================================================================================================

JUDGE_STREAM = 1  # random streams of judgements are named apart from those of candidates


def judge_prompt_ids(tokenizer, prompt: list[dict], response: str, args: Args) -> list[int]:
    """The LLM-as-a-judge request for one candidate, chat-templated, ready for generation."""
    question = prompt[0]["content"] if len(prompt) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    request = args.judge_template.format(prompt=question, response=response)
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def build_round_pairs(model, tokenizer, items: list[dict], round_index: int, args: Args, accelerator: Accelerator, vllm) -> tuple[list[dict], dict]:
    """Round t of Yuan et al. (2024), Sec. 2.3, with M_t the model as it is now: for every prompt sample
    num_generations candidates (temperature, top_p), let M_t judge each one judge_samples times, average the
    parsed scores, and keep (best, worst) as (y_w, y_l); a prompt whose best and worst tie gives no pair.

    Judgements are sampled with the same temperature and top_p as the candidates. Each process handles every
    num_processes-th prompt; random streams are named by (seed, round, prompt, candidate[, judgement]), so the
    pairs do not depend on the process count. Returns all pairs (in prompt order) and (sum, count) statistics.
    """
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    generations, judges = args.num_generations, args.judge_samples
    found, stats = [], {"judge/score": [0.0, 0.0], "judge/unparsed": [0.0, 0.0], "no_pair": [0.0, 0.0], "completion_length": [0.0, 0.0], "truncated": [0.0, 0.0]}
    for start in range(0, len(mine), args.per_device_train_batch_size):
        chunk = mine[start : start + args.per_device_train_batch_size]
        candidates = sample_completions(
            model, tokenizer, [items[i]["prompt_ids"] for i in chunk for _ in range(generations)],
            seeds=[stream_seed(args.seed, round_index, i, n) for i in chunk for n in range(generations)],
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, accelerator=accelerator, vllm=vllm,
        )
        requests = [judge_prompt_ids(tokenizer, items[i]["prompt"], candidates.texts[c * generations + n], args) for c, i in enumerate(chunk) for n in range(generations)]
        judgements = sample_completions(
            model, tokenizer, [request for request in requests for _ in range(judges)],
            seeds=[stream_seed(args.seed, round_index, i, n, j, JUDGE_STREAM) for i in chunk for n in range(generations) for j in range(judges)],
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, accelerator=accelerator, vllm=vllm,
        )
        parsed = [parse_judge_score(text) for text in judgements.texts]
        for c, i in enumerate(chunk):
            scores = []
            for n in range(generations):
                valid = [s for s in parsed[(c * generations + n) * judges : (c * generations + n + 1) * judges] if s is not None]
                scores.append(sum(valid) / len(valid) if valid else None)
                stats["judge/unparsed"][0] += judges - len(valid)
                stats["judge/unparsed"][1] += judges
                if valid:
                    stats["judge/score"][0] += scores[-1]
                    stats["judge/score"][1] += 1
            selected = select_pair(scores)
            stats["no_pair"][0] += selected is None
            stats["no_pair"][1] += 1
            if selected is not None:
                best, worst = (c * generations + k for k in selected)
                found.append((i, {"prompt_ids": items[i]["prompt_ids"], "chosen_ids": candidates.completion_ids[best], "rejected_ids": candidates.completion_ids[worst], "weight": 1.0}))
        stats["completion_length"][0] += sum(len(ids) for ids in candidates.completion_ids)
        stats["completion_length"][1] += len(candidates.completion_ids)
        stats["truncated"][0] += sum(map(float, candidates.truncated))
        stats["truncated"][1] += len(candidates.truncated)
    store_reference_logps(model, [pair for _, pair in found], tokenizer.pad_token_id, args, accelerator)
    return share_pairs(found, accelerator), global_means({k: v[0] for k, v in stats.items()}, {k: v[1] for k, v in stats.items()}, accelerator)


@torch.no_grad()
def store_reference_logps(model, pairs: list[dict], pad_id: int, args: Args, accelerator: Accelerator) -> None:
    """Score every pair under the model as it is now, M_t, which is this round's reference: the log-probs
    are stored in the pairs, so no second copy of the model is kept."""
    policy = accelerator.unwrap_model(model)
    prompts = [p["prompt_ids"] for p in pairs]
    for key, completions in (("ref_chosen_logps", [p["chosen_ids"] for p in pairs]), ("ref_rejected_logps", [p["rejected_ids"] for p in pairs])):
        scores = score_tokens(policy, prompts, completions, temperature=1.0, pad_id=pad_id, accelerator=accelerator, batch_size=args.per_device_train_batch_size)
        for pair, token_logps in zip(pairs, scores):
            pair[key] = float(sum(token_logps))


def share_pairs(found: list[tuple[int, dict]], accelerator: Accelerator) -> list[dict]:
    """Every process's (item index, pair) list, gathered and put in item order: the same list everywhere."""
    from accelerate.utils import gather_object

    return [pair for _, pair in sorted(gather_object(found), key=lambda entry: entry[0])]


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


def global_means(sums: dict[str, float], counts: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each statistic's sum over all processes divided by its own count over all processes."""
    names = sorted(sums)
    if not names:
        return {}
    totals = accelerator.reduce(torch.tensor([[sums[n], counts[n]] for n in names], device=accelerator.device, dtype=torch.float64), reduction="sum")
    return {name: (total / count if count else float("nan")) for name, (total, count) in zip(names, totals.tolist())}


def optimizer_step(model, optimizer, scheduler, micro_batches: list[dict], args: Args, accelerator: Accelerator, context: dict, step: int, last_checkpoint) -> dict:
    """One update from the step's micro-batches of pairs; returns the step's mean loss and metrics.

    The loss is summed over every micro-batch on every process and divided by the global number of pairs
    that carry a preference, so accumulation and data parallelism give exactly the gradient of one big batch.
    A step without any such pair (every pair tied) makes no update. `step` (0-based) and `last_checkpoint`
    only name where a NaN or inf stopped the run.
    """
    local_count = sum(batch["num_items"] for batch in micro_batches)
    global_count = accelerator.reduce(torch.tensor(float(local_count), device=accelerator.device), reduction="sum").item()
    if global_count == 0:
        scheduler.step()  # the schedule follows the step count whether or not this step had data
        return {"pairs": 0.0}
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
    totals = accelerator.reduce(torch.stack([torch.as_tensor(sums[n], device=accelerator.device, dtype=torch.float32) for n in names]), reduction="sum")
    logs = {name: value / global_count for name, value in zip(names, totals.tolist())}
    logs["pairs"] = global_count
    stop_if_not_finite("loss", logs["loss"], step, last_checkpoint)
    if args.max_grad_norm > 0:
        logs["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        stop_if_not_finite("gradient norm", logs["grad_norm"], step, last_checkpoint)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return logs


def write_metrics(logs: dict, step: int, progress, accelerator: Accelerator, args: Args, last: bool) -> None:
    progress.update(1)
    if step % args.logging_steps == 0 or last:
        progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "rewards/accuracy", "rewards/margin",)})
        if accelerator.is_main_process:
            with (Path(args.output_dir) / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(logs) + "\n")
        if args.report_to:
            accelerator.log(logs, step=step)


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
    model = load_model(args, accelerator)
    disable_dropout(model)
    # The judge is the model itself (LLM-as-a-judge with judge_template), so nothing else is loaded.
    vllm = VLLMGenerator(args, accelerator) if args.use_vllm else None
    optimizer = make_optimizer(model, args, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    context = {"accelerator": accelerator}
    # A resumed run replays the rounds: rounds that ended before the checkpoint are skipped, the round holding
    # it reuses the pairs saved when it started (output_dir/rounds/), and the checkpoint supplies the weights.
    checkpoint = last_checkpoint = find_checkpoint(args) if args.resume_from_checkpoint else None
    resume_step = int(torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)["step"]) if checkpoint else 0
    if accelerator.is_main_process:
        prepare_output_dir(args, resume_step)
        if resume_step == 0:
            (output_dir / "rounds.jsonl").unlink(missing_ok=True)  # a fresh run (--overwrite_output_dir) logs its own rounds
    if args.report_to:
        accelerator.init_trackers(output_dir.name, config=dataclasses.asdict(args))
    rounds_dir = output_dir / "rounds"
    step = 0
    progress = tqdm(initial=resume_step, disable=not accelerator.is_local_main_process, desc="train")
    for round_index in range(args.num_rounds):
        started = time.perf_counter()
        saved = rounds_dir / f"round-{round_index + 1}.json"
        if checkpoint is not None and step == resume_step:
            # The checkpoint was written at this round's start: its weights are M_t, which writes the pairs.
            load_checkpoint(checkpoint, accelerator, model, optimizer, get_scheduler("constant", optimizer))
            say(f"resumed from {checkpoint} at step {resume_step} (start of round {round_index + 1})")
            checkpoint = None
        if checkpoint is not None and saved.is_file():
            pairs = json.loads(saved.read_text())
        elif checkpoint is not None and round_index > 0:
            raise SystemExit(f"error: {saved} is missing; a run resumed after round 1 needs the pairs its rounds started with")
        else:
            if vllm is not None:
                vllm.load_weights(model, accelerator)
            pairs, stats = build_round_pairs(model, tokenizer, items, round_index, args, accelerator, vllm)
            round_logs = {"round": round_index + 1, "round_pairs": len(pairs), "round_seconds": time.perf_counter() - started, **stats}
            say(f"round {round_index + 1}: {len(pairs)} pairs " + json.dumps({k: round(v, 4) for k, v in stats.items()}))
            if accelerator.is_main_process:
                rounds_dir.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(pairs))  # with the reference log-probs: what a resumed run needs
                with (output_dir / "rounds.jsonl").open("a") as handle:
                    handle.write(json.dumps(round_logs) + "\n")
        needed = items_per_step(args, accelerator.num_processes)
        if len(pairs) < needed:
            # The judge found too few non-tied pairs to make one optimizer step: later rounds would start from
            # the same model and find the same, so the run ends here with the model it has.
            say(f"round {round_index + 1}: {len(pairs)} pairs are fewer than one optimizer step uses ({needed}); stopping after {round_index} trained round(s)")
            break
        per_step, steps_per_epoch, round_steps = plan_steps(len(pairs), args, accelerator.num_processes)
        if checkpoint is not None and step + round_steps <= resume_step:
            step += round_steps  # this round ended before the checkpoint
            continue
        # Each round is its own optimisation run from M_t (as in the papers): fresh optimiser state and schedule.
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate
            group.pop("initial_lr", None)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * round_steps), num_training_steps=round_steps)
        first = 0
        if checkpoint is not None:
            load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler)
            say(f"resumed from {checkpoint} at step {resume_step} (round {round_index + 1}, step {resume_step - step + 1})")
            first, step, checkpoint = resume_step - step, resume_step, None
        model.train()
        for round_step in range(first, round_steps):
            started = time.perf_counter()
            micro_batches = [
                collate_pairs([pairs[i] for i in indices], tokenizer.pad_token_id, accelerator.device)
                for indices in step_indices(round_step, len(pairs), per_step, steps_per_epoch, args, accelerator.process_index, accelerator.num_processes)
            ]
            logs = optimizer_step(model, optimizer, scheduler, micro_batches, args, accelerator, context, step, last_checkpoint)
            step += 1
            logs.update(step=step, round=round_index + 1, round_step=round_step + 1, learning_rate=scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - started)
            last = round_index + 1 == args.num_rounds and round_step + 1 == round_steps
            write_metrics(logs, step, progress, accelerator, args, last=last)
            if args.save_steps > 0 and step % args.save_steps == 0 and not last:
                last_checkpoint = save_checkpoint(step, accelerator, model, optimizer, scheduler, args)
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
