"""A reward model whose tokenizer or chat template differs from the policy's: the exchange is
re-rendered in the reward model's template, and a reply cut off at the length limit stays open there
(no EOS after it), as it is in the sampled ids."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from alignment.templates import render_prompt, reward_ids, reward_text
from alignment.models import DEFAULT_CHAT_TEMPLATE, load_classifier, load_tokenizer, same_tokenizer
from alignment.stages import rl

from .test_ppo import recipe_for

OTHER_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace("<|assistant|>", "<|bot|>")


def test_same_tokenizer_compares_chat_templates(tiny_base):
    a, b = load_tokenizer(str(tiny_base)), load_tokenizer(str(tiny_base))
    assert same_tokenizer(a, b)
    b.chat_template = OTHER_TEMPLATE
    assert not same_tokenizer(a, b)


def test_unfinished_reply_is_rendered_without_closing_eos(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    tok.chat_template = OTHER_TEMPLATE
    done, cut = reward_text(tok, "hi", "a b", finished=True), reward_text(tok, "hi", "a b", finished=False)
    assert done == cut + tok.eos_token
    assert cut == render_prompt(tok, "hi") + "a b"


@pytest.fixture
def other_template_rm(tmp_path, tiny_base):
    """A reward model with the policy's vocabulary but another chat template."""
    tok = load_tokenizer(str(tiny_base))
    tok.chat_template = OTHER_TEMPLATE
    torch.manual_seed(1)
    model = load_classifier(str(tiny_base), tok)
    with torch.no_grad():
        model.score.weight.mul_(30)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_reward_model_with_another_template_sees_truncation(tiny_base, other_template_rm, capsys):
    recipe = recipe_for(tiny_base, other_template_rm, "ppo.response_length=3")
    m = rl.build_models(recipe, {"model": str(tiny_base), "reward_model": str(other_template_rm)}, print)
    assert "tokenizer differs from the policy's" in capsys.readouterr().out
    rm_tok = m.rewards.reward_tok
    assert rm_tok is not None and rm_tok.chat_template == OTHER_TEMPLATE
    prompts, rendered, *_ = rl.load_prompts(recipe, m.tok)
    AcceleratorState._reset_state()
    torch.manual_seed(0)
    r = rl.rollout(m, Accelerator(cpu=True), rendered[:8], prompts[:8], recipe, {"generation": 0.0, "scoring": 0.0})
    assert not r.finished.all()  # 3 tokens: some replies are cut off
    for i in range(8):
        reply = m.tok.decode(r.response_ids[i, : r.response_mask[i].sum() - r.finished[i].long()], skip_special_tokens=True)
        ids = reward_ids(rm_tok, prompts[i], reply, finished=bool(r.finished[i]))
        assert (ids[-1] == rm_tok.eos_token_id) == bool(r.finished[i])
        with torch.no_grad():
            expected = m.rewards.reward_model(torch.tensor([ids])).logits[0, 0]
        assert r.sources["reward_model"][i].item() == pytest.approx(expected.item(), abs=1e-5)
