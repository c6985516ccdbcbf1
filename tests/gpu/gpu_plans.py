"""How the GPU suite runs each script family: its objective, which way it must move, the run's flags, and the
helper models a run needs.

One row per script family (the families of compiler/knowledge_base.FAMILY_FORMATS), and a row for each method
whose objective or inputs differ from the rest of its family (plan_for takes the method's row first). Every
method of the knowledge base is run through its row; data comes from the bundled tiny dataset of the method's
format (conftest.TINY_DATA) unless the row names another. Flags (RUN_FLAGS, a row's extra and inputs) go only
to the scripts that have the option: a family's row can carry what just one of its methods needs.

A run that needs another model (a teacher, a reward model, a process reward model, a policy that can already
write answers) gets one that the harness first trains with the project's own generated scripts, from the same
random-init model (HELPERS; each is built once per model directory). Each row says whether its objective can
be expected to move from such a start; direction "none" only checks that the run finishes with finite numbers.

`verified=True`: the row was run for 40 steps on CPU with the embedded tiny model (`ptcompile tiny DIR`)
through gpu_harness.run_case, its helpers included: its scripts finished, logged the objective key, and an
"up" or "down" objective moved that way (at the row's learning rate, or at the larger one its note gives
where the tiny model needs it). tests/test_gpu_suite_plumbing.py re-checks every row's key in CI. No row has
run on GPU hardware yet: margins, learning rates and the helpers' GPU settings for the preset's shape are
estimates from the tiny runs and from the SFT and preference rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from online_helpers import SELF_JUDGE_TEMPLATE

SHAPE = "qwen2.5-0.5b"
"""Preset whose dimensions the random-init model takes (`ptcompile tiny DIR --shape qwen2.5-0.5b`)."""

QLORA_SHAPE = SHAPE

BASE = "base"
"""An input naming the model under test itself (DIR/model), e.g. as an LLM judge."""


@dataclass(frozen=True)
class Plan:
    objectives: tuple[tuple[str, str], ...]
    """(metrics.jsonl key, "down" | "up" | "none"); the first key the script logs is the objective. Inference
    scripts write no metrics.jsonl: their accuracy.json table is read instead, one row per budget."""
    margin: float
    """How far the objective must move: "down" needs end <= start - margin * max(1, |start|)
    ("loss" style); "up" needs end >= start + margin."""
    steps: int = 40
    learning_rate: float = 1e-4
    qlora_learning_rate: float = 1e-3
    extra: tuple[str, ...] = ()
    data: str | None = None
    """A bundled data file (under the tiny directory's data/) or one the harness writes
    (gpu_harness.WRITTEN_DATA) instead of the format's default."""
    inputs: tuple[tuple[str, str], ...] = ()
    """(flag, helper): the flag gets the final/ directory of that helper (HELPERS) or, for BASE, DIR/model."""
    verified: bool = False
    """True when the row was checked on CPU with the tiny model (see the module docstring)."""


@dataclass(frozen=True)
class Helper:
    """A model trained by a generated script before the runs that need it."""

    method: str
    """The method whose generated script trains it."""
    data: str
    """Its data: a bundled file under DIR/data, or one the harness writes (gpu_harness.WRITTEN_DATA)."""
    steps: int
    learning_rate: float
    """Steps and rate for a preset's shape on the GPU (estimates: no GPU run yet)."""
    tiny_steps: int
    tiny_learning_rate: float
    """Steps and rate for the embedded tiny model on CPU (checked: the runs that need the helper work)."""
    batch_size: int = 16


HELPERS: dict[str, Helper] = {
    # The student starts equal to the random-init model: a teacher equal to it too would leave a divergence
    # of 0 to minimise. A short SFT on the chat data makes a teacher the student can move towards.
    "teacher": Helper("sft", "chat.jsonl", steps=60, learning_rate=1e-4, tiny_steps=25, tiny_learning_rate=3e-3, batch_size=8),
    # A policy that writes worked sums and stops (conftest.tiny_sum_solver on the tiny model: right about half
    # of the time at temperature 1). A random-init model never emits EOS, so rejection sampling would accept
    # nothing, and every verifiable reward and every test-time-scaling accuracy would stay 0.
    "solver": Helper("sft", "sum_solutions.jsonl", steps=200, learning_rate=1e-4, tiny_steps=60, tiny_learning_rate=3e-3),
    # The successor task with half of the answers noisy (tests/pg_helpers.py): right about half of the time
    # at temperature 1, so a verifiable reward has room to rise and the policy gradient alone must raise it.
    "successor": Helper("sft", "noisy_successor.jsonl", steps=120, learning_rate=1e-4, tiny_steps=120, tiny_learning_rate=3e-3, batch_size=64),
    # The "polite" task of tests/online_helpers.py: describe an animal with an adjective drawn from polite and
    # rude ones (half polite), and judge a reply with 'Score: 5' (polite) or 'Score: 1' (rude), so that the
    # self-rewarding judge parses and the reward model's preference has room to be learnt by the policy.
    "polite": Helper("sft", "polite_and_judge.jsonl", steps=200, learning_rate=1e-4, tiny_steps=200, tiny_learning_rate=3e-3, batch_size=64),
    # Polite replies over rude and degenerate ones (online_helpers.hardened_preference_rows): scores of about
    # +5 and -5 on the tiny model, and no reward for cutting a reply off.
    "reward_model": Helper("reward-model", "hardened_preference.jsonl", steps=120, learning_rate=1e-4, tiny_steps=120, tiny_learning_rate=3e-3),
    # Step labels of the solver's kind of solutions. PRM beam search only needs a scorer in the
    # ptcompile_scorer.json contract to run; how well this one checks sums is not what its row measures.
    "prm": Helper("process-reward-model", "sum_steps.jsonl", steps=100, learning_rate=1e-4, tiny_steps=100, tiny_learning_rate=2e-3),
}

RUN_FLAGS = (
    "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
    "--save_steps", "0", "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--mixed_precision", "bf16",
)

# Generation caps in the rows: the solver's sums take ~20 tokens, a polite reply ~8, a successor answer 1-2; a
# model that does not stop runs every sample to the cap, so the cap is the run's cost. Polite replies that
# never end are penalised, as tests/methods/test_ppo.py does: otherwise the policy finds the reward model's
# blind spot (cut-off text) first.
_POLITE_INPUTS = (("--model_name_or_path", "polite"), ("--reward_model_path", "reward_model"))

# On-policy rows: the tiny model needs about 1e-3 to move these objectives in 40 steps (and does not move at
# 1e-5); a 0.5B model takes smaller steps, as the SFT (1e-4 vs the tiny helpers' 3e-3) and preference rows do.
_RL_RATES = {"learning_rate": 5e-5, "qlora_learning_rate": 1e-3}

_PREFERENCE = Plan((("rewards/margin", "up"),), margin=0.3, learning_rate=5e-5, qlora_learning_rate=1e-3, verified=True)

# The "(tiny: a -> b)" notes are the objective's start -> end over 40 steps of the row on the embedded tiny
# model on CPU, at the row's learning rate unless one is given.
PLANS: dict[str, Plan] = {
    # A random-init model of the preset's shape starts at ~log(vocab) = 11.9 nats and quickly learns the
    # tiny data's small vocabulary: the loss must fall by a fifth at least. continued-pretraining packs the
    # bundled text into max_length blocks: 256 makes ~40 of them, 2048 only 5 (fewer than one step). The
    # chat and instruction rows are far shorter. distillation-hard trains on the teacher's replies to the
    # chat prompts, kept short: the suite times the student, not the teacher (tiny: 6.13 -> 4.75; sft 6.16 ->
    # 5.61, less than a fifth from the tiny model's smaller vocabulary).
    "sft": Plan(
        (("loss", "down"),), margin=0.2, extra=("--max_length", "256", "--max_new_tokens", "64"), inputs=(("--teacher_model", "teacher"),), verified=True,
    ),
    # Policy == reference at step 1: margin 0, loss log 2; the margin must open up.
    # (A random-init model has nothing to preserve: rates well above the papers' 5e-7 make 40 steps enough.)
    "preference": _PREFERENCE,
    # Step-DPO compares the step after the previous correct ones, a column the plain pairs lack.
    "step-dpo": replace(_PREFERENCE, data="step_preference.jsonl"),
    # KTO and BCO: the implicit rewards of desirable (polite) and undesirable (rude) completions separate from
    # 0 at step 1, as DPO's do; the preference row's rates (tiny: KTO 0.003 -> 0.135, BCO 0.003 -> 0.136).
    "unpaired": Plan((("rewards/margin", "up"),), margin=0.1, learning_rate=5e-5, qlora_learning_rate=1e-3, verified=True),
    # Bradley-Terry loss from log 2; polite vs rude adjectives are learnt within tens of steps (tiny:
    # 0.69 -> 0.09). The logged accuracy is a batch mean of 8 pairs that can start near 1 by chance.
    "reward": Plan((("loss", "down"),), margin=0.1, verified=True),
    # Step-level BCE from log 2. Checking sums takes a random-init model hundreds of steps: over 40 the loss
    # only wanders around the label prior's (tiny: 0.69 -> 0.68), over 300 it falls (tiny: 0.69 -> 0.48).
    "prm": Plan((("loss", "down"),), margin=0.1, steps=300, verified=True),
    # Forward KL to a teacher that differs from the student (the helper): the student closes the gap
    # (tiny: 2.60 -> 2.02; 2.35 -> 0.02 at 3e-3).
    "distill": Plan((("loss", "down"),), margin=0.1, inputs=(("--teacher_model", "teacher"),), verified=True),
    # SFT on the solver's own accepted (correct, EOS-terminated) samples of the bundled sums; without the
    # solver nothing is accepted and the script stops before training. The loss of a model on its own samples
    # starts at its sampling entropy and a batch of 8 samples is noisy: it does not fall measurably in 40
    # steps (tiny: 0.40 -> 0.48, and 0.45 -> 0.51 at 1e-3). This row only checks sampling, filtering and
    # fine-tuning run with finite numbers.
    "rejection-sampling": Plan(
        (("loss", "none"),), margin=0.0, data="sums.jsonl", extra=("--max_new_tokens", "48", "--num_samples", "8", "--max_prompts", "64", "--temperature", "1.0"),
        inputs=(("--model_name_or_path", "solver"),), verified=True,
    ),
    # SFT on the model's own critiqued revisions: whatever a random-init model writes is still a learnable
    # distribution, so the loss falls like an SFT loss from log(vocab) (tiny: 6.23 -> 5.68).
    "constitutional": Plan((("loss", "down"),), margin=0.05, extra=("--max_new_tokens", "32", "--max_prompts", "64"), verified=True),
    # The verifiable reward of the successor policy's one-digit answers (about half right at temperature 1),
    # raised by the policy gradient alone. DAPO's overlong penalty must fit in the 4-token cap.
    # (tiny: GRPO 0.56 -> 0.67, 0.56 -> 0.59 at 1e-5; at 1e-3 GRPO 0.58 -> 0.93, DAPO 0.59 -> 0.94,
    # Dr. GRPO 0.58 -> 0.92, GSPO 0.66 -> 0.98, RLOO 0.58 -> 0.93, REINFORCE++ 0.58 -> 0.91.)
    "policy-gradient": Plan(
        (("reward", "up"),), margin=0.1, data="successor.jsonl", extra=("--max_completion_length", "4", "--num_generations", "8", "--soft_punish_cache", "2"),
        inputs=(("--model_name_or_path", "successor"),), verified=True, **_RL_RATES,
    ),
    # ReMax samples one completion per prompt (plus a greedy baseline): 64 prompts a step give it the group
    # methods' 64 samples; with 8 its reward is too noisy to judge (tiny at 1e-3: 0.67 -> 0.70 with 8,
    # 0.64 -> 0.92 with 64).
    "remax": Plan(
        (("reward", "up"),), margin=0.1, data="successor.jsonl", extra=("--max_completion_length", "4", "--per_device_train_batch_size", "64"),
        inputs=(("--model_name_or_path", "successor"),), verified=True, **_RL_RATES,
    ),
    # The reward model's score of the polite policy's samples (rude ones score about -5): PPO raises it
    # (tiny: -0.69 -> 0.92; 0.02 -> 4.59 at 1e-3).
    "ppo": Plan(
        (("score", "up"),), margin=0.5, data="preference.jsonl", extra=("--max_completion_length", "16", "--missing_eos_penalty", "5", "--num_mini_batches", "2"),
        inputs=_POLITE_INPUTS, verified=True, **_RL_RATES,
    ),
    # Online DPO ranks two samples per prompt with the reward model; the score of its samples must rise
    # (tiny: -1.36 -> 0.76; -0.62 -> 5.55 at 1e-3).
    "online-dpo": Plan(
        (("score", "up"),), margin=0.5, data="preference.jsonl", extra=("--max_new_tokens", "16", "--missing_eos_penalty", "5"), inputs=_POLITE_INPUTS,
        verified=True, **_RL_RATES,
    ),
    # Self-rewarding (iterative-dpo, the row of the family's other methods too): the polite policy judges its
    # own samples with the short judge prompt it was trained on; one round of DPO on the best-vs-worst pairs
    # opens the implicit reward margin from 0 (tiny: 0.001 -> 0.045, short of the margin; 0.02 -> 6.49 at 1e-3).
    "online-preference": Plan(
        (("rewards/margin", "up"),), margin=0.1, data="preference.jsonl", extra=("--max_new_tokens", "16", "--num_rounds", "1", "--judge_template", SELF_JUDGE_TEMPLATE),
        inputs=(("--model_name_or_path", "polite"),), verified=True, **_RL_RATES,
    ),
    # RLAIF with the random-init model as labeller: its preferences sit at 1/2, so the soft-label loss stays
    # at log 2 (tiny: 0.693 -> 0.693). This row only checks that the pipeline runs with finite numbers.
    "rlaif": Plan(
        (("loss", "none"),), margin=0.0, data="preference.jsonl", extra=("--max_new_tokens", "16"), inputs=(("--model_name_or_path", "polite"), ("--judge_model", BASE)),
        verified=True, **_RL_RATES,
    ),
    # SPIN, one round: the chat data's replies vs the model's own generations, an easy distinction for a
    # random-init model; the margin opens from 0, the opponent being the round's start (tiny: 0.001 -> 0.145).
    "spin": Plan((("rewards/margin", "up"),), margin=0.1, extra=("--num_rounds", "1", "--max_new_tokens", "32"), verified=True, **_RL_RATES),
    # On-policy distillation (generalized JSD) to the helper teacher: falls as the student matches it
    # (tiny: 0.426 -> 0.355).
    "gkd": Plan((("loss", "down"),), margin=0.05, extra=("--max_new_tokens", "32"), inputs=(("--teacher_model", "teacher"),), verified=True),
    # Test-time scaling trains nothing: accuracy.json's rows, smallest budget first. With the solver and the
    # answer verifier, best-of-N accuracy is coverage and majority voting gains from more samples
    # (tiny, accuracy at budget 1 -> 8: best-of-N 0.48 -> 0.98, self-consistency 0.69 -> 0.83).
    "inference": Plan(
        (("accuracy", "up"),), margin=0.05, data="sums.jsonl", extra=("--max_new_tokens", "48", "--max_prompts", "64", "--n", "8", "--num_samples", "8"),
        inputs=(("--model_name_or_path", "solver"),), verified=True,
    ),
    # PRM beam search with the helper PRM, 2 then 8 beams. A PRM this weak scores beams almost alike, so the
    # weighted vote is close to a majority vote and gains from more beams as self-consistency does
    # (tiny: 0.63 -> 0.81).
    "prm-beam-search": Plan(
        (("accuracy", "up"),), margin=0.05, data="sums.jsonl", extra=("--max_new_tokens", "48", "--max_prompts", "64", "--num_beams", "8", "--beam_width", "2", "--sweep", "2,8"),
        inputs=(("--model_name_or_path", "solver"), ("--prm_path", "prm")), verified=True,
    ),
}


def plan_for(kb, method: str) -> Plan:
    """The method's own row if it has one, else its family's."""
    return PLANS.get(method) or PLANS[kb.methods[method].record.script.family]
