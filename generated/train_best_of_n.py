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
from collections import Counter, defaultdict

from accelerate.utils import gather_object
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification


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
    """Allow writing into a non-empty output_dir (otherwise the run refuses)."""
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


def iter_rows(args: Args):
    """Yield (where, row) for every row of a local .jsonl/.json/.parquet file or a Hugging Face Hub dataset.

    `where` names the row for error messages: "data.jsonl:17" (1-based line) or "org/name[train] row 16".
    """
    path = Path(args.dataset)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
                    yield f"{path}:{line_number}", row
            return
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(f"{path} item {index}: expected a JSON object")
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

    def ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_completion(self, prompt: list[dict], completion: list[dict], where: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.ids(prompt, add_generation_prompt=True)
        full_ids = self.ids(prompt + completion)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the conversation; cannot locate the completion's tokens")
        return prompt_ids, full_ids[len(prompt_ids) :]

    def conversation(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and labels that keep only assistant tokens (others are -100)."""
        ids = self.ids(messages)
        labels = [-100] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.ids(messages[:turn], add_generation_prompt=True)) if turn else 0
            end_ids = self.ids(messages[: turn + 1])
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
    answer = reference_answer(column(row, args.answer_column, where), args.answer_format, where)
    prompt_ids = encoder.ids(prompt, add_generation_prompt=True)
    # Long prompts lose their beginning (the question usually comes last).
    return {"where": where, "prompt": prompt, "prompt_ids": prompt_ids[-args.max_prompt_length :], "answer": answer}


def build_items(args: Args, tokenizer) -> tuple[list[dict], list[str]]:
    encoder, items, skipped = ChatEncoder(tokenizer), [], []
    for where, row in iter_rows(args):
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
# Answers: the reference answer of a row, the final answer of a solution, and their comparison
# ==================================================================================================


def reference_answer(value, answer_format: str, where: str) -> str:
    """The reference answer of a row: `plain` (the value itself), `gsm8k` (after '####') or `boxed` (last \\boxed{})."""
    text = str(value).strip()
    if answer_format == "gsm8k":
        if "####" not in text:
            raise DataError(f"{where}: answer has no '#### <answer>' line (answer_format gsm8k)")
        text = text.rsplit("####", 1)[1]
    elif answer_format == "boxed":
        boxed = last_boxed(text)
        if boxed is None:
            raise DataError(f"{where}: answer has no " + "\\boxed{...} (answer_format boxed)")
        text = boxed
    elif answer_format != "plain":
        raise SystemExit(f"error: --answer_format must be plain, gsm8k or boxed, not {answer_format!r}")
    answer = normalise_answer(text)
    if not answer:
        raise DataError(f"{where}: empty reference answer")
    return answer


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} in `text` (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            if depth == 0:
                return text[begin:position]
            depth -= 1
    return None


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise_answer(text: str) -> str:
    """Canonical form for comparison: numbers lose thousands separators, '$', trailing zeros and a final '.'."""
    text = text.strip().strip("$").strip().rstrip(".").strip()
    match = NUMBER.fullmatch(text)
    if match:
        number = text.replace(",", "")
        if "." in number:
            number = number.rstrip("0").rstrip(".")
        return "0" if number in ("-0", "") else number
    return " ".join(text.split())


def extract_answer(solution: str) -> str | None:
    """A solution's final answer: the last \\boxed{...}, else what follows the last '####', else the last
    number in the text; None when there is none (such a solution gets no vote and is never correct)."""
    boxed = last_boxed(solution)
    if boxed is not None:
        return normalise_answer(boxed) or None
    if "####" in solution:
        return normalise_answer(solution.rsplit("####", 1)[1].strip().split("\n")[0]) or None
    numbers = NUMBER.findall(solution)
    return normalise_answer(numbers[-1]) if numbers else None


# ==================================================================================================
# Sampling
# ==================================================================================================


def prompt_seed(seed: int, *keys: int) -> int:
    """A seed for one prompt (and budget): samples depend on (seed, prompt index), not on the batch or
    on how many processes share the prompts, so 1 and N processes produce the same samples."""
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % 2**32
    return value


def end_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation EOS (may be a list)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id}


@torch.no_grad()
def sample(model, tokenizer, prefix_ids: list[int], n: int, args: Args, max_new_tokens: int, stop: str | None = None) -> list[dict]:
    """n sampled continuations of one token sequence, as {"ids", "text", "end"}.

    end is "eos" (the reply is complete), "stop" (the text reached `stop`, e.g. the end of a reasoning step)
    or "length" (max_new_tokens ran out). The sampling distribution is exactly temperature + top-k: the
    model's own generation_config may carry other defaults (top_p, repetition_penalty), which are switched off.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([prefix_ids] * n, device=device)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        stop_strings=[stop] if stop else None,
        tokenizer=tokenizer if stop else None,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    ends = end_token_ids(model, tokenizer)
    results = []
    for row in output[:, len(prefix_ids) :].tolist():
        # Finished rows are padded to the batch's length: cut after the first end token (it belongs to the
        # reply), or after the token that completes the stop text.
        end, cut = "length", len(row)
        first_end = next((position for position, token in enumerate(row) if token in ends), None)
        if first_end is not None:
            end, cut = "eos", first_end + 1
        if stop and stop in tokenizer.decode(row[:cut]):
            low, high = 1, cut  # the shortest prefix that contains the stop text (containment is monotone)
            while low < high:
                middle = (low + high) // 2
                low, high = (low, middle) if stop in tokenizer.decode(row[:middle]) else (middle + 1, high)
            end, cut = "stop", low
        ids = row[:cut]
        results.append({"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True), "end": end})
    return results


# ==================================================================================================
# Scorers: reward models and process reward models written by ptcompile (final/ + ptcompile_scorer.json)
# ==================================================================================================


def read_scorer_card(path: str, kind: str) -> dict:
    """The scorer card of a model directory; it must describe a scorer of this kind."""
    card_file = Path(path) / "ptcompile_scorer.json"
    if not card_file.is_file():
        raise SystemExit(f"error: {path} has no ptcompile_scorer.json: pass the final/ directory of a ptcompile {kind.replace('_', ' ')} model run")
    card = json.loads(card_file.read_text())
    if card.get("kind") != kind:
        raise SystemExit(f"error: {card_file} describes a '{card.get('kind')}' scorer, not a '{kind}' one")
    return card


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return ids, mask


class RewardModel:
    """An outcome reward model: one scalar per (prompt, response).

    Follows its scorer card ("input": "chat_template", "read": "last_non_pad_token"): the conversation
    prompt + response in the reward model's chat template; the score is logits[:, 0], which the
    sequence-classification head reads at each row's last non-pad token.
    """

    def __init__(self, path: str, device: torch.device, batch_size: int):
        card = read_scorer_card(path, "reward")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=card.get("num_labels", 1)).to(device).eval().requires_grad_(False)
        self.pad_id = card.get("pad_token_id", self.tokenizer.pad_token_id)
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.model.config.pad_token_id = self.pad_id
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def score(self, prompt: list[dict], responses: list[str]) -> list[float]:
        rows = []
        for response in responses:
            text = self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        scores = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = right_pad(rows[start : start + self.batch_size], self.pad_id, self.device)
            scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


# ==================================================================================================
# Best-of-N sampling
# ==================================================================================================


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
    samples = sample(model, tokenizer, item["prompt_ids"], max(budgets), args, args.max_new_tokens)
    for candidate in samples:
        candidate["answer"] = extract_answer(candidate["text"])
        candidate["correct"] = candidate["answer"] == item["answer"]
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
    return reward_model.score(item["prompt"], [candidate["text"] for candidate in samples])


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


def check_output_dir(args: Args) -> None:
    """Never mix two runs in one directory by accident."""
    output_dir = Path(args.output_dir)
    if args.overwrite_output_dir:
        return
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
    say(f"{len(items)} prompts from {args.dataset}" + (f" ({len(skipped)} bad rows skipped; first: {skipped[0]})" if skipped else ""))
    model = load_model(args, accelerator, trainable=False).to(accelerator.device)
    reward_model = RewardModel(args.reward_model_path, accelerator.device, args.reward_batch_size) if args.reward_model_path else None
    say(f"scoring with {'the reward model ' + args.reward_model_path if reward_model else 'the answer verifier (oracle: reads the reference answer)'}")
    context = {"reward_model": reward_model}

    say(f"budgets (N): {budgets}")

    # Each process takes every num_processes-th prompt; every prompt has its own seed, so the samples do not
    # depend on the number of processes.
    results = []
    mine = range(accelerator.process_index, len(items), accelerator.num_processes)
    for index in tqdm(mine, desc="prompts", disable=not accelerator.is_local_main_process):
        item = items[index]
        set_seed(prompt_seed(args.seed, index))
        with accelerator.autocast():
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


if __name__ == "__main__":
    main()
