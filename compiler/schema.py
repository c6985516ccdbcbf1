"""The data model of the knowledge base.

Every taxonomy file is validated against one of the models below. They are strict on purpose: a
contributor who writes `beta: "0.1"` or `arxiv: 2305.18290` (a float!) gets an error with a line number
instead of a silently wrong script. Cross-references between files (paper keys, parents, categories) are
checked later, in `knowledge_base.py`, where all files are known.
"""

from __future__ import annotations

import keyword
import math
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# --------------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------------


class Strict(BaseModel):
    """Base for every taxonomy record: unknown keys and type coercion are errors; records are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$|^[a-z0-9]$", max_length=64)]
"""Identifier of a method, model, dataset, category or PEFT technique: lower case, digits, '.', '-'."""

PaperKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9]*[0-9]{4}[a-z0-9]*$", max_length=64)]
"""BibTeX-style key: first author's family name, year, first significant title word (`rafailov2023direct`)."""

ArxivId = Annotated[str, StringConstraints(pattern=r"^[0-9]{4}\.[0-9]{4,5}$")]
"""A modern arXiv identifier without version, as a string (`"2305.18290"`); YAML would read it as a float."""

YearMonth = Annotated[str, StringConstraints(pattern=r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])$")]
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s<>\"']+$", max_length=500)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=300)]
PyName = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]*$", max_length=48)]

DataFormat = Literal[
    "chat",  # {"messages": [{"role", "content"}, ...]}: loss on assistant turns
    "instruction",  # {"instruction", "input", "output"}
    "text",  # {"text"}: raw text, continued pre-training
    "preference",  # {"prompt", "chosen", "rejected"}
    "unpaired",  # {"prompt", "completion", "label"}: KTO-style binary feedback
    "prompt",  # {"prompt"} (+ optional "answer" for verifiable rewards): online methods
    "step-labels",  # {"prompt", "steps": [...], "labels": [...]}: process supervision
]

ScriptFamily = Literal[
    "sft",  # next-token cross-entropy on completions (SFT, instruction tuning, CPT, distillation data)
    "preference",  # paired offline preference losses (DPO and its zoo)
    "unpaired",  # KTO, BCO-style unpaired losses
    "reward",  # Bradley-Terry reward model
    "prm",  # process reward model
    "distill",  # soft-label knowledge distillation
    "rejection-sampling",  # sample, filter by verifier/reward, fine-tune
    "constitutional",  # critique -> revise -> SFT
    "policy-gradient",  # GRPO family, RLOO, REINFORCE++, ReMax
    "ppo",  # PPO-RLHF with value head
    "online-preference",  # online DPO, iterative / self-rewarding DPO, SPIN
    "gkd",  # on-policy distillation
    "inference",  # test-time scaling: best-of-N, self-consistency, PRM beam search
]


# --------------------------------------------------------------------------------------------------
# Hyperparameters and their provenance
# --------------------------------------------------------------------------------------------------


class Source(Strict):
    """Where a value comes from: a paper and the place in it, or common practice with a reason.

    Exactly one of the two forms is allowed:
      source: {paper: rafailov2023direct, where: "Sec. 6, 'beta = 0.1 for most experiments'"}
      source: {common_practice: "TRL and most papers use 3% warm-up; the paper gives none"}
    """

    paper: PaperKey | None = None
    where: ShortText | None = None
    common_practice: ShortText | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "Source":
        has_paper = self.paper is not None or self.where is not None
        if has_paper and self.common_practice is not None:
            raise ValueError("give either paper+where or common_practice, not both")
        if self.common_practice is None and (self.paper is None or self.where is None):
            raise ValueError("a paper source needs both 'paper' (a key) and 'where' (section, table or equation)")
        return self

    def describe(self) -> str:
        if self.common_practice is not None:
            return f"common practice: {self.common_practice}"
        return f"{self.paper}, {self.where}"


Number = Union[int, float]


class Hyperparameter(Strict):
    """One tunable value of a method (or of training in general), with its provenance."""

    name: PyName
    type: Literal["float", "int", "bool", "str"]
    default: Union[bool, int, float, str]
    range: list[Number] | None = Field(default=None, min_length=2, max_length=2)
    """Typical range [low, high] for numbers; the compiler rejects --set values outside it."""
    choices: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        default=None, min_length=1
    )
    """Allowed values for a str hyperparameter."""
    description: Text
    source: Source

    @field_validator("name")
    @classmethod
    def _not_keyword(cls, v: str) -> str:
        if keyword.iskeyword(v):
            raise ValueError(f"'{v}' is a Python keyword")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Hyperparameter":
        check_value(self, self.default, "default")
        if self.range is not None:
            if self.type not in ("int", "float"):
                raise ValueError("range: only int and float hyperparameters have a range")
            low, high = self.range
            for bound in (low, high):
                if isinstance(bound, bool) or (isinstance(bound, float) and not math.isfinite(bound)):
                    raise ValueError("range: bounds must be finite numbers")
            if low > high:
                raise ValueError(f"range: [{low}, {high}] is empty")
        if self.choices is not None and self.type != "str":
            raise ValueError("choices: only str hyperparameters have choices")
        return self


def check_value(hp: Hyperparameter, value: object, what: str = "default") -> None:
    """Raise ValueError("<what>: ...") when `value` does not fit `hp`'s type, range or choices."""
    expected = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}[hp.type]
    if isinstance(value, bool) and hp.type != "bool":
        raise ValueError(f"{what}: {value!r} is a bool, expected {hp.type}")
    if not isinstance(value, expected):
        raise ValueError(f"{what}: {value!r} is not of type {hp.type}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what}: {value!r} is not finite")
    if hp.range is not None and isinstance(value, (int, float)):
        low, high = hp.range
        if not (low <= value <= high):
            raise ValueError(f"{what}: {value!r} is outside the range [{low}, {high}]")
    if hp.choices is not None and value not in hp.choices:
        raise ValueError(f"{what}: {value!r} is not one of {hp.choices}")


# --------------------------------------------------------------------------------------------------
# Catalogue records
# --------------------------------------------------------------------------------------------------


class Category(Strict):
    id: Slug
    name: ShortText
    description: Text
    parent: Slug | None = None
    survey_section: ShortText | None = None
    """Section of the survey (arXiv 2502.21321) or heading of its paper list that this category mirrors."""


class CategoriesFile(Strict):
    categories: list[Category] = Field(min_length=1)


PaperKind = Literal["paper", "survey", "repository", "tutorial", "benchmark", "dataset", "resource"]


class Paper(Strict):
    key: PaperKey
    title: ShortText
    authors: list[ShortText] = Field(default_factory=list)
    """Authors in publication order, 'Given Family'. Empty only where the list gives none and none is known."""
    date: YearMonth | None = None
    """Year and month of first public release (arXiv v1 or publication); required except for repositories."""
    venue: ShortText
    """'arXiv' for preprints; otherwise the conference, journal or 'GitHub'."""
    kind: PaperKind = "paper"
    arxiv: ArxivId | None = None
    doi: Annotated[str, StringConstraints(pattern=r"^10\.[0-9]{4,9}/\S+$")] | None = None
    url: Url | None = None
    code: Url | None = None
    links: list[Url] = Field(default_factory=list)
    """Other addresses of the same work (OpenReview, ACL Anthology, a PDF, the exact link the survey's paper
    list uses when it differs from the canonical identifier)."""
    categories: list[Slug] = Field(min_length=1)
    summary: Text | None = None

    @model_validator(mode="after")
    def _identified(self) -> "Paper":
        if self.arxiv is None and self.doi is None and self.url is None:
            raise ValueError("a paper needs an identifier: arxiv, doi or url")
        if self.date is None and self.kind not in ("repository", "tutorial", "dataset", "resource"):
            raise ValueError("'date' (YYYY-MM) is required for papers, surveys and benchmarks")
        return self

    @property
    def link(self) -> str:
        if self.arxiv:
            return f"https://arxiv.org/abs/{self.arxiv}"
        if self.doi:
            return f"https://doi.org/{self.doi}"
        assert self.url is not None
        return self.url


class PapersFile(Strict):
    papers: list[Paper] = Field(min_length=1)


class Objective(Strict):
    latex: Text
    """The objective in LaTeX (rendered on the site)."""
    plain: Text
    """The same objective in plain Unicode math (shown in the emitted script's docstring)."""
    equation: ShortText
    """Where the objective is stated in the primary paper, e.g. 'Eq. 7'."""


class Needs(Strict):
    reference_model: bool
    reward_model: bool
    generation: bool


class Script(Strict):
    """How the method is compiled: the template family and, inside it, the selected variant (loss)."""

    family: ScriptFamily
    variant: PyName
    """Selects templates/<family>/variants/<variant>.py.j2 (for example the DPO loss inside 'preference')."""


class Method(Strict):
    id: Slug
    name: ShortText
    aliases: list[ShortText] = Field(default_factory=list)
    category: Slug
    papers: list[PaperKey] = Field(min_length=1)
    """Primary paper first."""
    derived_from: list[Slug] = Field(default_factory=list)
    summary: Text
    objective: Objective
    data_format: DataFormat
    needs: Needs
    hyperparameters: list[Hyperparameter] = Field(default_factory=list)
    """Method-specific values; they also override the family's training defaults of the same name."""
    pitfalls: list[Text] = Field(default_factory=list)
    frameworks: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_\-]+$")], ShortText] = Field(
        default_factory=dict
    )
    """Names of this method in other frameworks: {trl: "DPOTrainer(loss_type='sigmoid')", ...}."""
    script: Script
    default_model: Slug
    default_dataset: Slug


class PeftTechnique(Strict):
    id: Slug
    name: ShortText
    papers: list[PaperKey] = Field(min_length=1)
    summary: Text
    hyperparameters: list[Hyperparameter] = Field(default_factory=list)
    pitfalls: list[Text] = Field(default_factory=list)
    derived_from: list[Slug] = Field(default_factory=list)
    quantized: bool = False
    """True when the base model is loaded quantized (QLoRA); needs bitsandbytes."""


class TrainingDefaults(Strict):
    """Training hyperparameters shared by every method of a script family (lr, batch, schedule, ...)."""

    family: ScriptFamily
    hyperparameters: list[Hyperparameter] = Field(min_length=1)


class TrainingFile(Strict):
    common: list[Hyperparameter] = Field(min_length=1)
    """Defaults for every family (seed, schedule, clipping, ...)."""
    families: list[TrainingDefaults] = Field(default_factory=list)


class Architecture(Strict):
    model_type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]+$")]
    """transformers' `model_type` from config.json (llama, qwen2, mistral, mixtral, gemma2, phi3, ...)."""
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool
    num_experts: int | None = Field(default=None, gt=0)
    num_experts_per_token: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _heads(self) -> "Architecture":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if (self.num_experts is None) != (self.num_experts_per_token is None):
            raise ValueError("give both num_experts and num_experts_per_token, or neither")
        return self


class ChatTemplate(Strict):
    source: Literal["tokenizer", "named"]
    """'tokenizer': the tokenizer's own chat template; 'named': a template shipped with ptcompile."""
    name: Literal["chatml", "llama3", "zephyr"] | None = None

    @model_validator(mode="after")
    def _named(self) -> "ChatTemplate":
        if (self.source == "named") != (self.name is not None):
            raise ValueError("'name' is required with source 'named' and forbidden with source 'tokenizer'")
        return self


class ModelPreset(Strict):
    id: Slug
    name: ShortText
    hub_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")] | None = None
    """Hugging Face Hub id; None only for the embedded tiny model."""
    embedded: bool = False
    """The random-init tiny model ptcompile builds locally (`ptcompile tiny DIR`)."""
    architecture: Architecture
    num_parameters: int = Field(gt=0)
    chat_template: ChatTemplate
    lora_target_modules: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+$")]] = Field(min_length=1)
    license: ShortText
    gated: bool
    dtype: Literal["bfloat16", "float16", "float32"]
    papers: list[PaperKey] = Field(default_factory=list)
    config_source: ShortText
    """Where the dimensions were read (the model's config.json on the Hub, with the revision when known)."""

    @model_validator(mode="after")
    def _hub(self) -> "ModelPreset":
        if self.embedded == (self.hub_id is not None):
            raise ValueError("give a hub_id, or set embedded: true (and no hub_id) for the tiny model")
        return self


ColumnName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=64)]


class DatasetPreset(Strict):
    id: Slug
    name: ShortText
    hub_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")] | None = None
    embedded: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_\-]+\.jsonl$")] | None = None
    """File name of a bundled tiny dataset (written by `ptcompile tiny DIR` into DIR/data/)."""
    config: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None
    split: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-\[\]:%]+$")]
    format: DataFormat
    columns: dict[PyName, ColumnName] = Field(default_factory=dict)
    """Script field -> dataset column, for columns whose names differ from the format's."""
    answer_format: Literal["plain", "gsm8k", "boxed"] = "plain"
    """How the reference answer is written in an 'answer' column: as is, after '#### ' (GSM8K) or inside
    \\boxed{...} (MATH). Verifiable-reward scripts extract the final answer accordingly."""
    size: int | None = Field(default=None, gt=0)
    """Rows in the split, as published on the dataset card."""
    license: ShortText
    description: Text
    papers: list[PaperKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _where(self) -> "DatasetPreset":
        if (self.hub_id is None) == (self.embedded is None):
            raise ValueError("give exactly one of hub_id and embedded")
        return self


# Each taxonomy file kind, by location (see loader.FILE_KINDS).
FILE_MODELS: dict[str, type[Strict]] = {
    "categories": CategoriesFile,
    "training": TrainingFile,
    "papers": PapersFile,
    "method": Method,
    "peft": PeftTechnique,
    "model": ModelPreset,
    "dataset": DatasetPreset,
}

PAPER_KEY_RE = re.compile(r"^[a-z][a-z0-9]*[0-9]{4}[a-z0-9]*$")
