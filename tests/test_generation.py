"""Hand-computed checks of the token-level pieces every sampler and scorer relies on."""

import torch

from alignment.generation import position_ids, truncate_after_stop


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_truncate_after_first_stop_keeps_the_stop_token():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 3, 2, 4]])
    out, mask, finished = truncate_after_stop(ids, stops=[2, 3], pad_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [9, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_a_prompt_asked_for_several_replies_runs_once_and_samples_as_alone(tiny_base, monkeypatch):
    """sample(): rows with the same prompt share its keys and values (each prompt but its last token
    runs once; generate starts from that cache): the same replies as without sharing, same seed."""
    from alignment import generation
    from alignment.templates import render_prompt
    from alignment.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    model = load_causal_lm(str(tiny_base), tok).eval()
    texts = [render_prompt(tok, p) for p in ["first: egg sun", "last: cup hat owl", "first: egg sun", "last: cup hat owl"]]
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    torch.manual_seed(0)
    shared = generation.sample(model, tok, texts, max_new_tokens=8, temperature=1.0)
    width = shared.prompt_ids.shape[1]
    assert calls[:2] == [(2, width - 1), (4, 1)]  # two distinct prompts once; then each row's last prompt token
    monkeypatch.setattr(generation, "shared_prompt_cache", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    alone = generation.sample(model, tok, texts, max_new_tokens=8, temperature=1.0)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished"):
        assert torch.equal(getattr(shared, name), getattr(alone, name)), name


def test_stop_ids_join_the_tokenizers_eos_and_the_models_own():
    """EOS 2 from the tokenizer; the generation config adds 9 (an int) or [7, 2] (a list, Qwen's
    way); no generation config adds nothing. Sorted, each once."""
    from types import SimpleNamespace as NS

    from alignment.generation import stop_ids

    tok = NS(eos_token_id=2)
    assert stop_ids(NS(generation_config=NS(eos_token_id=9)), tok) == [2, 9]
    assert stop_ids(NS(generation_config=NS(eos_token_id=[7, 2])), tok) == [2, 7]
    assert stop_ids(NS(generation_config=NS(eos_token_id=None)), tok) == [2]
    assert stop_ids(NS(), tok) == [2]


def test_decoding_is_plain_sampling_or_greedy():
    """temperature > 0: sampling from softmax(z / T), top_k 0 (off), top_p 1 unless given; 0: greedy."""
    from alignment.generation import decoding

    assert decoding(0.7) == {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}
    assert decoding(1.0, 0.9) == {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.9}
    assert decoding(0.0) == {"do_sample": False}


def test_checkpoint_overrides_of_a_model_without_a_generation_config_are_none():
    from types import SimpleNamespace as NS

    from alignment.generation import checkpoint_overrides

    assert checkpoint_overrides(NS(), 0.7) == {}


def test_cache_keyword_follows_the_forward_signature():
    """A forward taking `cache` gets it under that name; one taking `past_key_values` under that."""
    from alignment.generation import cache_keyword

    class New:
        def forward(self, input_ids, cache=None):
            return None

    class Old:
        def forward(self, input_ids, past_key_values=None):
            return None

    assert cache_keyword(New()) == "cache"
    assert cache_keyword(Old()) == "past_key_values"


def test_clean_generation_config_keeps_ids_and_drops_decoding():
    """A checkpoint's config with eos 5, pad 0, temperature 0.3 and top_k 7: the clean one keeps the
    ids and leaves every decoding field unset (temperature, top_k None); None gives an empty one
    with no ids either."""
    from transformers import GenerationConfig

    from alignment.generation import _clean_generation_config

    clean = _clean_generation_config(GenerationConfig(eos_token_id=5, pad_token_id=0, temperature=0.3, top_k=7))
    assert (clean.eos_token_id, clean.pad_token_id, clean.temperature, clean.top_k) == (5, 0, None, None)
    empty = _clean_generation_config(None)
    assert (empty.eos_token_id, empty.temperature) == (None, None)


def test_hidden_of_reads_a_tuple_or_an_output_object():
    from types import SimpleNamespace as NS

    from alignment.generation import _hidden_of

    h, other = torch.ones(1), torch.zeros(1)
    assert _hidden_of((h, other)) is h
    assert _hidden_of(NS(last_hidden_state=h)) is h


def test_checkpoint_overrides_list_only_what_sample_does_not_apply():
    """A checkpoint saying do_sample, temperature 0.7, top_k 0 and top_p 1.0 (what `sample` uses at
    0.7 with the default top_p of 1) plus repetition_penalty 1.3 and eos 5: only the penalty is an
    override (eos is not about decoding)."""
    from types import SimpleNamespace as NS

    from transformers import GenerationConfig

    from alignment.generation import checkpoint_overrides

    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.3, eos_token_id=5)
    assert checkpoint_overrides(NS(generation_config=config), 0.7) == {"repetition_penalty": 1.3}
