"""Beam search with a process reward model (prm-beam-search): a single-file test-time scaling script (no training) compiled by ptcompile.

Papers:
    - Scaling LLM Test-Time Compute Optimally can be More Effective than Scaling Model Parameters (Snell et al., 2024), arXiv 2408.03314 [snell2024scaling]
    - Let's Verify Step by Step (Lightman et al., 2023), arXiv 2305.20050 [lightman2023lets]

Objective (Sec. 5.2 (beam search against a PRM) with Sec. 5.1 (last-step scoring, best-of-N weighted selection) of snell2024scaling):
    round 0: sample N first steps; each round: score every prefix with the PRM's value at its last
    step v(x,s), keep the top N/M, extend each kept prefix with M sampled next steps (N prefixes
    again); stop at a finished solution or after max_rounds; answer = argmax_a Σ_j 1(a_j = a)·v(x,
    y_j) (best-of-N weighted over the N final candidates)

Searches over reasoning steps instead of whole answers. N partial solutions are kept; at each round
every one is scored by a process reward model (its prediction at the last step), the best N/M are
kept, and each survivor is extended by M sampled next steps, until solutions finish or a round limit
is reached. The N finished candidates are then combined by best-of-N weighted voting. It beats
best-of-N at small budgets and on harder questions, and can over-optimise the PRM on easy ones.

Model:   Qwen2.5-0.5B-Instruct (Qwen/Qwen2.5-0.5B-Instruct), weights unchanged
Data:    GSM8K (openai/gsm8k, split train), format "prompt"
Every hyperparameter in `Args` names its source (paper and section, or common practice and why).

Compiled with:
    ptcompile prm-beam-search --model qwen2.5-0.5b-instruct

Run:
    python train_prm_beam_search.py --help
    python train_prm_beam_search.py                          # one process: a GPU if there is one, else the CPU
    accelerate launch train_prm_beam_search.py               # the prompts are shared out over all GPUs

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
    prm_path: str = ''
    """The final/ directory of a ptcompile process reward model run
    (AutoModelForTokenClassification + ptcompile_scorer.json), which scores partial solutions
    step by step. Required."""
    reward_batch_size: int = 16
    """Sequences per forward pass of the reward model or PRM."""
    max_prompts: int = 0
    """Use only the first N usable prompts of the dataset (0: all)."""
    sweep: str = ''
    """Comma-separated budgets to report accuracy for (e.g. 1,4,16); '' picks the default sweep.
    The table goes to output_dir/accuracy.json."""
    output_dir: str = 'runs/prm-beam-search'
    """Where samples.jsonl (every sample, its answer and score) and accuracy.json (accuracy per
    budget) go."""

    # --- Method hyperparameters: Beam search with a process reward model -----------------------------
    num_beams: int = 16
    """Number of beams N kept alive, equal to the generation budget (and to N in the best-of-N
    comparison). Typical range: [1, 4096]. Source: snell2024scaling, Sec. 5.3: generation
    budgets 4, 16, 64 and 256; for beam search the budget is the number of beams."""
    beam_width: int = 4
    """Proposals M sampled from each kept prefix; the top N/M prefixes survive each round, so
    num_beams must be a multiple of it. Typical range: [1, 4096]. Source: snell2024scaling, Sec.
    5.3: beam search with a fixed beam width of 4 (also √N)."""
    max_rounds: int = 40
    """Maximum rounds of beam expansion (reasoning steps) before the search stops. Typical range:
    [1, 1000]. Source: snell2024scaling, Sec. 5.2: search runs until solutions end or 40 rounds
    of beam expansion."""
    step_aggregation: str = 'last'
    """How a prefix's step scores become one score; the paper uses the PRM's prediction at the last
    step. One of: last, min, prod. Source: snell2024scaling, Sec. 5.1: the PRM's prediction at
    the last step is the full-answer score."""
    answer_aggregation: str = 'weighted'
    """Final selection; weighted sums PRM scores over candidates with the same answer (best-of-N
    weighted), best takes the single top candidate. One of: weighted, best. Source:
    snell2024scaling, Sec. 5.1: best-of-N weighted selection over the final candidates."""
    step_delimiter: str = '\n\n'
    """Text that ends a reasoning step; generation of a step stops at it and the PRM scores the
    prefix there. Source: common practice: Blank-line step separation as in PRM800K-style
    step-by-step solutions; must match what the PRM was trained on."""
    max_new_tokens: int = 512
    """Maximum tokens of a whole solution (all its steps); a beam that reaches it ends there.
    Typical range: [8, 32768]. Source: common practice: Math solutions on GSM8K fit in 512
    tokens; the same bound as best-of-N keeps the two comparable."""
    temperature: float = 0.8
    """Sampling temperature of each proposed step. Typical range: [0.1, 2.0]. Source: common
    practice: Diverse yet coherent steps; the sampling temperature was not among the details
    verified from the paper."""

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


class ProcessRewardModel:
    """A process reward model: the probability that each step of a (partial) solution is correct.

    Follows its scorer card ("input": "chat_prompt_then_steps", "read": "separator_ends"): the prompt in the
    PRM's chat template with the generation prompt, then every step tokenized on its own and followed by
    the card's separator tokens; a step's score is softmax(logits)[correct_class] at the last separator
    token after it. The PRM's own separator is used whatever delimiter the policy writes between steps.
    """

    def __init__(self, path: str, device: torch.device, batch_size: int):
        card = read_scorer_card(path, "process_reward")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForTokenClassification.from_pretrained(path, num_labels=card["num_labels"]).to(device).eval().requires_grad_(False)
        self.separator_ids, self.correct_class = list(card["separator_ids"]), card["correct_class"]
        self.pad_id = card.get("pad_token_id", self.tokenizer.pad_token_id)
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def step_scores(self, prompt: list[dict], solutions: list[list[str]]) -> list[list[float]]:
        """For each solution (a list of step texts), the score of each of its steps."""
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        rows, ends = [], []
        for steps in solutions:
            ids, positions = list(prompt_ids), []
            for step in steps:
                ids += self.tokenizer(step, add_special_tokens=False)["input_ids"] + self.separator_ids
                positions.append(len(ids) - 1)
            rows.append(ids)
            ends.append(positions)
        scores = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = right_pad(rows[start : start + self.batch_size], self.pad_id, self.device)
            probabilities = self.model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., self.correct_class]
            scores += [probabilities[row, positions].tolist() for row, positions in enumerate(ends[start : start + self.batch_size])]
        return scores


# ==================================================================================================
# Beam search with a process reward model
# ==================================================================================================


def split_steps(text: str, delimiter: str) -> list[str]:
    """The reasoning steps of a (partial) solution: its text cut at the step delimiter, empty pieces dropped."""
    return [step.strip() for step in text.split(delimiter) if step.strip()]


def aggregate_step_scores(step_scores: list[float], how: str) -> float:
    """One score for a (partial) solution from its per-step PRM scores. `last` is the paper's choice (Snell
    et al. 2024, Sec. 5.1: the PRM's prediction at the last step); `min` and `prod` are the alternatives of
    Lightman et al. (2023). A solution without any step scores 0."""
    if not step_scores:
        return 0.0
    if how == "last":
        return step_scores[-1]
    if how == "min":
        return min(step_scores)
    if how == "prod":
        return math.prod(step_scores)
    raise SystemExit(f"error: --step_aggregation must be last, min or prod, not {how!r}")


def top_indices(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores, best first; ties keep the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def weighted_vote(answers: list[str | None], scores: list[float]) -> str | None:
    """Best-of-N weighted selection (Snell et al. 2024, Sec. 5.1):

        â = argmax_a Σ_j 1(a_j = a) · v(x, y_j)

    Candidates without a parsable answer do not vote; on ties the answer seen first wins."""
    totals: dict[str, float] = {}
    for answer, score in zip(answers, scores):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + score
    if not totals:
        return None
    best = max(totals.values())
    return next(answer for answer in totals if totals[answer] == best)


def beam_search(model, tokenizer, prm, item: dict, args: Args, num_beams: int) -> list[dict]:
    """Beam search against a PRM (Snell et al. 2024, Sec. 5.2) with N = num_beams and M = beam_width:

      round 0: sample N first steps;
      every round: score each new prefix with the PRM (aggregated per --step_aggregation); prefixes that
          ended (end of reply, token budget spent, or an empty step) are set aside as candidates; of the
          others the N/M best are kept, and each gets M sampled next steps (N prefixes again);
      stop when N candidates are set aside, nothing is left to extend, or after max_rounds rounds (the last
          round samples each kept prefix to its end instead of one step).

    Returns the candidates, at most N, best first, each with its text, step scores and score.
    """
    keep = num_beams // args.beam_width
    beams = [{"ids": [], "text": "", "steps": []}]
    finished: list[dict] = []
    for round_index in range(args.max_rounds):
        stop = None if round_index == args.max_rounds - 1 else args.step_delimiter
        children = []
        for beam in beams:
            proposals = num_beams if round_index == 0 else args.beam_width
            room = args.max_new_tokens - len(beam["ids"])
            for step in sample(model, tokenizer, item["prompt_ids"] + beam["ids"], proposals, args, room, stop=stop):
                ids = beam["ids"] + step["ids"]
                text = tokenizer.decode(ids, skip_special_tokens=True)
                steps = split_steps(text, args.step_delimiter)
                end = step["end"]  # "stop": a step ended at the delimiter and the solution goes on
                if end == "stop" and len(ids) >= args.max_new_tokens:
                    end = "length"
                if end == "stop" and len(steps) == len(beam["steps"]):
                    end = "empty step"
                children.append({"ids": ids, "text": text, "steps": steps, "end": end})
        step_scores = prm.step_scores(item["prompt"], [child["steps"] for child in children])
        for child, scores in zip(children, step_scores):
            child["step_scores"], child["score"] = scores, aggregate_step_scores(scores, args.step_aggregation)
        finished += [child for child in children if child["end"] != "stop"]
        going_on = [child for child in children if child["end"] == "stop"]
        if len(finished) >= num_beams or not going_on:
            break
        beams = [going_on[i] for i in top_indices([child["score"] for child in going_on], keep)]
    finished = [finished[i] for i in top_indices([child["score"] for child in finished], num_beams)]
    return [{key: child[key] for key in ("text", "steps", "step_scores", "score", "end")} for child in finished]


def solve(model, tokenizer, item: dict, args: Args, budgets: list[int], context: dict) -> dict:
    """One beam search per budget N (its own seed), then best-of-N weighted selection over its candidates."""
    runs = []
    for budget in budgets:
        set_seed(prompt_seed(args.seed, item["index"], budget))
        candidates = beam_search(model, tokenizer, context["prm"], item, args, budget)
        for candidate in candidates:
            candidate["answer"] = extract_answer(candidate["text"])
            candidate["correct"] = candidate["answer"] == item["answer"]
        answers, scores = [c["answer"] for c in candidates], [c["score"] for c in candidates]
        # weighted: best-of-N weighted (the paper's choice); best: the single highest-scored candidate.
        answer = weighted_vote(answers, scores) if args.answer_aggregation == "weighted" else answers[top_indices(scores, 1)[0]]
        runs.append({"budget": budget, "answer": answer, "correct": answer == item["answer"], "coverage": any(c["correct"] for c in candidates), "candidates": candidates})
    return {"runs": runs}


def compute_budgets(args: Args) -> list[int]:
    """The budgets to report, ascending: --sweep (comma-separated) plus the method's own budget. Each budget
    is a separate search."""
    default = args.num_beams
    if args.sweep.strip():
        try:
            budgets = {int(part) for part in args.sweep.split(",") if part.strip()}
        except ValueError:
            raise SystemExit(f"error: --sweep expects comma-separated integers, got {args.sweep!r}") from None
    else:
        budgets = set()
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
    if args.answer_aggregation not in ("weighted", "best"):
        raise SystemExit(f"error: --answer_aggregation must be weighted or best, not {args.answer_aggregation!r}")
    if not args.prm_path:
        raise SystemExit("error: --prm_path is required: the final/ directory of a ptcompile process reward model run")
    for budget in budgets:
        if budget % args.beam_width or budget < args.beam_width:
            raise SystemExit(f"error: every budget must be a multiple of beam_width={args.beam_width} (got {budget}); otherwise fewer beams survive each round")
    prm = ProcessRewardModel(args.prm_path, accelerator.device, args.reward_batch_size)
    context = {"prm": prm}

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
        summary = {"method": 'prm-beam-search', "budget": 'N', "table": table, "args": dataclasses.asdict(args)}
        (output_dir / "accuracy.json").write_text(json.dumps(summary, indent=2))
    for row in table:
        say(f"N = {row['budget']:>4}: accuracy {row['accuracy']:.4f}  coverage {row['coverage']:.4f}  ({row['prompts']} prompts)")
    say(f"done: {output_dir / 'accuracy.json'} and {output_dir / 'samples.jsonl'}")


if __name__ == "__main__":
    main()
