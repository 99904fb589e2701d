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
