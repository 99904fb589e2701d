"""The RL loop under mixed precision (bf16 autocast on a CPU): policy and frozen reference agree
exactly while their weights are equal, the first minibatch's ratio is exactly 1, a LoRA policy
samples from the distribution its log-probs describe, and a chain may change precision between
stages."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from alignment.generation import response_logits
from alignment.stages import rl

from .test_ppo import recipe_for


@pytest.fixture(autouse=True)
def fresh_state_after():
    yield
    AcceleratorState._reset_state()  # later tests' Accelerator(cpu=True) would otherwise inherit bf16


def bf16_accelerator() -> Accelerator:
    """A bf16 accelerator in a process whose accelerate state other tests may have fixed to fp32
    (the pipeline starts every stage with a fresh state the same way)."""
    AcceleratorState._reset_state()
    return Accelerator(cpu=True, mixed_precision="bf16")


def first_rollout(recipe, inputs, accelerator, n=8, adjust=None):
    m = rl.build_models(recipe, inputs, print)
    if adjust:
        adjust(m)
    optimizer, scheduler = rl.prepare_training(m, accelerator, recipe)
    prompts, rendered, *_ = rl.load_prompts(recipe, m.tok)
    torch.manual_seed(0)
    r = rl.rollout(m, accelerator, rendered[:n], prompts[:n], recipe, {"generation": 0.0, "scoring": 0.0})
    return m, optimizer, scheduler, r


def test_bf16_first_rollout_has_exactly_zero_kl_and_ratio_one(tiny_base, reward_dir):
    """Frozen-copy reference (no LoRA): the reference is only moved to the device, not prepared, yet
    its log-probs equal the policy's bit for bit under bf16, and so the KL is 0 on every token; the
    first minibatch's new log-probs (under autocast, with gradients) equal the old ones: ratio 1."""
    recipe = recipe_for(tiny_base, reward_dir)
    accelerator = bf16_accelerator()
    m, optimizer, scheduler, r = first_rollout(recipe, {"model": str(tiny_base), "reward_model": str(reward_dir)}, accelerator)
    assert m.reference_kind == "copy"
    assert torch.equal(r.logp, r.ref_logp)
    with torch.no_grad():  # the same forward without autocast differs: bf16 was really in use
        assert not torch.equal(rl.reply_logprobs(m.reference, r, recipe.ppo.temperature), r.ref_logp)
    stats, kl, *_ = rl.learn(m, accelerator, optimizer, scheduler, r, 0.05, recipe, 0)
    assert kl.abs().sum().item() == 0.0
    assert stats["policy/ratio_first_minibatch"] == 1.0 and stats["policy/clipfrac_first_minibatch"] == 0.0


def test_bf16_on_policy_grpo_takes_the_old_log_probs_of_its_update_with_kl_exactly_zero(tiny_base):
    """GRPO on-policy (one pass, one minibatch of two micro-batches): the update's forward gives the
    old log-probs, in other batches than the reference's pass (shared prompts, shuffled rows); under
    bf16 they still equal the reference's bit for bit at the start, so the KL is exactly 0."""
    from .test_grpo import grpo_recipe

    recipe = grpo_recipe(tiny_base, "reward_fn=gold", "grpo.num_iterations=1", "grpo.num_minibatches=1",
                         "training.gradient_accumulation_steps=2")
    accelerator = bf16_accelerator()
    m = rl.build_models(recipe, {"model": str(tiny_base)}, print)
    optimizer, scheduler = rl.prepare_training(m, accelerator, recipe)
    prompts, rendered, *_ = rl.load_prompts(recipe, m.tok)
    mine = [i for i in range(2) for _ in range(4)]  # two groups of four replies
    torch.manual_seed(0)
    r = rl.rollout(m, accelerator, [rendered[i] for i in mine], [prompts[i] for i in mine], recipe,
                    {"generation": 0.0, "scoring": 0.0})
    assert r.logp is None and m.reference_kind == "copy"
    stats, kl, *_ = rl.learn(m, accelerator, optimizer, scheduler, r, 0.04, recipe, 0)
    assert torch.equal(r.logp, r.ref_logp) and kl.abs().sum().item() == 0.0
    assert stats["policy/ratio_first_minibatch"] == 1.0


def test_chain_stages_each_get_their_own_mixed_precision(in_tmp, tiny_base, reward_dir, monkeypatch):
    """A chain whose later stage asks for bf16 after an fp32 one (accelerate's state is one per
    process) runs both, each under the precision its recipe names."""
    import yaml

    from alignment.pipeline import run

    from .test_ppo import MICRO_PPO

    seen = []
    real = rl.Accelerator

    def spy(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        seen.append(accelerator.mixed_precision)
        return accelerator

    monkeypatch.setattr(rl, "Accelerator", spy)
    base = {"stage": "ppo", "reward_model": str(reward_dir), "report": {"models": {}}}
    (in_tmp / "first.yaml").write_text(yaml.safe_dump({**base, "model": str(tiny_base), "training": {"mixed_precision": "no"}}))
    (in_tmp / "second.yaml").write_text(yaml.safe_dump({**base, "model": {"from": "first.yaml"},
                                                        "training": {"mixed_precision": "bf16"}}))
    micro = [f"*:{o}" for o in MICRO_PPO if not o.startswith("report.")]
    nodes = run(in_tmp / "second.yaml", [*micro, "*:ppo.total_episodes=8"])
    assert [n.name for n in nodes] == ["first", "second"] and (in_tmp / "runs" / "second" / "model.safetensors").is_file()
    assert seen == ["no", "bf16"]


def random_adapters(m):
    """Adapters that move the policy far from the tiny base (whose greedy reply repeats one token), so
    that greedy replies vary and some of their tokens are near ties that bf16 rounding decides."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)


def test_bf16_lora_policy_samples_from_the_autocast_distribution(tiny_base, reward_dir, monkeypatch):
    """peft's generate runs the base model's generate, outside the autocast that accelerate wraps
    around the peft model's forward. The rollout samples under the accelerator's autocast, so the
    replies come from the distribution the old log-probs are computed from: greedy replies are the
    argmax of the bf16 logits of the scoring forward at every reply token."""
    recipe = recipe_for(tiny_base, reward_dir, "lora={}", "ppo.response_length=16")
    accelerator = bf16_accelerator()
    real_sample = rl.sample
    monkeypatch.setattr(rl, "sample", lambda *a, **k: real_sample(*a, **{**k, "temperature": 0.0}))
    m, *_, r = first_rollout(recipe, {"model": str(tiny_base), "reward_model": str(reward_dir)}, accelerator, n=16,
                             adjust=random_adapters)
    assert m.reference_kind == "adapters"
    with torch.no_grad(), accelerator.autocast():
        logits = response_logits(m.policy, r.input_ids, r.attention_mask, r.context_length)
    real = r.response_mask.bool()
    assert torch.equal(logits.argmax(-1)[real], r.response_ids[real])
    with torch.no_grad():  # without autocast the argmax differs somewhere: the test can tell them apart
        fp32 = response_logits(m.policy.get_base_model(), r.input_ids, r.attention_mask, r.context_length)
    assert not torch.equal(fp32.argmax(-1)[real], r.response_ids[real])
