"""Defaults for real checkpoints: the schema's defaults fit a 0.5-8B model and real data; the demo recipes
set the demo's own values; a recipe whose policy is the user's checkpoint never plans the demo chain's
reward model."""

from __future__ import annotations

import json

import pytest

from alignment.recipe_file import load_recipe, parse_override
from alignment.errors import RecipeError
from alignment.models import load_tokenizer
from alignment.pipeline import plan
from alignment.stages import rl

from .conftest import RECIPES


def recipe(name: str, *overrides: str):
    return load_recipe(RECIPES / name, [(p, v, raw) for raw in overrides for _, p, v in [parse_override(raw)]])


def test_a_users_policy_is_not_given_the_demo_chains_reward_model(in_tmp):
    with pytest.raises(RecipeError) as caught:
        plan(RECIPES / "ppo.yaml", ["model=/data/my-sft"])
    line = str(caught.value)
    assert "\n" not in line and "reward_model: {from: reward.yaml} is the demo chain's reward model" in line
    assert "'/data/my-sft'" in line and "reward:model=YOUR_SFT" in line and "reward_model=null" in line
    for stage in ("grpo.yaml", "rloo.yaml"):  # grpo's demo reward is a function: nothing to refuse
        overrides = ["model=/data/my-sft"] + (["reward_model={from: reward.yaml}"] if stage == "grpo.yaml" else [])
        with pytest.raises(RecipeError, match="demo chain's reward model"):
            plan(RECIPES / stage, overrides)


@pytest.mark.parametrize("overrides, planned", [
    ([], ["init", "pretrain", "sft", "reward", "ppo"]),  # the demo chain, policy and reward model alike
    (["model=/data/my-sft", "reward:model=/data/my-sft"], ["reward", "ppo"]),  # a reward model trained for it
    (["model=/data/my-sft", "reward_model=/data/my-rm"], ["ppo"]),
    (["model=/data/my-sft", "reward_model=null", "reward_fn=gold"], ["ppo"]),
])
def test_reward_models_that_fit_the_policy_are_planned(in_tmp, overrides, planned):
    assert [node.name for node in plan(RECIPES / "ppo.yaml", overrides)] == planned


def test_the_demo_recipes_set_the_demo_values_the_schema_does_not():
    for name in ("ppo.yaml", "grpo.yaml", "rloo.yaml"):
        r = recipe(name)
        assert r.rl.response_length == 24 and r.data.num_examples == 2000 and r.training.learning_rate > 1e-5
        assert type(r.rl)().response_length == 512 and type(r.data)(source="prompts.jsonl").num_examples is None
    for name in ("sft.yaml", "reward.yaml", "dpo.yaml", "pretrain.yaml"):
        r = recipe(name)
        assert r.training.max_length == 64 and r.training.learning_rate >= 2e-4
        assert type(r.training)().max_length == 1024
    assert recipe("dpo.yaml").training.learning_rate == 2e-4 and type(recipe("dpo.yaml").training)().learning_rate == 1e-6
    assert recipe("compare.yaml").generation.max_new_tokens == 24


def test_every_prompt_of_a_file_is_kept_long_ones_included(in_tmp, tiny_base):
    """RL prompts from a file: all rows (no cut at the demo's 2000), and a prompt of a few hundred tokens
    after the template is not dropped (the demo's limit was 64)."""
    rows = [{"prompt": f"first: pen car red star {i}"} for i in range(2100)] + [{"prompt": "spell: " + "pen " * 150}]
    (in_tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = recipe("ppo.yaml", "data.source=prompts.jsonl", "data.num_examples=null", f"model={tiny_base}",
               "reward_model=null", "reward_fn=gold")
    tok = load_tokenizer(str(tiny_base))
    prompts, rendered, counts, _ = rl.load_prompts(r, tok)
    assert len(prompts) == len(rows) and counts == {"prompts": len(rows)}
    assert len(tok(rendered[-1], add_special_tokens=False)["input_ids"]) > 64
