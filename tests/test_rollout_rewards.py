"""The shared rollout and reward partials (templates/common/rollout.py.j2, rewards.py.j2), as emitted into a
policy-gradient script: sampling is exact and batch-independent, completions end at EOS, token log-probs match
what generation saw, and the verifiable rewards extract, compare and sandbox as documented."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

from conftest import compile_script, load_script_module


@pytest.fixture(scope="module")
def script(kb, tmp_path_factory):
    path = tmp_path_factory.mktemp("pg") / "train_grpo_tiny.py"
    path.write_text(compile_script(kb, "grpo"))
    return load_script_module(path)


@pytest.fixture(scope="module")
def code_script(kb, tmp_path_factory):
    path = tmp_path_factory.mktemp("pg") / "train_grpo_code.py"
    path.write_text(compile_script(kb, "grpo", overrides=["reward=code"]))
    return load_script_module(path)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    return model, tokenizer


class CPUAccelerator:
    """The two things sample_completions / score_tokens ask of accelerate, on one CPU process."""

    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def autocast():
        from contextlib import nullcontext

        return nullcontext()


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def test_stream_seed_and_counter_uniform_are_pure_functions(script):
    assert script.stream_seed(42, 3, 0, 7) == script.stream_seed(42, 3, 0, 7)
    assert len({script.stream_seed(42, s, w, r) for s in range(5) for w in range(3) for r in range(50)}) == 750
    seeds = torch.tensor([script.stream_seed(1, i) % 2**63 for i in range(64)])
    u = script.counter_uniform(seeds, 5, 4096)
    assert u.shape == (64, 4096) and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    # a row's numbers do not depend on which other rows are in the batch
    assert torch.equal(script.counter_uniform(seeds[10:11], 5, 4096), u[10:11])
    # and change with the position
    assert not torch.equal(script.counter_uniform(seeds[:1], 6, 4096), u[:1])


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_seeded_sampler_draws_from_the_tempered_nucleus(script, temperature, top_p):
    """40,000 draws (one per seed) from a fixed 6-token distribution: frequencies match softmax(logits / T),
    renormalised on the top-p nucleus, within 4.5 standard errors; tokens outside the nucleus never appear."""
    logits = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    seeds = torch.tensor([script.stream_seed(123, i) % 2**63 for i in range(n)])
    sampler = script.SeededSampler(seeds, prompt_width=0, temperature=temperature, top_p=top_p)
    scores = sampler(torch.zeros(n, 3, dtype=torch.long), logits.repeat(n, 1))
    counts = torch.bincount(scores.argmax(-1), minlength=6).double()
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1:
        before = torch.cumsum(probs, 0) - probs
        probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    for k in range(6):
        if probs[k] == 0:
            assert counts[k] == 0
        else:
            se = math.sqrt(n * probs[k] * (1 - probs[k]))
            assert abs(counts[k] - n * probs[k]) < 4.5 * se, (k, counts.tolist(), (n * probs).tolist())


def prompts_of(tokenizer, questions):
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]) for q in questions]


def test_sampling_does_not_depend_on_the_batch_and_completions_stop_at_eos(script, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = prompts_of(tokenizer, ["What is 1 plus 1? Answer with a digit.", "Hi", "Describe the red fox in a few words please."])
    seeds = [script.stream_seed(0, 0, 0, i) for i in range(3)]
    kwargs = dict(temperature=1.0, top_p=1.0, max_new_tokens=12, accelerator=CPUAccelerator())
    together = script.sample_completions(model, tokenizer, prompts, seeds=seeds, **kwargs)
    for i in range(3):
        alone = script.sample_completions(model, tokenizer, prompts[i : i + 1], seeds=seeds[i : i + 1], **kwargs)
        assert alone.completion_ids[0] == together.completion_ids[i]
    eos = script.end_of_sequence_ids(tokenizer, model)
    for row, truncated in zip(together.completion_ids, together.truncated):
        assert 1 <= len(row) <= 12
        assert not any(t in eos for t in row[:-1])  # nothing after the first EOS is kept
        assert truncated == (row[-1] not in eos)
    other = script.sample_completions(model, tokenizer, prompts, seeds=[s + 1 for s in seeds], **kwargs)
    assert other.completion_ids != together.completion_ids


def test_cut_at_end_and_truncation_flag(script):
    rows, truncated = script.cut_at_end([[5, 6, 2, 9, 9], [5, 6, 7], [2]], {2})
    assert rows == [[5, 6, 2], [5, 6, 7], [2]]
    assert truncated == [False, True, False]


def test_token_logps_match_the_distribution_generation_sampled_from(script, model_and_tokenizer):
    """Left-padded generation and the right-padded scoring pass see the same model: the log-softmax of the
    logits generate() used (output_logits) equals completion_token_logps at every completion token."""
    from transformers import GenerationConfig

    model, tokenizer = model_and_tokenizer
    prompts = prompts_of(tokenizer, ["What is 3 plus 1? Answer with a digit.", "Hi", "Repeat after me: red cat"])
    ids, mask = script.left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    config = GenerationConfig(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=tokenizer.pad_token_id, eos_token_id=[], return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    completions = out.sequences[:, ids.shape[1] :].tolist()
    generated = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, out.sequences[:, ids.shape[1] :, None])[..., 0]
    batch = script.sequence_batch(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        scored = script.completion_token_logps(model, batch, temperature=1.0)
    assert torch.allclose(scored, generated, atol=1e-4), (scored, generated)
    lists = script.score_tokens(model, prompts, completions, temperature=1.0, pad_id=tokenizer.pad_token_id, accelerator=CPUAccelerator(), batch_size=2)
    assert torch.allclose(torch.tensor(lists), scored, atol=1e-5)  # chunking does not change the scores


def test_ragged_completions_are_masked(script, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = prompts_of(tokenizer, ["Hi", "What is 3 plus 1? Answer with a digit."])
    completions = [[300, 301, 302, 303], [304]]
    batch = script.sequence_batch(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    assert batch["completion_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    with torch.no_grad():
        logps = script.completion_token_logps(model, batch, temperature=1.0)
        alone = script.completion_token_logps(model, script.sequence_batch(prompts[1:], completions[1:], tokenizer.pad_token_id, torch.device("cpu")), 1.0)
    assert logps[1, 1:].abs().sum() == 0
    assert torch.allclose(logps[1, :1], alone[0, :1], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, fmt, expected",
    [
        ("7", "7", "plain", 1.0),
        ("The answer is 7.", "7", "plain", 1.0),
        ("I think 6, no wait, 7", "7", "plain", 1.0),
        ("7 apples, then 8", "7", "plain", 0.0),  # the last number counts
        ("so \\boxed{\\frac{1}{2}}", "0.5", "plain", 1.0),
        ("#### 1,234", "Natalia sold 48 clips... #### 1234", "gsm8k", 1.0),
        ("x = 3.50", "\\boxed{7/2}", "boxed", 1.0),
        ("\\boxed{x^2 + 1}", "The answer is \\boxed{x^2+1}", "boxed", 1.0),  # non-numeric: normalised strings
        ("$18", "18", "plain", 1.0),
        ("no number here", "3", "plain", 0.0),
        ("-4", "4", "plain", 0.0),
        ("\\boxed{5}", "5.0001", "plain", 0.0),
    ],
)
def test_math_reward(script, completion, answer, fmt, expected):
    assert script.math_reward(completion, answer, fmt) == expected


def test_last_boxed_balances_braces(script):
    assert script.last_boxed("a \\boxed{1} b \\boxed{\\frac{3}{4}} c") == "\\frac{3}{4}"
    assert script.last_boxed("\\boxed{unclosed") is None
    assert script.last_boxed("none") is None


def test_only_the_compiled_reward_source_is_emitted(kb):
    math_source = compile_script(kb, "grpo")
    assert "run_unit_tests" not in math_source and "RewardModelScorer" not in math_source and "LLMJudge" not in math_source
    assert "import subprocess" not in math_source
    model_source = compile_script(kb, "grpo", overrides=["reward=model"])
    assert "class RewardModelScorer" in model_source and "reward_model_path: str" in model_source and "run_unit_tests" not in model_source
    judge_source = compile_script(kb, "grpo", overrides=["reward=judge"])
    assert "class LLMJudge" in judge_source and "judge_model_path: str" in judge_source


def test_code_reward_runs_unit_tests_in_a_limited_subprocess(code_script):
    run = code_script.run_unit_tests
    program = "def add(a, b):\n    return a + b\n"
    assert run(program, "assert add(2, 3) == 5", timeout=10, memory_mb=512) == 1.0
    assert run(program, "assert add(2, 3) == 6", timeout=10, memory_mb=512) == 0.0
    assert run("def add(a, b) return", "assert add(1, 1) == 2", timeout=10, memory_mb=512) == 0.0  # syntax error
    assert run("import time\ntime.sleep(30)", "", timeout=1, memory_mb=512) == 0.0  # killed at the timeout
    assert run("x = bytearray(900 * 2**20)", "", timeout=10, memory_mb=256) == 0.0  # over the memory limit
    assert run("import os\nassert os.environ.get('HOME') is None", "", timeout=10, memory_mb=512) == 1.0  # empty environment
    assert code_script.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"


def unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="unprivileged network namespaces (unshare -rn) are not available here")
def test_code_reward_has_no_network_where_unshare_works(code_script):
    probe = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))"
    assert code_script.run_unit_tests(probe, "", timeout=10, memory_mb=512) == 0.0
    assert code_script.network_isolation() == ["unshare", "-rn"]


def test_reward_model_scorer_reads_the_last_token_logit_of_the_chat_rendered_conversation(kb, tiny, tmp_path):
    """A scorer directory as the reward-model scripts write it: AutoModelForSequenceClassification + tokenizer +
    ptcompile_scorer.json. Batched (right-padded) scores equal unpadded single-conversation logits."""
    import json

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    config = AutoConfig.from_pretrained(tiny / "model", num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    scorer_dir = tmp_path / "scorer"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(scorer_dir)
    tokenizer.save_pretrained(scorer_dir)
    (scorer_dir / "ptcompile_scorer.json").write_text(json.dumps({"kind": "reward"}))
    path = tmp_path / "train_grpo_model.py"
    path.write_text(compile_script(kb, "grpo", overrides=["reward=model"]))
    module = load_script_module(path, name="emitted_reward_model")
    scorer = module.RewardModelScorer(str(scorer_dir), CPUAccelerator(), batch_size=3)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 1 plus 1?", "Hi", "Describe the red fox.", "Hi")]
    completions = ["2", "Hello there, how are you today?", "It is red.", "Hello"]
    scores = scorer(prompts, completions)
    model = AutoModelForSequenceClassification.from_pretrained(scorer_dir).eval()
    for prompt, completion, score in zip(prompts, completions, scores):
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            assert math.isclose(score, model(**ids).logits[0, 0].item(), rel_tol=1e-4, abs_tol=1e-5)
    assert len(set(round(s, 6) for s in scores)) > 1
    (scorer_dir / "ptcompile_scorer.json").write_text(json.dumps({"kind": "process_reward"}))
    with pytest.raises(SystemExit):
        module.RewardModelScorer(str(scorer_dir), CPUAccelerator(), batch_size=3)


def test_llm_judge_gives_a_deterministic_probability(kb, tiny, tmp_path):
    path = tmp_path / "train_grpo_judge.py"
    path.write_text(compile_script(kb, "grpo", overrides=["reward=judge"]))
    module = load_script_module(path, name="emitted_judge")
    judge = module.LLMJudge(str(tiny / "model"), CPUAccelerator())
    prompts = [[{"role": "user", "content": "What is 1 plus 1?"}]] * 2
    scores = judge(prompts, ["2", "3"], ["2", "2"])
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert judge(prompts, ["2", "3"], ["2", "2"]) == scores
