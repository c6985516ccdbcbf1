"""Best-of-N sampling (best-of-n): a single-file test-time scaling script (no training) compiled by ptcompile.

Papers:
    - WebGPT: Browser-assisted question-answering with human feedback (Nakano et al., 2021), arXiv 2112.09332 [nakano2021webgpt]
    - Learning to summarize from human feedback (Stiennon et al., 2020), arXiv 2009.01325 [stiennon2020learning]

Objective (WebGPT: rejection sampling (best-of-n) against the reward model, n ∈ {4, 16, 64} of nakano2021webgpt):
    y_1..y_N ~ π(·|x) independently; answer = argmax_i r(x, y_i) (r = reward model or verifier
    score)

Spends inference compute instead of training: sample N complete answers from the unchanged model and
return the one a reward model (or verifier) scores highest. It needs no gradient step and no
hyperparameters beyond N and the sampling settings, and in WebGPT it beat RL fine-tuning against the
same reward model.

Model:   Qwen2.5-0.5B-Instruct (Qwen/Qwen2.5-0.5B-Instruct), weights unchanged
Data:    GSM8K (openai/gsm8k, split train), format "prompt"
Every hyperparameter in `Args` names its source (paper and section, or common practice and why).

Compiled with:
    ptcompile best-of-n --model qwen2.5-0.5b-instruct

Run:
    python train_best_of_n.py --help
    python train_best_of_n.py                          # one process: a GPU if there is one, else the CPU
    accelerate launch train_best_of_n.py               # the prompts are shared out over all GPUs

Requires: torch, transformers>=5, accelerate, datasets.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
import re
from fractions import Fraction
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from accelerate.utils import gather_object


@dataclass
class Args:
    """Every setting of the run. Each field is a command-line flag: --name value (booleans: true/false)."""

    # --- Model and data ------------------------------------------------------------------------------
    model_name_or_path: str = 'Qwen/Qwen2.5-0.5B-Instruct'
    """Hub id or local directory of the model (preset 'qwen2.5-0.5b-instruct')."""
    model_dtype: str = 'bfloat16'
    """dtype the weights are loaded in: float32, bfloat16 or float16 (nothing is trained, so the
    preset's dtype)."""
    attn_implementation: str = 'sdpa'
    """Attention kernel: sdpa (PyTorch), eager, or flash_attention_2 if installed."""
    dataset: str = 'openai/gsm8k'
    """A local .jsonl / .json / .parquet file or a Hub dataset id (preset 'gsm8k')."""
    dataset_config: str = 'main'
    """Hub dataset configuration name ('' for none)."""
    dataset_split: str = 'train'
    """Hub dataset split (the preset's training split by default; pass the held-out split, e.g.
    test, to measure accuracy on unseen problems)."""
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
    sweep: str = ''
    """Comma-separated budgets to report accuracy for (e.g. 1,4,16); '' picks the default sweep.
    The table goes to output_dir/accuracy.json."""
    output_dir: str = 'runs/best-of-n'
    """Where samples.jsonl (every sample, its answer and score) and accuracy.json (accuracy per
    budget) go."""

    # --- Method hyperparameters: Best-of-N sampling --------------------------------------------------
    n: int = 16
    """Number of complete answers sampled per prompt; cost grows linearly with it. Typical range:
    [1, 4096]. Source: nakano2021webgpt, Rejection sampling: n = 4, 16 or 64 answers, keeping
    the one ranked highest by the reward model."""
    temperature: float = 1.0
    """Sampling temperature; the candidates must differ for selection to help. Typical range: [0.1,
    2.0]. Source: common practice: Sampling from the model's own distribution; lower values
    trade diversity for per-sample quality."""
    max_new_tokens: int = 512
    """Maximum tokens per candidate. Typical range: [8, 32768]. Source: common practice: Math
    solutions on GSM8K fit in 512 tokens."""

    # --- Training defaults of the 'inference' family -------------------------------------------------
    max_prompt_length: int = 512
    """Prompts longer than this are truncated from the left. Typical range: [8, 1048576]. Source:
    common practice: Math prompts fit in 512 tokens."""

    # --- Optimisation defaults shared by every method ------------------------------------------------
    seed: int = 42
    """Seed for initialisation of new parameters, data order and sampling; the same seed reproduces
    a run. Typical range: [0, 4294967295]. Source: common practice: Any fixed value; 42 is the
    transformers/TRL default, kept so runs compare."""

    # --- Run -----------------------------------------------------------------------------------------
    mixed_precision: str = 'auto'
    """auto (bf16 on a GPU that supports it, else fp32), no, bf16 or fp16."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir (otherwise the run refuses); the previous run's
    checkpoints and metrics.jsonl there are removed."""
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping at the first one."""


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
    """One (prompt, answer) row -> the prompt's messages and token ids (with the generation prompt) and the
    normalised reference answer."""
    prompt = as_messages(column(row, args.prompt_column, where), where, args.prompt_column, role="user")
    answer = reference_answer(str(column(row, args.answer_column, where)), args.answer_format)
    if not answer:
        raise DataError(f"{where}: empty reference answer in field '{args.answer_column}' (answer_format {args.answer_format})")
    prompt_ids = encoder.ids(prompt, add_generation_prompt=True)
    # Long prompts lose their beginning (the question usually comes last).
    return {"where": where, "prompt": prompt, "prompt_ids": prompt_ids[-args.max_prompt_length :], "answer": answer}


def build_items(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    encoder, items, skipped = ChatEncoder(tokenizer), [], []
    for where, row in iter_rows(args, skipped):
        if args.max_prompts and len(items) == args.max_prompts:
            break
        try:
            items.append({"index": len(items), **encode_row(row, where, encoder, args)})
        except DataError as error:
            keep_or_raise(args, error, skipped)
    if not items:
        raise SystemExit(f"error: no usable prompts in {args.dataset}")
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
# Best-of-N sampling
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


def best_of_n_select(scores: list[float]) -> int:
    """Best-of-N selection (Nakano et al. 2021, rejection sampling against the reward model):

        ŷ = y_i*,  i* = argmax_i r(x, y_i)

    Returns the index of the highest score; on ties the earliest candidate wins, so runs are reproducible.
    """
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def solve(model, tokenizer, item: dict, args: Args, budgets: list[int], context: dict) -> dict:
    """Sample M = max(budgets) answers once and score each. At budget N the M answers form ⌊M/N⌋ disjoint
    groups of N; each group keeps its best-scored answer, and the budget's accuracy is the fraction of groups
    whose kept answer is right (the expected accuracy of best-of-N, with less variance than one group)."""
    samples = sample_candidates(model, tokenizer, [item["prompt_ids"]], max(budgets), args, context["accelerator"], (item["index"],), args.max_new_tokens)
    for candidate in samples:
        candidate["answer"] = extract_answer(candidate["text"])
        candidate["correct"] = answers_match(candidate["answer"], item["answer"])
        candidate["num_tokens"] = len(candidate.pop("ids"))
    scores = score_candidates(context["reward_model"], item, samples)
    for candidate, score in zip(samples, scores):
        candidate["score"] = score
    runs = []
    for budget in budgets:
        starts = range(0, len(samples) - budget + 1, budget)
        chosen = [start + best_of_n_select(scores[start : start + budget]) for start in starts]
        runs.append(
            {
                "budget": budget,
                "chosen": chosen,
                "correct": sum(samples[i]["correct"] for i in chosen) / len(chosen),
                "coverage": sum(any(c["correct"] for c in samples[start : start + budget]) for start in starts) / len(chosen),
            }
        )
    return {"samples": samples, "runs": runs}


def score_candidates(reward_model, item: dict, samples: list[dict]) -> list[float]:
    """r(x, y) of every candidate: the reward model's score, or without one the answer verifier (1.0 when
    the final answer equals the reference, else 0.0). With the verifier, best-of-N accuracy equals coverage
    (pass@N): an oracle upper bound, since it reads the reference answer a deployed system does not have."""
    if reward_model is None:
        return [1.0 if candidate["correct"] else 0.0 for candidate in samples]
    return reward_model([item["prompt"]] * len(samples), [candidate["text"] for candidate in samples])


def compute_budgets(args: Args) -> list[int]:
    """The budgets to report, ascending: --sweep (comma-separated) or, by default, the powers of two below
    the method's own budget; that budget is always included. Budgets are nested (the first k samples), so
    the sweep costs no extra generation."""
    default = args.n
    if args.sweep.strip():
        try:
            budgets = {int(part) for part in args.sweep.split(",") if part.strip()}
        except ValueError:
            raise SystemExit(f"error: --sweep expects comma-separated integers, got {args.sweep!r}") from None
    else:
        budgets = {2**k for k in range(default.bit_length())}
    budgets.add(default)
    if min(budgets) < 1:
        raise SystemExit(f"error: every budget must be at least 1, got {sorted(budgets)}")
    return sorted(budgets)


def accuracy_table(results: list[dict], budgets: list[int]) -> list[dict]:
    """One row per budget: accuracy of the selected answers and coverage (some candidate is right)."""
    table = []
    for budget in budgets:
        runs = [next(run for run in result["runs"] if run["budget"] == budget) for result in results]
        table.append(
            {
                "budget": budget,
                "accuracy": sum(run["correct"] for run in runs) / len(runs),
                "coverage": sum(run["coverage"] for run in runs) / len(runs),
                "prompts": len(runs),
            }
        )
    return table


# ==================================================================================================
# Main: sample, select, report
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
    if args.overwrite_output_dir:
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
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    accelerator.wait_for_everyone()
    output_dir = Path(args.output_dir)
    say = accelerator.print
    budgets = compute_budgets(args)

    tokenizer = load_tokenizer(args)
    items, skipped = build_items(args, tokenizer)
    report_data(say, args, len(items), skipped, "prompts")
    model = load_model(args, accelerator, trainable=False).to(accelerator.device)
    reward_model = RewardModelScorer(args.reward_model_path, accelerator, args.reward_batch_size) if args.reward_model_path else None
    say(f"scoring with {'the reward model ' + args.reward_model_path if reward_model else 'the answer verifier (oracle: reads the reference answer)'}")
    context = {"accelerator": accelerator, "reward_model": reward_model}

    say(f"budgets (N): {budgets}")

    # Each process takes every num_processes-th prompt; every prompt has its own seed, so the samples do not
    # depend on the number of processes.
    results = []
    mine = range(accelerator.process_index, len(items), accelerator.num_processes)
    for index in tqdm(mine, desc="prompts", disable=not accelerator.is_local_main_process):
        item = items[index]
        result = solve(model, tokenizer, item, args, budgets, context)
        results.append({"index": index, "where": item["where"], "prompt": item["prompt"], "reference": item["answer"], **result})
    results = sorted(gather_object(results), key=lambda result: result["index"])

    table = accuracy_table(results, budgets)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / "samples.jsonl").open("w", encoding="utf-8") as handle:
            for result in results:
                handle.write(json.dumps(result, ensure_ascii=False) + "\n")
        summary = {"method": 'best-of-n', "budget": 'N', "table": table, "args": dataclasses.asdict(args)}
        (output_dir / "accuracy.json").write_text(json.dumps(summary, indent=2))
    for row in table:
        say(f"N = {row['budget']:>4}: accuracy {row['accuracy']:.4f}  coverage {row['coverage']:.4f}  ({row['prompts']} prompts)")
    say(f"done: {output_dir / 'accuracy.json'} and {output_dir / 'samples.jsonl'}")
    # Every rank waits here, so none tears down its process group while another is still writing or in a
    # collective; then the group is closed before the processes exit.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        # Bad training data is the user's to fix: say where, without a traceback.
        raise SystemExit(f"error: {error}\n(a malformed row stops the run; --skip_bad_rows true skips and counts such rows instead)") from None
