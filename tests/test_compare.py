"""Tests for alignment/evaluation.py on a tiny random model built in code (no network, no files)."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignment import evaluation, templates
from alignment.evaluation import Generation
from alignment.demo import world
from alignment.stages.init import train_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(world.pretrain_corpus(300, seed=0), vocab_size=320)


def tiny_config(tok, **extra):
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        # Large random weights so that greedy text varies from token to token.
        initializer_range=0.5,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )


@pytest.fixture(scope="module")
def lm(tok):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(tok))


def forced_lm(tok, token_id):
    """A model whose next token is always `token_id`: lm_head outputs a one-hot bias only."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok))
    head = nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 100.0
    model.lm_head = head
    return model


PROMPTS = world.eval_prompts(6, seed=0)


def token_length(tok, prompt):
    return len(tok(templates.render_prompt(tok, prompt), add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- generate

def test_left_padding_does_not_change_greedy_text(tok, lm):
    by_length = sorted(PROMPTS, key=lambda p: token_length(tok, p))
    short, middle, long = by_length[0], by_length[len(by_length) // 2], by_length[-1]
    assert token_length(tok, short) < token_length(tok, middle) < token_length(tok, long)

    alone = evaluation.generate(lm, tok, [middle], max_new_tokens=12, progress=False)[0]
    batched = evaluation.generate(lm, tok, [long, middle, short], max_new_tokens=12, progress=False)
    assert [g.prompt for g in batched] == [long, middle, short]  # order kept
    assert batched[1] == alone
    assert alone.text  # the comparison is not between two empty strings
    # The shortest prompt is the most padded one.
    assert batched[2] == evaluation.generate(lm, tok, [short], max_new_tokens=12, progress=False)[0]


def test_batch_size_does_not_change_greedy_results_or_order(tok, lm):
    one_batch = evaluation.generate(lm, tok, PROMPTS, max_new_tokens=8, progress=False)
    small_batches = evaluation.generate(lm, tok, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    assert one_batch == small_batches
    assert [g.prompt for g in one_batch] == PROMPTS


def test_generate_restores_padding_side_and_training_mode(tok, lm):
    tok.padding_side = "right"
    lm.train()
    evaluation.generate(lm, tok, PROMPTS[:2], max_new_tokens=2, progress=False)
    assert tok.padding_side == "right"
    assert lm.training
    lm.eval()


def test_sampling_is_deterministic_given_the_seed(tok, lm):
    def sample(seed):
        gens = evaluation.generate(lm, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=seed, progress=False)
        return [g.text for g in gens]

    greedy = [g.text for g in evaluation.generate(lm, tok, PROMPTS, max_new_tokens=10, progress=False)]
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0) != greedy


def test_finished_with_empty_text_when_eos_is_forced(tok):
    gens = evaluation.generate(forced_lm(tok, tok.eos_token_id), tok, PROMPTS[:3], max_new_tokens=5, progress=False)
    for g in gens:
        assert g.finished is True
        assert g.text == ""
        assert g.num_tokens == 1


def test_not_finished_when_another_token_dominates(tok):
    word_id = tok.encode(" cat", add_special_tokens=False)[0]
    gens = evaluation.generate(forced_lm(tok, word_id), tok, PROMPTS[:3], max_new_tokens=5, progress=False)
    for g in gens:
        assert g.finished is False
        assert g.num_tokens == 5
        assert g.text == tok.decode([word_id] * 5) != ""


def test_text_stops_before_the_first_eos(tok):
    """Row 0 gives three word tokens then EOS; row 1 never stops. Row 0 is finished, its text
    holds the three tokens and num_tokens counts the EOS, although the batch ran on to 10 tokens."""
    word_id = tok.encode(" cat", add_special_tokens=False)[0]
    model = forced_lm(tok, word_id)
    calls = {"n": 0}

    def eos_in_row_0(module, inputs, output):
        calls["n"] += 1
        if calls["n"] > 3:  # the 4th forward pass picks the 4th new token
            output = output.clone()
            output[0, :, word_id] = 0.0
            output[0, :, tok.eos_token_id] = 100.0
        return output

    model.lm_head.register_forward_hook(eos_in_row_0)
    first, second = evaluation.generate(model, tok, PROMPTS[:2], max_new_tokens=10, progress=False)
    assert (first.finished, first.text, first.num_tokens) == (True, tok.decode([word_id] * 3), 4)
    assert (second.finished, second.text, second.num_tokens) == (False, tok.decode([word_id] * 10), 10)


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_of_constant_values_has_zero_width():
    assert evaluation.bootstrap_ci([0.75] * 40) == (0.75, 0.75, 0.75)


def test_bootstrap_mean_is_exact_and_inside_the_interval():
    values = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.25, 0.0, 1.0]  # sum 5.25
    mean, lo, hi = evaluation.bootstrap_ci(values)
    assert mean == pytest.approx(0.525, abs=1e-12)
    assert lo < mean < hi
    assert 0.0 <= lo and hi <= 1.0
    # The standard error is about 0.38 / sqrt(10) = 0.12, so the 95% interval is about 0.47 wide.
    assert 0.35 < hi - lo < 0.6
    assert evaluation.bootstrap_ci(values) == (mean, lo, hi)  # seeded


def test_bootstrap_rejects_empty_input():
    with pytest.raises(ValueError):
        evaluation.bootstrap_ci([])


def test_paired_diff_of_identical_lists_is_exactly_zero():
    values = [0.0, 0.25, 0.5, 1.0, 0.75]
    assert evaluation.paired_bootstrap_diff(values, values) == (0.0, 0.0, 0.0)


def test_paired_diff_uses_the_same_prompts_for_both():
    """b = a + 0.1 on every prompt: an unpaired bootstrap would give a wide interval; paired gives 0 width."""
    a = [0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 1.0, 0.0]
    b = [x + 0.1 for x in a]
    diff, lo, hi = evaluation.paired_bootstrap_diff(b, a)
    assert diff == pytest.approx(0.1)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    with pytest.raises(ValueError):
        evaluation.paired_bootstrap_diff(a, b[:-1])


# ---------------------------------------------------------------- scores

def test_gold_scores_use_the_oracle():
    prompt = PROMPTS[0]
    good = world.good_response(world.parse_prompt(prompt))
    gens = [
        Generation(prompt, good, True, 5),
        Generation(prompt, good, False, 32),  # cut off by the length limit: not concise
        Generation(prompt, "Ugh.", True, 3),
    ]
    assert evaluation.gold_scores(gens) == [1.0, 0.75, 0.0]


@pytest.fixture(scope="module")
def reward_model(tok):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    return model.eval()


def test_reward_scores_do_not_depend_on_batch_mates(tok, reward_model):
    gens = [
        Generation(PROMPTS[0], "Sure!", True, 2),
        Generation(PROMPTS[1], "Sure! cat dog sun " * 4, False, 32),
        Generation(PROMPTS[2], "", True, 1),
    ]
    batched = evaluation.reward_scores(reward_model, tok, gens)
    alone = [evaluation.reward_scores(reward_model, tok, [g])[0] for g in gens]
    assert len(batched) == len(gens)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 4) for s in batched)) == 3  # the replies do get different scores


def test_reward_scores_reject_a_model_with_another_pad_id(tok):
    torch.manual_seed(0)
    config = tiny_config(tok, num_labels=1)
    config.pad_token_id = tok.eos_token_id
    with pytest.raises(ValueError, match="pad_token_id"):
        evaluation.reward_scores(LlamaForSequenceClassification(config), tok, [Generation(PROMPTS[0], "x", True, 1)])


def test_a_reply_cut_off_at_the_length_limit_is_scored_open(tok, reward_model):
    """The reward model sees an unfinished reply without the template's end of turn (as the RL
    stages score it): a reward model that learnt "finished replies are better" is not fooled."""
    cut, done = Generation(PROMPTS[0], "Sure! cat dog", False, 6), Generation(PROMPTS[0], "Sure! cat dog", True, 7)
    open_ids = templates.reward_ids(tok, cut.prompt, cut.text, finished=False)
    assert templates.reward_ids(tok, done.prompt, done.text) == open_ids + [tok.eos_token_id]
    scores = evaluation.reward_scores(reward_model, tok, [cut, done])
    with torch.no_grad():
        by_hand = reward_model(torch.tensor([open_ids])).logits[0, 0].item()
    assert scores[0] == pytest.approx(by_hand, abs=1e-5) and scores[0] != pytest.approx(scores[1], abs=1e-4)
