"""The model/tokenizer layer: pad tokens, chat template, LoRA, classifiers, saving."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from alignment.config import LoraOptions, ModelOptions
from alignment.errors import RecipeError
from alignment.demo import world
from alignment.models import (
    DEFAULT_CHAT_TEMPLATE,
    apply_lora,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    save_model,
)

import pytest


def test_pad_token_is_set_and_distinct_from_eos(tiny_base, tmp_path):
    tok = load_tokenizer(str(tiny_base))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id

    # A tokenizer that pads with EOS (as many hub checkpoints do) gets its own pad token,
    # and the model grows its embeddings to hold it.
    bad = load_tokenizer(str(tiny_base))
    bad.pad_token = bad.eos_token
    bad.save_pretrained(tmp_path)
    LlamaForCausalLM.from_pretrained(tiny_base).save_pretrained(tmp_path)
    fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token != fixed.eos_token and fixed.pad_token_id != fixed.eos_token_id
    model = load_causal_lm(str(tmp_path), fixed)
    assert model.get_input_embeddings().num_embeddings >= len(fixed)
    assert model.config.pad_token_id == fixed.pad_token_id


def test_default_chat_template_renders_and_marks_assistant_tokens(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = world.sft_conversations(1, 0)[0]["messages"]
    text = tok.apply_chat_template(messages, tokenize=False)
    # The same text as the pretraining corpus renders, plus EOS closing the assistant turn.
    assert text == world.render_exchange(messages[0]["content"], messages[1]["content"]) + tok.eos_token
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    answer = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert answer == messages[1]["content"] + tok.eos_token
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(world.ASSISTANT_TAG + "\n")


def test_lora_wraps_trains_only_adapters_and_merges(tiny_base, tmp_path):
    tok = load_tokenizer(str(tiny_base))
    model = load_causal_lm(str(tiny_base), tok)
    peft_model = apply_lora(model, LoraOptions(r=4, alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in peft_model.named_parameters():  # make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([tok("repeat: cat dog")["input_ids"]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    save_model(peft_model, tok, tmp_path, LoraOptions(r=4, alpha=8, merge_on_save=True))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)  # no peft needed to load it
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_classifier_has_one_label_and_scores_at_last_real_token(tiny_base, side):
    """The short text is padded (after it, or before it): its score is the one it gets alone."""
    tok = load_tokenizer(str(tiny_base), padding_side=side)
    clf = load_classifier(str(tiny_base), tok)
    torch.nn.init.normal_(clf.score.weight, std=1.0)  # a head that reads every hidden unit
    assert clf.config.num_labels == 1 and clf.config.pad_token_id == tok.pad_token_id
    batch = tok(["repeat: cat dog", "first: cat dog sun fish"], padding=True, return_tensors="pt")
    pads = (batch["input_ids"][0] == tok.pad_token_id).nonzero().flatten().tolist()
    assert pads and (pads[0] == 0) == (side == "left")  # it really is padded on that side
    with torch.no_grad():
        both = clf(**batch).logits
        alone = clf(**tok(["repeat: cat dog", "first: cat dog sun fish"][:1], return_tensors="pt")).logits
        longer = clf(**tok(["first: cat dog sun fish"], return_tensors="pt")).logits
    assert both.shape == (2, 1)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], longer[0], atol=1e-5, rtol=1e-5)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(RecipeError, match="not a local directory"):
        load_tokenizer("nobody-here/no-such-model-xyz")


def test_dtype_and_gradient_checkpointing_options(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = load_causal_lm(str(tiny_base), tok, ModelOptions(dtype="bfloat16", gradient_checkpointing=True))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing


def test_custom_chat_template_from_recipe(tiny_base, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(str(tiny_base), ModelOptions(chat_template=str(template)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi"


def test_causal_lm_whose_weights_do_not_match_config_json_is_named_not_a_traceback(tiny_base, tmp_path):
    # `alignment compare` loads its models here directly (no plan-time check before it).
    import json
    import shutil

    bad = tmp_path / "mismatch"
    shutil.copytree(tiny_base, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    tok = load_tokenizer(str(tiny_base))
    with pytest.raises(RecipeError) as caught:
        load_causal_lm(str(bad), tok, key="b")
    line = str(caught.value)
    assert line.startswith(f"b: {bad / 'model.safetensors'}: tensor 'model.layers.0.mlp."), line
    assert line.endswith("the weights do not match config.json") and "\n" not in line, line


def test_tokenizer_whose_own_chat_template_does_not_compile_names_its_file(tiny_base, tmp_path):
    import shutil

    bad = tmp_path / "badtemplate"
    shutil.copytree(tiny_base, bad)
    (bad / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(RecipeError, match=r"badtemplate/chat_template\.jinja: the tokenizer's chat_template does not compile, "
                       r"Jinja syntax error on line 1"):
        load_tokenizer(str(bad))
    # a recipe's own template replaces it, so the run can go on
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(str(bad), ModelOptions(chat_template=str(good)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi"


def test_the_private_template_compiler_the_check_uses_is_there():
    """config.template_problem compiles with transformers' private `_compile_jinja_template`, which knows
    the `{% generation %}` tag; without it the check is skipped. Pinned here, so that a transformers release
    that moves it fails this test instead of turning the check off unseen."""
    from alignment.config import template_problem
    from transformers.utils.chat_template_utils import _compile_jinja_template  # noqa: F401

    assert "does not compile" in template_problem("{% for m in messages %}{{ m.content }")
    assert template_problem("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}") is None
