"""Bad data: every malformed row gets an error naming the file and line, or a counted skip with
--skip_bad_rows true; never a traceback from deep inside the loop.

Generic over families: for each script family in the knowledge base one method's generated script is tested
with the bad rows of its data format (BAD_ROWS; formats without an entry are skipped and say so). Each kind
is checked in-process on the script's own build_items (exact location and message), and once per family
end to end as a subprocess (clean exit code and message; skipping trains)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from pathlib import Path

import pytest

from conftest import FAST, TINY_DATA, generated_script, load_script_module, run_script, tiny_args

LONG = "cat dog " * 300  # ~600+ tokens with the tiny tokenizer
NOT_UTF8 = b'{"text": "caf\xe9"}'  # Latin-1, not UTF-8

# kind -> (the line as bytes or a JSON-able row, a fragment the error must contain, extra flags)
COMMON = {
    "invalid JSON": (b'{"oops": [1, 2', "not valid JSON", []),
    "not an object": (b'["a", "list"]', "expected a JSON object, got list", []),
    "not UTF-8": (NOT_UTF8, "not valid UTF-8", []),
}
BAD_ROWS: dict[str, dict[str, tuple]] = {
    "chat": {
        **COMMON,
        "missing field": ({"conversation": [{"role": "user", "content": "hi"}]}, "missing field 'messages'", []),
        "wrong type": ({"messages": 42}, "field 'messages' must be a non-empty string or list of messages, got int", []),
        "wrong message type": ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}, "field 'messages' item 0", []),
        "empty completion": ({"messages": [{"role": "user", "content": "Repeat: cat"}, {"role": "assistant", "content": "  "}]}, "no non-empty assistant message", []),
        "prompt longer than max_length": ({"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "cat"}]}, "no trained tokens left within max_length=96", ["--max_length", "96"]),
    },
    "preference": {
        **COMMON,
        "missing field": ({"prompt": "Describe the cat.", "chosen": "The cat is kind."}, "missing field 'rejected'", []),
        "wrong type": ({"prompt": "Describe the cat.", "chosen": 5, "rejected": "The cat is rude."}, "field 'chosen' must be a non-empty string or list of messages, got int", []),
        "empty completion": ({"prompt": "Describe the cat.", "chosen": "The cat is kind.", "rejected": " "}, "field 'rejected' is empty", []),
        "prompt longer than max_length": ({"prompt": LONG, "chosen": "The cat is kind.", "rejected": "The cat is rude."}, "leaves no room under max_length=96", ["--max_length", "96", "--max_prompt_length", "96"]),
    },
    "instruction": {
        **COMMON,
        "missing field": ({"instruction": "Repeat.", "input": "cat"}, "missing field 'output'", []),
        "wrong type": ({"instruction": ["Repeat."], "input": "cat", "output": "cat"}, "field 'instruction' must be a string", []),
        "empty completion": ({"instruction": "Repeat.", "input": "cat", "output": ""}, "field 'output' is empty", []),
    },
    "text": {**COMMON, "missing field": ({"txt": "The cat."}, "missing field 'text'", []), "wrong type": ({"text": 3}, "field 'text' must be a string", [])},
    # Formats of families on other branches: only what any implementation must reject.
    "unpaired": {**COMMON, "missing field": ({"prompt": "Describe the cat.", "completion": "The cat is kind."}, "missing field 'label'", [])},
    "prompt": {
        **COMMON,
        "missing field": ({"question": "What is 1 plus 1?", "answer": "2"}, "missing field 'prompt'", []),
        "wrong type": ({"prompt": 5, "answer": "2"}, "field 'prompt' must be a non-empty string or list of messages, got int", []),
        "missing answer": ({"prompt": "What is 1 plus 1?"}, "'answer'", []),
    },
    "step-labels": {**COMMON, "missing field": ({"prompt": "What is 1 plus 1?", "steps": ["1 plus 1 is 2."]}, "missing field 'labels'", [])},
}
PREFERRED = {"preference": "dpo", "sft": "sft", "online-preference": "online-dpo"}  # the family's reference method, when it has one

ACCEPTED: dict[tuple[str, str], str] = {
    ("constitutional-ai", "missing answer"): "it writes its own responses: the answer column is never read",
    ("ppo-rlhf", "missing answer"): "a learned reward model scores the samples: no reference answer is read",
    ("online-dpo", "missing answer"): "a learned reward model judges the pairs: no reference answer is read",
    ("gkd", "prompt longer than max_length"): "prompts are cut to max_prompt_length from the left (on-policy samples need only the prompt)",
}
"""(method, kind) pairs where the 'bad' row is valid for that method, and why: it must be read, not reported."""

FRAGMENTS: dict[tuple[str, str], str] = {
    ("gkd", "empty completion"): "needs at least one message before a non-empty assistant reply",
}
"""(method, kind) pairs whose error is worded differently from the format's (same row, same file:line)."""
BAD_LINE = 7  # where the bad row goes (1-based line of the file)


def representatives(kb) -> list[str]:
    families: dict[str, list[str]] = {}
    for method_id, entry in sorted(kb.methods.items()):
        families.setdefault(entry.record.script.family, []).append(method_id)
    return [PREFERRED.get(f) if PREFERRED.get(f) in ids else ids[0] for f, ids in sorted(families.items())]


def _kb():
    from ptcompile.knowledge_base import KnowledgeBase

    return KnowledgeBase.load()


_KB = _kb()
METHODS = representatives(_KB)
CASES = [(m, kind) for m in METHODS for kind in BAD_ROWS.get(_KB.methods[m].record.data_format, {"(no bad rows defined for this format)": None})]


@functools.lru_cache(maxsize=None)
def script_module(method: str):
    return load_script_module(generated_script(method), f"emitted_bad_data_{method.replace('-', '_')}")


def as_line(row) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode()


def write_data(path: Path, good: Path, bad: list[bytes], first_line: int = BAD_LINE, good_rows: int = 40) -> list[int]:
    """good_rows rows of the bundled data with the bad lines inserted from `first_line` on, every third line."""
    lines = good.read_bytes().splitlines()[:good_rows]
    at = []
    for i, line in enumerate(bad):
        at.append(first_line + 3 * i)
        lines.insert(at[-1] - 1, line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return at


RUN_FLAGS = {"max_completion_length": "8", "soft_punish_cache": "2", "num_generations": "4", "num_mini_batches": "1", "teacher_dtype": "float32"}
"""Flags that keep an end-to-end run short (or give it what it needs), passed to the scripts that have them."""


def accepted(method: str, flags: list[str]) -> list[str]:
    """`flags` (pairs of --name value) without the options this method's script does not have."""
    names = {field.name for field in dataclasses.fields(script_module(method).Args)}
    pairs = zip(flags[::2], flags[1::2])
    return [part for name, value in pairs if name.removeprefix("--") in names for part in (name, value)]


def run_flags(method: str, tiny: Path) -> list[str]:
    wanted = [part for name, value in RUN_FLAGS.items() for part in (f"--{name}", value)]
    wanted += ["--teacher_model", str(tiny / "model")]  # distillation: the tiny model teaches itself
    return accepted(method, wanted)


def fmt(kb, method) -> str:
    return kb.methods[method].record.data_format


def row_reader(script):
    """The function that reads and checks the rows: read_prompts where the script generates its training
    items from prompts (rejection sampling, Constitutional AI), else build_items."""
    reader = getattr(script, "read_prompts", script.build_items)
    return (lambda args, tokenizer: reader(args, tokenizer)) if len(inspect.signature(reader).parameters) == 2 else (lambda args, tokenizer: reader(args))


def needs_reward_model(method: str) -> bool:
    """Scripts whose reward model path has a default (a required scorer, not an optional one)."""
    fields = {field.name: field.default for field in dataclasses.fields(script_module(method).Args)}
    return bool(fields.get("reward_model_path"))


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_each_bad_row_is_reported_with_file_and_line_or_skipped(kb, tiny, tmp_path, method, kind):
    rows = BAD_ROWS.get(fmt(kb, method))
    if rows is None:
        pytest.skip(f"no bad rows defined for the '{fmt(kb, method)}' format of {method}: add them to BAD_ROWS")
    row, fragment, extra = rows[kind]
    data = tmp_path / "data.jsonl"
    write_data(data, tiny / "data" / TINY_DATA[fmt(kb, method)], [as_line(row)])
    script = script_module(method)
    args = script.parse_args(tiny_args(kb, method, tiny) + ["--dataset", str(data)] + accepted(method, extra))
    tokenizer = script.load_tokenizer(args)
    read = row_reader(script)
    if (method, kind) in ACCEPTED:
        items, skipped = read(args, tokenizer)  # valid for this method: read like any other row
        assert skipped == [] and len(items) == 41, (skipped, len(items))
        return
    with pytest.raises(script.DataError) as info:
        read(args, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{data}:{BAD_LINE}: "), message
    assert FRAGMENTS.get((method, kind), fragment) in message, message

    args.skip_bad_rows = True
    items, skipped = read(args, tokenizer)
    assert len(skipped) == 1 and skipped[0] == message
    assert len(items) == 40, len(items)


@pytest.mark.parametrize("method", METHODS)
def test_bad_rows_end_to_end_stop_cleanly_or_are_counted_and_skipped(kb, tiny, tmp_path, method, request):
    rows = BAD_ROWS.get(fmt(kb, method))
    if rows is None:
        pytest.skip(f"no bad rows defined for the '{fmt(kb, method)}' format of {method}")
    data = tmp_path / "data.jsonl"
    at = write_data(data, tiny / "data" / TINY_DATA[fmt(kb, method)], [as_line(row) for row, _, _ in rows.values()])
    bad = [line for line, kind in zip(at, rows) if (method, kind) not in ACCEPTED]
    extra = accepted(method, [flag for _, _, flags in rows.values() for flag in flags])
    base = tiny_args(kb, method, tiny) + accepted(method, FAST) + ["--dataset", str(data), *accepted(method, ["--max_steps", "2"]), *extra, *run_flags(method, tiny)]
    if needs_reward_model(method):
        base += ["--reward_model_path", str(request.getfixturevalue("tiny_reward_model"))]

    failed = run_script(generated_script(method), base + ["--output_dir", str(tmp_path / "stop")], cwd=tmp_path, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1, output[-3000:]
    assert f"error: {data}:{bad[0]}: " in output and "--skip_bad_rows true" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "stop" / "metrics.jsonl").exists()

    skipping = run_script(generated_script(method), base + ["--output_dir", str(tmp_path / "skip"), "--skip_bad_rows", "true"], cwd=tmp_path)
    output = skipping.stdout + skipping.stderr
    assert f"skipped {len(bad)} bad rows" in output, output[-3000:]
    read = 40 + len(at) - len(bad)
    assert re.search(rf"\b{read} (training items|prompts)\b", output), output[-3000:]  # generating scripts count prompts
    for line in bad[:3]:
        assert f"skipped {data}:{line}: " in output, output[-3000:]
    assert (tmp_path / "skip" / "final").is_dir() or (tmp_path / "skip" / "accuracy.json").is_file()  # trained, or scored (test-time scaling)


def test_too_few_rows_for_one_step_is_a_clear_error(kb, tiny, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\n".join((tiny / "data" / "preference.jsonl").read_bytes().splitlines()[:3]) + b"\n")
    result = run_script(generated_script("dpo"), tiny_args(kb, "dpo", tiny) + FAST + ["--dataset", str(data), "--output_dir", str(tmp_path / "o")], cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "error: 3 training items are fewer than one optimizer step uses" in output and "Traceback" not in output, output[-3000:]


def test_a_json_file_with_a_syntax_error_names_line_and_column(kb, tiny, tmp_path):
    data = tmp_path / "data.json"
    data.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a" "chosen": "b"}\n]\n')
    script = script_module("dpo")
    args = script.parse_args(tiny_args(kb, "dpo", tiny) + ["--dataset", str(data)])
    with pytest.raises(script.DataError, match=rf"^{data}:3:18: not valid JSON"):
        script.build_items(args, script.load_tokenizer(args))
