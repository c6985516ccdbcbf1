"""The non-hyperparameter fields of an emitted script's Args: where the model and data are, how to run.

Hyperparameters come from the taxonomy (with sources); these are run settings whose defaults the compiler
derives from the chosen presets. Everything here reaches the script through the template's |lit filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .recipe import SCORER_FAMILIES, Recipe

TINY_DIR = "ptcompile-tiny"
"""Where `ptcompile tiny` puts the embedded model and data by default (relative to the working directory)."""

FORMAT_FIELDS: dict[str, list[tuple[str, str]]] = {
    "chat": [("messages", "list of {role, content} messages; loss on the assistant turns")],
    "instruction": [("instruction", "the task"), ("input", "optional context appended to the task"), ("output", "the target response")],
    "text": [("text", "raw text; every token is trained on")],
    "preference": [("prompt", "a string or a list of messages"), ("chosen", "the preferred reply (string or assistant messages)"), ("rejected", "the dispreferred reply")],
    "unpaired": [("prompt", "a string or a list of messages"), ("completion", "the reply"), ("label", "true when the reply is desirable")],
    "prompt": [("prompt", "a string or a list of messages"), ("answer", "the reference answer, for verifiable rewards")],
    "step-labels": [("prompt", "the problem"), ("steps", "list of solution steps"), ("labels", "list of booleans, one per step: is the step correct")],
}


MERGEABLE_PEFT = ("lora", "dora", "rslora", "adalora", "ia3")
"""Techniques whose trained adapter folds into the base weights (peft merge_and_unload); prompt-learning
techniques (prefix, prompt, P-tuning v2) add virtual tokens, which no weight merge can express."""


@dataclass(frozen=True)
class RuntimeField:
    name: str
    type: str
    value: Any
    doc: str


ROLLOUT_FAMILIES = {"policy-gradient", "ppo", "online-preference", "gkd"}
"""Families whose scripts include templates/common/rollout.py.j2 (generation with the policy); they get the
rollout run fields below. A family that starts including the partial adds itself here."""

CHUNKED_LOSS_FAMILIES = {"sft", "preference", "unpaired"}
"""Families whose loss needs only the log-probability of each trained token: their scripts include
templates/common/chunked_logps.py.j2 and get the chunked_loss run fields."""

PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3")
"""transformers model types whose causal-LM head is exactly `logits = hidden @ W.T`, with nothing (bias,
soft-capping, scaling) after it: the ones chunked_loss may apply itself. Gemma 2 soft-caps its logits."""

REWARD_FAMILIES = {"policy-gradient", "ppo", "online-preference"}
"""Families whose scripts include templates/common/rewards.py.j2; they get the fields of their reward source
(the recipe's `reward` hyperparameter)."""


def rollout_fields(recipe: Recipe) -> list[RuntimeField]:
    return [
        RuntimeField("use_vllm", "bool", False, "Generate with vLLM (must be installed; one engine per GPU, weights copied in before each generation) instead of transformers' generate."),
        RuntimeField("vllm_gpu_memory_utilization", "float", 0.3, "Fraction of each GPU's memory vLLM may take for its weights and KV cache (--use_vllm true)."),
    ]


def reward_fields(recipe: Recipe) -> list[RuntimeField]:
    kind = recipe.hp("reward") if recipe.has("reward") else "math"
    if kind == "math_format":
        return [
            RuntimeField("format_pattern", "str", r"<think>.*?</think>\s*<answer>.*?</answer>", "Regular expression the whole completion must match for the format bonus (default: reasoning in <think> tags, then the answer in <answer> tags)."),
            RuntimeField("format_weight", "float", 1.0, "Reward added when the completion matches format_pattern (on top of 1.0 for a correct answer)."),
        ]
    if kind == "code":
        return [
            RuntimeField("code_timeout", "float", 10.0, "Seconds a completion's program and its unit tests (the answer column) may run."),
            RuntimeField("code_memory_mb", "int", 1024, "Address-space limit of the test process, in MiB."),
        ]
    if kind == "model":
        return [
            RuntimeField("reward_model_path", "str", "runs/reward-model/final", "Directory written by a ptcompile reward-model script (AutoModelForSequenceClassification + ptcompile_scorer.json)."),
            RuntimeField("reward_batch_size", "int", 16, "Completions scored per reward-model forward pass."),
        ]
    if kind == "judge":
        return [RuntimeField("judge_model_path", "str", "Qwen/Qwen2.5-7B-Instruct", "Hub id or directory of the instruction-tuned causal LM that judges completions.")]
    return []


JUDGE_TEMPLATES = {
    # Lee et al. (2023) prompt an LLM labeller with the context and both candidates and read its probabilities
    # of '1' and '2'; the script appends "Preferred response=" to the labeller's reply before reading them.
    "rlaif": (
        "A user wrote the conversation below, and an assistant could reply with either of two responses. "
        "Judge which response is more helpful, accurate, coherent and harmless.\n\n"
        "Conversation:\n{prompt}\n\nResponse 1:\n{first}\n\nResponse 2:\n{second}\n\n"
        "Which response is better? Answer 1 or 2."
    ),
    # Yuan et al. (2024), Fig. 2: an additive 5-point rubric whose verdict ends with 'Score: <points>'.
    "self_rewarding": (
        "Evaluate the response to the user's question with an additive 5-point score. Add 1 point if the "
        "response is relevant and offers some information on the question, even if incomplete. Add a 2nd point "
        "if it covers a substantial part of the question without fully answering it. Add a 3rd point if it "
        "usefully answers the basic elements of the question. Add a 4th point if it is written from an AI "
        "assistant's perspective, addresses the question directly and completely, and is well organised. Add a "
        "5th point if it is tailored to the question with no extraneous content and shows expert knowledge.\n\n"
        "Question: {prompt}\n\nResponse: {response}\n\n"
        "Justify your total in at most 100 words, then end with the line 'Score: <total points>'."
    ),
}


def online_preference_fields(recipe: Recipe) -> list[RuntimeField]:
    """The labelling prompt of the online-preference variants whose judge is an LLM reading a template."""
    if recipe.family != "online-preference" or recipe.variant not in JUDGE_TEMPLATES:
        return []
    placeholders = "{prompt}, {first} and {second}" if recipe.variant == "rlaif" else "{prompt} and {response}"
    return [RuntimeField("judge_template", "str", JUDGE_TEMPLATES[recipe.variant], f"The judge's instructions, with {placeholders} filled in; sent as a user message (edit it to fit your task).")]


def dataset_location(recipe: Recipe) -> tuple[str, str, str]:
    dataset = recipe.dataset
    if dataset.embedded:
        return f"{TINY_DIR}/data/{dataset.embedded}", "", dataset.split
    assert dataset.hub_id is not None
    return dataset.hub_id, dataset.config or "", dataset.split


def runtime_groups(recipe: Recipe) -> list[tuple[str, list[RuntimeField]]]:
    model_path = f"{TINY_DIR}/model" if recipe.model.embedded else recipe.model.hub_id
    data_path, data_config, data_split = dataset_location(recipe)
    default_dtype = recipe.model.dtype if recipe.peft else "float32"
    model_fields = [
        RuntimeField("model_name_or_path", "str", model_path, f"Hub id or local directory of the model (preset '{recipe.model.id}')."),
        RuntimeField(
            "model_dtype",
            "str",
            default_dtype,
            "dtype the weights are loaded in: float32, bfloat16 or float16. "
            + (
                "Full fine-tuning keeps float32 master weights and computes in bf16 through --mixed_precision."
                if not recipe.peft
                else "The frozen base model is stored in this dtype; the adapter trains in float32."
            ),
        ),
        RuntimeField("attn_implementation", "str", "sdpa", "Attention kernel: sdpa (PyTorch), eager, or flash_attention_2 if installed."),
    ]
    if recipe.family in ("sft", "distill") and recipe.has("teacher_model"):
        model_fields.append(
            RuntimeField("teacher_dtype", "str", recipe.model.dtype, "dtype the frozen teacher (--teacher_model) is loaded in: float32, bfloat16 or float16. It only runs inference (no gradients), so it needs no float32 master weights.")
        )
    model_fields += [
        RuntimeField("dataset", "str", data_path, f"A local .jsonl / .json / .parquet file or a Hub dataset id (preset '{recipe.dataset.id}')."),
        RuntimeField("dataset_config", "str", data_config, "Hub dataset configuration name ('' for none)."),
        RuntimeField("dataset_split", "str", data_split, "Hub dataset split."),
    ]
    for field_name, meaning in FORMAT_FIELDS[recipe.dataset.format]:
        column = recipe.dataset.columns.get(field_name, field_name)
        model_fields.append(RuntimeField(f"{field_name}_column", "str", column, f"Column holding {field_name}: {meaning}."))
    if recipe.dataset.format == "prompt":
        model_fields.append(
            RuntimeField("answer_format", "str", recipe.dataset.answer_format, "How the answer column is written: plain, gsm8k ('#### 42') or boxed (\\boxed{42}).")
        )
    if recipe.family == "reward" and recipe.has("use_margin"):
        column = recipe.dataset.columns.get("margin", "margin")
        model_fields.append(RuntimeField("margin_column", "str", column, "Column holding each pair's margin m, a number (read only when use_margin is true)."))
    if recipe.family == "preference" and recipe.variant == "step_dpo":
        model_fields.append(
            RuntimeField(
                "initial_steps_column",
                "str",
                recipe.dataset.columns.get("initial_steps", ""),
                "Column holding the correct previous solution steps that open the assistant's reply before the compared step ('' for none: the prompt column already ends where the step starts).",
            )
        )
    if recipe.peft is not None and recipe.peft.id in ("lora", "qlora", "dora", "rslora", "adalora"):
        model_fields.append(
            RuntimeField("target_modules", "str", ",".join(recipe.model.lora_target_modules), f"Comma-separated linear layers that get adapters (the '{recipe.model.id}' preset's attention and MLP projections).")
        )
    if recipe.family in REWARD_FAMILIES:
        model_fields += reward_fields(recipe)
    model_fields += online_preference_fields(recipe)
    model_fields.append(RuntimeField("output_dir", "str", f"runs/{recipe.method.id}", "Where checkpoints, metrics.jsonl and the final model go."))

    run_fields = [
        RuntimeField("mixed_precision", "str", "auto", "auto (bf16 on a GPU that supports it, else fp32), no, bf16 or fp16."),
        RuntimeField("gradient_checkpointing", "bool", False, "Recompute activations in the backward pass to save memory."),
        RuntimeField("logging_steps", "int", 10, "Log metrics to the progress bar and output_dir/metrics.jsonl every N optimizer steps."),
        RuntimeField("save_steps", "int", 500, "Write a checkpoint every N optimizer steps (0: only the final model)."),
        RuntimeField("save_total_limit", "int", 2, "Keep only the newest N checkpoints."),
        RuntimeField("resume_from_checkpoint", "str", "", "'latest' or a checkpoint directory: continue that run exactly."),
        RuntimeField("overwrite_output_dir", "bool", False, "Allow writing into a non-empty output_dir (otherwise the run refuses); the previous run's checkpoints and metrics.jsonl there are removed."),
        RuntimeField("skip_bad_rows", "bool", False, "Skip and count malformed rows instead of stopping at the first one."),
        RuntimeField("report_to", "str", "", "Experiment tracker for accelerate: tensorboard, wandb, ... ('' for none)."),
    ]
    if recipe.family in CHUNKED_LOSS_FAMILIES:
        run_fields += [
            RuntimeField("chunked_loss", "bool", True, "Form log-probabilities from the final hidden states a chunk of trained tokens at a time, never the full logits tensor (same values; false: the plain output layer)."),
            RuntimeField("loss_chunk_size", "int", 1024, "Tokens per chunk of the output layer with chunked_loss (peak extra memory ~ 10 B x chunk x vocabulary)."),
            RuntimeField("torch_compile", "bool", False, "Compile the model with torch.compile (inductor, through accelerate): fused kernels and fewer saved activations after a one-off compile (a minute or so for a 1B model on a GPU; a few recompiles while batch widths vary). Same losses as eager, except that dropout masks come from inductor's own random numbers."),
        ]
    if recipe.family in ROLLOUT_FAMILIES:
        run_fields += rollout_fields(recipe)
    if recipe.peft is not None and not recipe.peft.quantized and recipe.peft.id in MERGEABLE_PEFT:
        if recipe.family in SCORER_FAMILIES:
            run_fields.append(RuntimeField("merge_adapter", "bool", True, "Merge the adapter into the base weights before the final save, so final/ loads as a plain scorer (false: save only the adapter)."))
        else:
            run_fields.append(RuntimeField("merge_adapter", "bool", False, "Merge the adapter into the base weights before the final save."))
    model_fields, run_fields = _family_fields(recipe, model_fields, run_fields)
    return [("Model and data", model_fields), ("Run", run_fields)]


TRAINING_ONLY = {"gradient_checkpointing", "logging_steps", "save_steps", "save_total_limit", "resume_from_checkpoint", "report_to", "merge_adapter"}
"""Run fields that mean nothing to a script that does not train (test-time scaling)."""


def _family_fields(recipe: Recipe, model_fields: list[RuntimeField], run_fields: list[RuntimeField]) -> tuple[list[RuntimeField], list[RuntimeField]]:
    """Fields of the generation-based families (inference, rejection-sampling, constitutional)."""
    family = recipe.family
    if family not in ("inference", "rejection-sampling", "constitutional"):
        return model_fields, run_fields
    extra: list[RuntimeField] = []
    variant = recipe.variant
    if family == "inference" and variant == "prm_beam_search":
        extra.append(RuntimeField("prm_path", "str", "", "The final/ directory of a ptcompile process reward model run (AutoModelForTokenClassification + ptcompile_scorer.json), which scores partial solutions step by step. Required."))
    if (family, variant) in (("inference", "best_of_n"), ("rejection-sampling", "rft")):
        extra.append(
            RuntimeField(
                "reward_model_path",
                "str",
                "",
                "The final/ directory of a ptcompile reward model run (AutoModelForSequenceClassification + ptcompile_scorer.json) that scores each sample; '' uses the answer verifier instead (1 when the final answer equals the reference, else 0).",
            )
        )
    if variant in ("prm_beam_search", "best_of_n", "rft"):
        extra.append(RuntimeField("reward_batch_size", "int", 16, "Sequences per forward pass of the reward model or PRM."))
    if family == "constitutional":
        extra.append(RuntimeField("constitution", "str", "", "A JSON file with the principles to critique and revise against (a list of {name, critique, revision}); '' uses the constitution bundled in this script."))
    extra.append(RuntimeField("max_prompts", "int", 0, "Use only the first N usable prompts of the dataset (0: all)."))
    if family == "inference":
        extra.append(RuntimeField("sweep", "str", "", "Comma-separated budgets to report accuracy for (e.g. 1,4,16); '' picks the default sweep. The table goes to output_dir/accuracy.json."))
        run_fields = [f for f in run_fields if f.name not in TRAINING_ONLY]
        replaced = {
            "model_dtype": RuntimeField("model_dtype", "str", recipe.model.dtype, "dtype the weights are loaded in: float32, bfloat16 or float16 (nothing is trained, so the preset's dtype)."),
            "output_dir": RuntimeField("output_dir", "str", f"runs/{recipe.method.id}", "Where samples.jsonl (every sample, its answer and score) and accuracy.json (accuracy per budget) go."),
        }
        split = next(f for f in model_fields if f.name == "dataset_split")
        replaced["dataset_split"] = RuntimeField("dataset_split", "str", split.value, "Hub dataset split (the preset's training split by default; pass the held-out split, e.g. test, to measure accuracy on unseen problems).")
        model_fields = [replaced.get(f.name, f) for f in model_fields]
    output = next(i for i, f in enumerate(model_fields) if f.name == "output_dir")
    return model_fields[:output] + extra + model_fields[output:], run_fields
