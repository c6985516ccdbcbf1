"""Policy-gradient family (grpo, dapo, dr-grpo, gspo, rloo, reinforce-pp, remax): each generated script raises
the sampled reward of a warm-started tiny policy on the bundled successor task; one big batch, gradient
accumulation and two data-parallel processes give the same run (generation included); a resumed run samples
and trains exactly as the uninterrupted one.

The task and the warm start are described in tests/pg_helpers.py. Reward = 1 for the right digit, else 0,
read from the completion by the script's own verifier (`--reward math`, answer format plain).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from conftest import mean, read_metrics, run_script, tiny_args, generated_script, FAST, train_tiny
from pg_helpers import pg_args, warm_start

# Per method: flags for a ~20-step CPU run and the least gain in mean sampled reward it must show
# (mean of the last 5 steps minus mean of the first 3) and the level it must reach (mean of the last 5).
LEARNING = {
    "grpo": (["--num_generations", "8", "--per_device_train_batch_size", "8"], 0.15, 0.7),
    "dapo": (["--num_generations", "8", "--per_device_train_batch_size", "8", "--soft_punish_cache", "2"], 0.15, 0.7),
    "dr-grpo": (["--num_generations", "8", "--per_device_train_batch_size", "8"], 0.15, 0.7),
    "gspo": (["--num_generations", "8", "--per_device_train_batch_size", "4", "--steps_per_generation", "2"], 0.15, 0.7),
    "rloo": (["--num_generations", "4", "--per_device_train_batch_size", "16"], 0.15, 0.7),
    "reinforce-pp": (["--per_device_train_batch_size", "32"], 0.1, 0.7),
    "remax": (["--per_device_train_batch_size", "32"], 0.08, 0.65),
}


@pytest.fixture(scope="module")
def warm(tiny, tmp_path_factory):
    return warm_start(tiny, tmp_path_factory.mktemp("warm") / "policy")


@pytest.mark.parametrize("method", sorted(LEARNING))
def test_sampled_reward_rises(kb, tiny, warm, tmp_path, method):
    flags, gain, level = LEARNING[method]
    metrics = train_tiny(kb, method, tiny, tmp_path, pg_args(warm, tiny) + ["--max_steps", "20", "--learning_rate", "1e-3"] + flags)
    rewards = [m["reward"] for m in metrics]
    assert len(rewards) == 20
    start, end = mean(rewards[:3]), mean(rewards[-5:])
    seconds = sum(m["step_seconds"] for m in metrics)
    print(f"{method}: reward {start:.3f} -> {end:.3f} over 20 steps ({seconds:.1f} s): {[round(r, 2) for r in rewards]}")
    if os.environ.get("PG_CURVES"):  # where to append the curve (for reports); unset in normal runs
        with open(os.environ["PG_CURVES"], "a") as handle:
            handle.write(json.dumps({"method": method, "start": start, "end": end, "seconds": seconds, "rewards": rewards}) + "\n")
    assert 0.3 < start < 0.65, rewards  # the warm start samples the right answer about half the time
    assert end >= start + gain, rewards
    assert end >= level, rewards
    assert all(math.isfinite(m["loss"]) for m in metrics)


# Each exactness run exercises its method's distinctive machinery: grpo with μ = 2 (old log-probs), two optimizer
# steps per rollout batch (the minibatch split across processes) and the k3 KL to a reference; dapo with
# dynamic sampling (refill waves, groups moved between processes) and the token-level mean; reinforce-pp with
# the KL-shaped token returns and the global-batch normalisation.
EXACTNESS = {
    "grpo": ["--num_generations", "4", "--num_iterations", "2", "--steps_per_generation", "2", "--beta", "0.04"],
    "dapo": ["--num_generations", "4", "--soft_punish_cache", "2"],
    "reinforce-pp": ["--num_generations", "2", "--group_baseline", "true", "--beta", "0.05"],
}


@pytest.mark.parametrize("method", sorted(EXACTNESS))
def test_accumulation_and_data_parallel_equal_one_big_batch(kb, tiny, warm, tmp_path, method):
    """Global batch of 8 prompts per optimizer step (16 per rollout step for grpo): 1 process x 8; 1 process x 4 x accumulation 2; 2 processes
    x 4 (gloo). Completions are drawn from per-completion streams, so all three sample the same completions;
    rewards must match exactly, losses and gradient norms to 1e-4 relative (float32 sums in another order)."""
    common = pg_args(warm, tiny) + ["--max_steps", "3", "--learning_rate", "1e-3"] + EXACTNESS[method]
    big = train_tiny(kb, method, tiny, tmp_path, common, name="big")
    accumulated = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], name="accumulated")
    parallel = train_tiny(kb, method, tiny, tmp_path, common + ["--per_device_train_batch_size", "4"], processes=2, name="parallel")
    # Gradients that are always 0 would prove nothing. (REINFORCE++'s loss value is 0 by construction at the
    # first update: its advantages are centred over the batch and the ratio is 1; its gradient is not.)
    assert all(m["grad_norm"] > 1e-3 for m in big), big
    for run in (accumulated, parallel):
        assert len(run) == len(big) == 3
        for a, b in zip(big, run):
            assert a["reward"] == b["reward"], (big, run)
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4, abs_tol=1e-6), (big, run)
            assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (big, run)
            if "dynamic_sampling/waves" in a:
                assert a["dynamic_sampling/waves"] == b["dynamic_sampling/waves"]


def test_resume_samples_and_trains_exactly_as_the_uninterrupted_run(kb, tiny, warm, tmp_path):
    """DAPO with μ = 2 and dynamic sampling: after resuming from checkpoint-2 the run draws the same prompts,
    refill waves and completions, and makes the same updates, as the run that never stopped."""
    method, flags = "dapo", ["--num_generations", "4", "--soft_punish_cache", "2", "--num_iterations", "2"]
    script = generated_script(method)
    base = tiny_args(kb, method, tiny) + FAST + pg_args(warm, tiny) + ["--max_steps", "4", "--learning_rate", "1e-3"] + flags
    run_script(script, base + ["--output_dir", str(tmp_path / "full"), "--save_steps", "2"], cwd=tmp_path)
    full = read_metrics(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-2").is_dir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_script(script, base + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"], cwd=tmp_path)
    resumed = read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"], (full, resumed)
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6, abs_tol=1e-7), (full, resumed)
