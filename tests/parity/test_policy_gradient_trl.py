"""Parity with TRL 1.16: GRPOTrainer (loss types grpo, bnpo, dr_grpo, dapo; sequence-level importance sampling
for GSPO) and RLOOTrainer, driven as they are, on the same tiny model and the same rollout batch as our
emitted scripts' compute_loss. Advantages are compared through TRL's own _generate_and_score_completions with
a reward function that returns fixed rewards.

How the two sides meet:
- Both load the embedded tiny model from the same directory (identical weights). TRL's trainer is left in
  eval mode, where its loss is the plain per-micro-batch value (no division by gradient-accumulation steps);
  ours is compute_loss's sum divided by the micro-batch's count, which is what the training loop does for a
  step made of this one micro-batch.
- Prompts have equal lengths: TRL scores left-padded prompts without position ids, our scripts right-pad
  (tests/test_rollout_rewards.py checks our scores against generation); the completions are ragged.
- TRL 1.16's GRPOConfig defaults to use_bias_correction_kl=True (the k3 KL multiplied by the importance
  ratio, after DeepSeek-V3.2), which is not GRPO's Eq. 3; the comparison sets it to False.
- TRL has no REINFORCE++ or ReMax trainer, and its GRPOTrainer has no dynamic sampling or overlong reward
  shaping (DAPO's are tested against the paper in tests/losses); those are not compared here.

Tolerance: losses 1e-5 relative, parameter gradients 1e-4 relative to their largest entry (float32, CPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compile_script, load_script_module

pytestmark = pytest.mark.parity

B, G, P, C = 8, 4, 6, 7


@pytest.fixture(scope="module")
def scripts(kb, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pg-parity")

    def load(method: str, overrides: list[str] | None = None):
        name = f"{method}_{'_'.join(o.replace('=', '-') for o in overrides or [])}".replace("-", "_")
        path = directory / f"train_{name}.py"
        path.write_text(compile_script(kb, method, overrides=overrides))
        return load_script_module(path, name=f"parity_{name}")

    return load


def rollout_batch(seed: int, vocab: int = 500):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    lengths[0] = C
    mask = (torch.arange(C)[None, :] < lengths[:, None]).long()
    return {
        "prompt_ids": torch.randint(10, vocab, (B, P), generator=g),
        "completion_ids": torch.randint(10, vocab, (B, C), generator=g),
        "completion_mask": mask,
        "advantages": torch.randn(B, generator=g),
        "old": (-6 + 0.3 * torch.randn(B, C, generator=g)) * mask,
        "ref": (-6 + 0.5 * torch.randn(B, C, generator=g)) * mask,
        "lengths": lengths.tolist(),
    }


def load_tiny_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)


def our_loss(module, tiny, data, argv, old_logps_from_model=False):
    """compute_loss of an emitted script on `data`, divided by the micro-batch's count as the loop does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = load_tiny_model(tiny)
    args = module.parse_args(argv)
    samples = []
    for i, n in enumerate(data["lengths"]):
        samples.append({
            "prompt_ids": data["prompt_ids"][i].tolist(), "completion_ids": data["completion_ids"][i, :n].tolist(), "truncated": False,
            "advantage": float(data["advantages"][i]), "old_logps": data["old"][i, :n].tolist(), "ref_logps": data["ref"][i, :n].tolist() if getattr(args, "beta", 0) > 0 else None,
        })
    batch = module.collate(samples, tokenizer, args, torch.device("cpu"))
    loss_sum, _ = module.compute_loss(model, batch, args, {})
    loss = loss_sum / batch["num_items"]
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def trl_inputs(data, with_ref: bool):
    inputs = {
        "prompt_ids": data["prompt_ids"], "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": data["completion_ids"], "completion_mask": data["completion_mask"],
        "advantages": data["advantages"], "old_per_token_logps": data["old"].float(),
        "num_items_in_batch": data["completion_mask"].sum().float(),
    }
    if with_ref:
        inputs["ref_per_token_logps"] = data["ref"].float()
    return inputs


def grpo_trainer(tiny, tmp_path, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, num_generations=G, max_completion_length=C,
        report_to="none", use_cpu=True, bf16=False, temperature=1.0,
        # TRL 1.16 multiplies the KL term by the importance ratio by default (DeepSeek-V3.2's correction); the
        # papers' objectives (GRPO Eq. 3) do not, so parity is with TRL's paper-matching setting.
        use_bias_correction_kl=False, **config,
    )
    dataset = Dataset.from_list([{"prompt": "What is 1 plus 1?"}] * B)
    return GRPOTrainer(model=str(tiny / "model"), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args, train_dataset=dataset)


def trl_loss(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def assert_same(ours, theirs):
    (loss, grads), (trl_value, trl_grads) = ours, theirs
    assert math.isclose(loss, trl_value, rel_tol=1e-5, abs_tol=1e-7), (loss, trl_value)
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        scale = max(trl_grads[name].abs().max().item(), 1e-8)
        assert (grads[name] - trl_grads[name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_types_match_trl(scripts, tiny, tmp_path, loss_type, beta):
    module = scripts("grpo", [f"loss_type={loss_type}"])
    trainer = grpo_trainer(tiny, tmp_path, loss_type=loss_type, beta=beta, epsilon=0.2)
    for seed in range(2):
        data = rollout_batch(seed)
        argv = ["--beta", str(beta), "--epsilon", "0.2", "--max_completion_length", str(C), "--loss_type", loss_type]
        assert_same(our_loss(module, tiny, data, argv), trl_loss(trainer, trl_inputs(data, beta > 0)))


def test_dr_grpo_matches_trl(scripts, tiny, tmp_path):
    module = scripts("dr-grpo")
    trainer = grpo_trainer(tiny, tmp_path, loss_type="dr_grpo", beta=0.0, epsilon=0.2, scale_rewards="none")
    data = rollout_batch(3)
    assert_same(our_loss(module, tiny, data, ["--max_completion_length", str(C)]), trl_loss(trainer, trl_inputs(data, False)))


def test_dapo_clip_higher_token_loss_matches_trl(scripts, tiny, tmp_path):
    module = scripts("dapo")
    trainer = grpo_trainer(tiny, tmp_path, loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28)
    data = rollout_batch(4)
    assert_same(our_loss(module, tiny, data, ["--max_completion_length", str(C)]), trl_loss(trainer, trl_inputs(data, False)))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_matches_trl_sequence_importance_sampling(scripts, tiny, tmp_path, beta):
    module = scripts("gspo")
    trainer = grpo_trainer(tiny, tmp_path, loss_type="grpo", importance_sampling_level="sequence", beta=beta, epsilon=3e-4, epsilon_high=4e-4)
    for seed in range(2):
        data = rollout_batch(10 + seed)
        # π_old within the narrow clip range for some completions and outside it for others
        data["old"] = data["old"] * 0  # replaced below by the model's own scores plus small noise
        from transformers import AutoTokenizer

        scored = module.score_tokens(
            load_tiny_model(tiny), data["prompt_ids"].tolist(), [data["completion_ids"][i, :n].tolist() for i, n in enumerate(data["lengths"])],
            temperature=1.0, pad_id=AutoTokenizer.from_pretrained(tiny / "model").pad_token_id, accelerator=_CPU(), batch_size=B,
        )
        noise = torch.randn(B, C, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1e-5, 1e-2] * (B // 2))[:, None]
        for i, n in enumerate(data["lengths"]):
            data["old"][i, :n] = torch.tensor(scored[i]) + noise[i, :n]
        argv = ["--beta", str(beta), "--max_completion_length", str(C)]
        assert_same(our_loss(module, tiny, data, argv), trl_loss(trainer, trl_inputs(data, beta > 0)))


class _CPU:
    device = torch.device("cpu")

    @staticmethod
    def autocast():
        from contextlib import nullcontext

        return nullcontext()


def test_rloo_loss_matches_trl(scripts, tiny, tmp_path):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    module = scripts("rloo")
    args = RLOOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, num_generations=G, max_completion_length=C, report_to="none", use_cpu=True, bf16=False, epsilon=0.2)
    trainer = RLOOTrainer(model=str(tiny / "model"), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args, train_dataset=Dataset.from_list([{"prompt": "Hi"}] * B))
    for seed in range(2):
        data = rollout_batch(20 + seed)
        data["old"] = data["old"] / 10  # sequence ratios of several sizes around 1, some clipped
        inputs = trl_inputs(data, False)
        inputs["old_logps"] = data["old"].sum(-1).float()
        assert_same(our_loss(module, tiny, data, ["--beta", "0", "--max_completion_length", str(C)]), trl_loss(trainer, inputs))


def fixed_reward_trainer(tiny, tmp_path, trainer_cls, config_cls, rewards, **config):
    from datasets import Dataset

    args = config_cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rewards), num_generations=G, max_completion_length=3, report_to="none", use_cpu=True, bf16=False, **config)

    def reward(completions, **kw):
        return list(rewards)

    return trainer_cls(model=str(tiny / "model"), reward_funcs=reward, args=args, train_dataset=Dataset.from_list([{"prompt": "Hi"}] * len(rewards)))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scripts, tiny, tmp_path, scale_rewards):
    from trl import GRPOConfig, GRPOTrainer

    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 2.0, 1.0]
    trainer = fixed_reward_trainer(tiny, tmp_path, GRPOTrainer, GRPOConfig, rewards, scale_rewards=scale_rewards, beta=0.0)
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": "Hi"} for _ in rewards])
    ours = scripts("grpo").group_advantages(rewards, G, scale_rewards)
    assert torch.allclose(output["advantages"].double(), torch.tensor(ours, dtype=torch.float64), atol=1e-6), (output["advantages"], ours)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(scripts, tiny, tmp_path, normalize):
    from trl import RLOOConfig, RLOOTrainer

    rewards = [1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.7, 0.0, 0.0, 0.0, 0.0]
    trainer = fixed_reward_trainer(tiny, tmp_path, RLOOTrainer, RLOOConfig, rewards, beta=0.0, normalize_advantages=normalize)
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": "Hi"} for _ in rewards])
    ours = scripts("rloo").rloo_advantages(rewards, [0.0] * len(rewards), G, 0.0, normalize)
    assert torch.allclose(output["advantages"].double(), torch.tensor(ours, dtype=torch.float64), atol=1e-5), (output["advantages"], ours)
