"""How the GPU suite runs each script family: its objective, which way it must move, and the run's flags.

One row per script family (the families of compiler/knowledge_base.FAMILY_FORMATS). Every method of the
knowledge base is run through its family's row; data comes from the bundled tiny dataset of the method's
format (conftest.TINY_DATA) unless the row names another. `verified` says whether the row was checked against
the family's real script; rows for families on other branches are first guesses: fix them when the family
lands (tests/test_gpu_suite_plumbing.py checks that every family has a row).
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPE = "qwen2.5-0.5b"
"""Preset whose dimensions the random-init model takes (`ptcompile tiny DIR --shape qwen2.5-0.5b`)."""

QLORA_SHAPE = SHAPE


@dataclass(frozen=True)
class Plan:
    objectives: tuple[tuple[str, str], ...]
    """(metrics.jsonl key, "down" | "up" | "none"); the first key the script logs is the objective."""
    margin: float
    """How far the objective must move: "down" needs end <= start - margin * max(1, |start|)
    ("loss" style); "up" needs end >= start + margin."""
    steps: int = 40
    learning_rate: float = 1e-4
    qlora_learning_rate: float = 1e-3
    extra: tuple[str, ...] = ()
    data: str | None = None
    """A bundled data file (under the tiny directory's data/) instead of the format's default."""
    verified: bool = False
    """True when the objective keys and direction were checked against the family's script (on CPU with the
    tiny model). No row's margins have been validated on GPU hardware yet."""


RUN_FLAGS = (
    "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
    "--save_steps", "0", "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--mixed_precision", "bf16",
)

PLANS: dict[str, Plan] = {
    # A random-init model of the preset's shape starts at ~log(vocab) = 11.9 nats and quickly learns the
    # tiny data's small vocabulary: the loss must fall by a fifth at least.
    "sft": Plan((("loss", "down"),), margin=0.2, verified=True),
    # Policy == reference at step 1: margin 0, loss log 2; the margin must open up.
    # (A random-init model has nothing to preserve: rates well above the papers' 5e-7 make 40 steps enough.)
    "preference": Plan((("rewards/margin", "up"),), margin=0.3, learning_rate=5e-5, qlora_learning_rate=1e-3, verified=True),
    # --- families on other branches: first guesses -------------------------------------------------------
    "unpaired": Plan((("rewards/margin", "up"), ("loss", "down")), margin=0.1, learning_rate=1e-5, qlora_learning_rate=2e-4),
    "reward": Plan((("accuracy", "up"), ("loss", "down")), margin=0.1),
    "prm": Plan((("accuracy", "up"), ("loss", "down")), margin=0.1),
    "distill": Plan((("loss", "down"),), margin=0.1),
    "rejection-sampling": Plan((("loss", "down"),), margin=0.05),
    "constitutional": Plan((("loss", "down"),), margin=0.05),
    "policy-gradient": Plan((("reward", "up"), ("rewards/mean", "up"), ("reward/mean", "up")), margin=0.05, learning_rate=1e-5, qlora_learning_rate=2e-4),
    "ppo": Plan((("reward", "up"), ("rewards/mean", "up")), margin=0.05, learning_rate=1e-5, qlora_learning_rate=2e-4),
    "online-preference": Plan((("rewards/margin", "up"), ("loss", "down")), margin=0.05, learning_rate=1e-5, qlora_learning_rate=2e-4),
    "gkd": Plan((("loss", "down"),), margin=0.05),
    # Test-time scaling trains nothing: the run must finish and log finite numbers.
    "inference": Plan((("accuracy", "none"),), margin=0.0, steps=4),
}
