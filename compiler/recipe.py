"""Resolve a method + model preset + PEFT choice + user overrides into a Recipe: every value final, each with
its provenance. The templates receive only a Recipe; they never look at raw taxonomy files."""

from __future__ import annotations

import difflib
import math
import shlex
from dataclasses import dataclass, field
from typing import Any

from . import schema
from .errors import CompileError
from .knowledge_base import KnowledgeBase

PEFT_CHOICES_NONE = "none"

SCORER_FAMILIES = ("reward", "prm")
"""Families whose final model is a scorer that other scripts load as a plain transformers model."""
VIRTUAL_TOKEN_PEFT = ("prompt-tuning", "prefix-tuning", "p-tuning-v2")
"""PEFT techniques that add virtual tokens: they cannot be merged into the weights of a scorer."""


@dataclass(frozen=True)
class ResolvedHyperparameter:
    name: str
    type: str
    value: Any
    default: Any
    description: str
    source: str
    """Human-readable provenance of the default ('rafailov2023direct, Appendix B: ...' or 'common practice: ...')."""
    origin: str
    """Which record set the default: 'method', 'family', 'common' or 'peft'."""
    overridden: bool = False
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Recipe:
    method: schema.Method
    model: schema.ModelPreset
    dataset: schema.DatasetPreset
    peft: schema.PeftTechnique | None
    hyperparameters: tuple[ResolvedHyperparameter, ...]
    peft_hyperparameters: tuple[ResolvedHyperparameter, ...]
    papers: tuple[schema.Paper, ...]
    command: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.method.script.family

    @property
    def variant(self) -> str:
        return self.method.script.variant

    def hp(self, name: str) -> Any:
        for hp in self.hyperparameters + self.peft_hyperparameters:
            if hp.name == name:
                return hp.value
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(hp.name == name for hp in self.hyperparameters + self.peft_hyperparameters)


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise CompileError(f"--set expects name=value, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


def coerce(hp_type: str, raw: str, name: str) -> Any:
    """Turn the text of `--set name=value` into a value of the hyperparameter's declared type."""
    try:
        if hp_type == "bool":
            lowered = raw.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if hp_type == "int":
            return int(raw)
        if hp_type == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        return raw
    except ValueError:
        raise CompileError(f"--set {name}={raw}: expected a {hp_type}") from None


def _resolve_list(
    hps: list[tuple[schema.Hyperparameter, str]], overrides: dict[str, str], used: set[str]
) -> list[ResolvedHyperparameter]:
    resolved = []
    for hp, origin in hps:
        value: Any = hp.default
        overridden = False
        if hp.name in overrides:
            value = coerce(hp.type, overrides[hp.name], hp.name)
            try:
                schema.check_value(hp, value, f"--set {hp.name}")
            except ValueError as exc:
                raise CompileError(str(exc)) from None
            used.add(hp.name)
            overridden = value != hp.default or type(value) is not type(hp.default)
        if hp.type == "float" and isinstance(value, int):
            value = float(value)
        resolved.append(
            ResolvedHyperparameter(
                name=hp.name,
                type=hp.type,
                value=value,
                default=float(hp.default) if hp.type == "float" else hp.default,
                description=hp.description,
                source=hp.source.describe(),
                origin=origin,
                overridden=overridden,
                range=tuple(hp.range) if hp.range else None,  # type: ignore[arg-type]
                choices=tuple(hp.choices) if hp.choices else None,
            )
        )
    return resolved


def resolve(
    kb: KnowledgeBase,
    method_name: str,
    model_name: str | None = None,
    peft_name: str | None = None,
    overrides: list[str] | None = None,
    dataset_name: str | None = None,
) -> Recipe:
    method = kb.method(method_name)
    model = kb.model(model_name or method.default_model)
    if dataset_name is None and model.embedded:
        # The embedded tiny model trains on the bundled tiny dataset of the method's format.
        tiny = sorted(d for d, e in kb.datasets.items() if e.record.embedded and e.record.format == method.data_format)
        dataset_name = tiny[0] if tiny else None
        explicit_dataset = False
    else:
        explicit_dataset = dataset_name is not None
    dataset = kb.dataset(dataset_name or method.default_dataset)
    from .knowledge_base import FAMILY_FORMATS

    if dataset.format not in FAMILY_FORMATS[method.script.family]:
        raise CompileError(
            f"dataset '{dataset.id}' has format '{dataset.format}'; {method.id} trains on {sorted(FAMILY_FORMATS[method.script.family])}"
        )
    peft = None
    if peft_name and peft_name != PEFT_CHOICES_NONE:
        peft = kb.peft_technique(peft_name)
        if method.script.family in SCORER_FAMILIES and peft.id in VIRTUAL_TOKEN_PEFT:
            raise CompileError(
                f"{method.id} saves a scorer that other scripts load as a plain transformers model; {peft.id} adds "
                "virtual tokens that cannot be merged into its weights. Use a weight adapter (lora, dora, rslora, adalora, ia3, qlora)."
            )

    # Precedence of defaults: method > family > common (a method's value carries its paper source).
    merged: dict[str, tuple[schema.Hyperparameter, str]] = {}
    if method.script.family == "inference":
        # Test-time scaling does not train: only the seed applies of the shared training defaults.
        merged.update({e.record.name: (e.record, "common") for e in kb.common_training if e.record.name == "seed"})
    else:
        merged.update({e.record.name: (e.record, "common") for e in kb.common_training})
    merged.update({e.record.name: (e.record, "family") for e in kb.family_training.get(method.script.family, [])})
    merged.update({hp.name: (hp, "method") for hp in method.hyperparameters})
    peft_hps: dict[str, tuple[schema.Hyperparameter, str]] = {}
    if peft is not None:
        for hp in peft.hyperparameters:
            if hp.name == "learning_rate":
                # A PEFT technique's learning rate (LoRA tolerates ~10x more) replaces the family default,
                # but never a rate the method's own paper sets.
                if merged.get(hp.name, (None, ""))[1] != "method":
                    merged[hp.name] = (hp, "peft")
                continue
            peft_hps[hp.name] = (hp, "peft")

    parsed = dict(parse_override(o) for o in (overrides or []))
    used: set[str] = set()
    hyperparameters = _resolve_list(list(merged.values()), parsed, used)
    peft_resolved = _resolve_list(list(peft_hps.values()), parsed, used)
    unknown = sorted(set(parsed) - used)
    if unknown:
        known = sorted(set(merged) | set(peft_hps))
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise CompileError(
            f"unknown hyperparameter {', '.join(hints)} for {method.id}"
            + (f" with {peft.id}" if peft else "")
            + f"; known: {', '.join(known)}"
        )

    papers = tuple(kb.papers[key].record for key in method.papers)
    command = ["ptcompile", method.id, "--model", model.id]
    if explicit_dataset:
        command += ["--dataset", dataset.id]
    if peft is not None:
        command += ["--peft", peft.id]
    for text in overrides or []:
        command += ["--set", text]
    return Recipe(
        method=method,
        model=model,
        dataset=dataset,
        peft=peft,
        hyperparameters=tuple(hyperparameters),
        peft_hyperparameters=tuple(peft_resolved),
        papers=papers,
        command=shlex.join(command),
        overrides=parsed,
    )
