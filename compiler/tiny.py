"""Materialise the embedded tiny model (or a random-init model of any preset's shape) and the tiny datasets.

`ptcompile tiny DIR` writes DIR/model (a Hugging Face model directory: config.json, model.safetensors and the
bundled tokenizer) and DIR/data/*.jsonl. The emitted scripts then load it with the same
`AutoModelForCausalLM.from_pretrained` call they use for hub models, so the loading code under test is the
real one. Needs the [train] extra (torch, transformers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import schema
from .paths import assets_dir
from .tiny_data import write_all

MODEL_TYPES = {
    # model_type -> transformers config keys that differ from the Llama names we store
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {},
    "mixtral": {"num_experts": "num_local_experts"},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {},
}


def config_kwargs(preset: schema.ModelPreset, vocab_size: int | None = None) -> dict:
    """transformers config arguments for a preset's architecture (random init of the same shape)."""
    arch = preset.architecture
    kwargs = {
        "num_hidden_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "vocab_size": vocab_size or arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
    }
    if arch.num_experts is not None:
        kwargs["num_local_experts"] = arch.num_experts
        kwargs["num_experts_per_tok"] = arch.num_experts_per_token
    return kwargs


def model_config(preset: schema.ModelPreset, tokenizer, vocab_from_tokenizer: bool = False):
    """The transformers config of a random-init model with the preset's shape and the tiny tokenizer's ids."""
    from transformers import AutoConfig

    model_type = preset.architecture.model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(f"cannot build a random-init '{model_type}' model; supported: {sorted(MODEL_TYPES)}")
    kwargs = config_kwargs(preset, len(tokenizer) if vocab_from_tokenizer else None)
    return AutoConfig.for_model(
        model_type,
        **kwargs,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_model(preset: schema.ModelPreset, directory: Path, seed: int = 0, vocab_from_tokenizer: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    for item in (assets_dir() / "tiny").iterdir():
        if item.is_file() and item.name != "README.md":
            shutil.copy2(item, directory / item.name)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = model_config(preset, tokenizer, vocab_from_tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    return directory


def materialise(preset: schema.ModelPreset, directory: Path, seed: int = 0) -> dict[str, Path]:
    model_dir = write_model(preset, directory / "model", seed=seed, vocab_from_tokenizer=preset.embedded)
    data_paths = write_all(directory / "data")
    return {"model": model_dir, **{p.stem: p for p in data_paths}}
