"""`generation.sample` draws from softmax(logits / T) whatever the checkpoint's generation
config says, and says which of its settings it did not apply."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignment import generation
from alignment.generation import checkpoint_overrides, sample

WORDS = [f"w{i}" for i in range(40)]
SETTINGS = {"do_sample": True, "no_repeat_ngram_size": 1, "repetition_penalty": 1.5, "suppress_tokens": [5, 6, 7], "top_k": 3, "min_p": 0.2}


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same tiny model saved twice: with a plain generation config and with SETTINGS."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(config)
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(root / "plain")
    for key, value in SETTINGS.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(root / "settings")
    return root / "plain", root / "settings"


def draw(path, temperature, wrap=None):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if wrap:
        model = wrap(model)
    torch.manual_seed(3)
    texts = ["w1 w2 w3", "w4", "w5 w6"]
    out = sample(model, word_tokenizer(), texts, max_new_tokens=24, temperature=temperature)
    return out.response_ids, model


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_checkpoint_sampling_settings_do_not_change_the_samples(checkpoints, temperature):
    plain, settings = checkpoints
    assert AutoModelForCausalLM.from_pretrained(settings).generation_config.no_repeat_ngram_size == 1  # saved
    want, _ = draw(plain, temperature)
    got, model = draw(settings, temperature)
    assert torch.equal(got, want)
    assert model.generation_config.no_repeat_ngram_size == 1  # set aside during generate only
    if temperature > 0:  # random weights over 42 tokens: 24 draws repeat a token
        assert any(len(set(row.tolist())) < len(row) for row in want)


def test_settings_are_ignored_under_peft_too(checkpoints):
    from peft import LoraConfig, get_peft_model

    lora = lambda m: get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"]))  # noqa: E731 (zero-init: no change)
    plain, settings = checkpoints
    assert torch.equal(draw(settings, 1.0, lora)[0], draw(plain, 1.0)[0])


def test_overridden_settings_are_listed_and_logged_once(checkpoints, caplog, monkeypatch):
    plain, settings = checkpoints
    monkeypatch.setattr(generation, "_told", set())
    model = AutoModelForCausalLM.from_pretrained(settings)
    assert checkpoint_overrides(model, 1.0) == {k: v for k, v in sorted(SETTINGS.items()) if k != "do_sample"}
    assert checkpoint_overrides(model, 0.0)["do_sample"] is True  # greedy: not sampling at all
    assert checkpoint_overrides(AutoModelForCausalLM.from_pretrained(plain), 1.0) == {}
    model.generation_config.temperature = 0.7
    assert "temperature" not in checkpoint_overrides(model, 0.7)  # what we use anyway is not "overridden"
    assert checkpoint_overrides(model, 1.0)["temperature"] == 0.7
    with caplog.at_level(logging.WARNING, logger="alignment.generation"):
        for _ in range(2):
            draw(settings, 1.0)
    lines = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert len(lines) == 1 and "no_repeat_ngram_size=1" in lines[0] and "repetition_penalty=1.5" in lines[0]
