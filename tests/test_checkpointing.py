"""`model_options.gradient_checkpointing` in the RL loop: the policy epochs run in train mode with
every dropout probability 0, so transformers recomputes activations in the backward pass and the
update is the one without checkpointing."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.models import no_dropout
from alignment.stages import rl

from .test_ppo import recipe_for


def test_no_dropout_makes_train_mode_compute_what_eval_mode_does():
    """Llama copies `attention_dropout` into its attention modules when built and applies it in train
    mode only; LoRA adds dropout modules. After no_dropout, a train-mode forward is the eval one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         attention_dropout=0.5, attn_implementation="eager")

    def build():
        torch.manual_seed(0)
        return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))

    ids = torch.randint(0, 50, (2, 12))
    model = build()
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        assert not torch.equal(model.train()(input_ids=ids).logits, want)  # dropout was live in train mode
    model = no_dropout(build())
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model.train()(input_ids=ids).logits, want)


def one_update(tiny_base, reward_dir, checkpointing: bool):
    """A first rollout and its policy epochs; returns the trained weights and how often the policy's
    and the critic's first MLP ran during the epochs."""
    recipe = recipe_for(tiny_base, reward_dir, f"model_options.gradient_checkpointing={str(checkpointing).lower()}")
    torch.manual_seed(0)
    m = rl.build_models(recipe, {"model": str(tiny_base), "reward_model": str(reward_dir)}, print)
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    optimizer, scheduler = rl.prepare_training(m, accelerator, recipe)
    prompts, rendered, *_ = rl.load_prompts(recipe, m.tok)
    torch.manual_seed(0)
    r = rl.rollout(m, accelerator, rendered[:8], prompts[:8], recipe, {"generation": 0.0, "scoring": 0.0})
    saved = saved_bytes(m, r, recipe)
    calls = {"policy": 0, "critic": 0}
    mlps = {"policy": m.policy.model.layers[0].mlp, "critic": m.critic.classifier.model.layers[0].mlp}
    for name, mlp in mlps.items():  # forward itself is counted: module hooks do not fire in the recomputation
        def counted(*args, _forward=mlp.forward, _name=name, **kwargs):
            calls[_name] += 1
            return _forward(*args, **kwargs)

        mlp.forward = counted
    stats, *_ = rl.learn(m, accelerator, optimizer, scheduler, r, 0.05, recipe, 0)
    assert not m.policy.training and not m.critic.training  # back in eval mode for the next rollout
    weights = {f"{k}.{n}": p.detach().clone() for k, model in (("policy", m.policy), ("critic", m.critic))
               for n, p in model.named_parameters()}
    return weights, calls, stats, recipe, saved


def saved_bytes(m, r, recipe) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one policy forward in train mode
    (those a checkpointed layer would keep are recomputed instead)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with rl.train_mode([m.policy]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rl.reply_logprobs(m.policy, r, recipe.rl.temperature)
    return total


def test_gradient_checkpointing_recomputes_in_the_update_and_changes_nothing(tiny_base, reward_dir):
    plain, plain_calls, plain_stats, recipe, plain_saved = one_update(tiny_base, reward_dir, False)
    ckpt, ckpt_calls, ckpt_stats, _, ckpt_saved = one_update(tiny_base, reward_dir, True)
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)
    steps = recipe.rl.ppo_epochs * recipe.rl.num_minibatches * recipe.training.gradient_accumulation_steps
    assert plain_calls == {"policy": steps, "critic": steps}  # one forward per micro-batch
    assert ckpt_calls == {"policy": 2 * steps, "critic": 2 * steps}  # and its recomputation in the backward pass
    assert ckpt_stats["policy/ratio_first_minibatch"] == 1.0
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=0), name
