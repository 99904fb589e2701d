"""The demo world (alignment/demo/world.py): its tasks and words, the gold oracle's scores worked by
hand, prompt parsing, the data generators (SFT conversations, preference pairs, held-out prompts,
the pretraining corpus and its defect rates), determinism, and that a micro chain learns content the
base model lacks. Presets and the recipes' `world` key: tests/test_world_presets.py."""

import random

import pytest

from alignment.demo.world import (
    ASSISTANT_TAG, POLITE_OPENER, RUDE_OPENERS, TASKS, USER_TAG, WORDS, Task, eval_prompts,
    gold_score, good_response, is_heldout, make_response, parse_prompt, preference_pairs,
    pretrain_corpus, render_exchange, sample_task, score_parts, sft_conversations,
)

P = "reverse: cat dog sun"  # answer: "sun dog cat"


def _defects(prompt, response):
    """Which defects a generated response has, read back with the oracle."""
    parts = score_parts(prompt, response)
    return {"wrong": parts["content"] == 0, "rude": parts["polite"] == 0,
            "rambles": parts["concise"] == 0}


def test_words_and_task_basics():
    assert len(WORDS) == len(set(WORDS)) >= 30
    assert all(w.isalpha() and w.islower() for w in WORDS)
    t = Task("reverse", ("cat", "dog", "sun"))
    assert t.prompt == P and t.answer == "sun dog cat"
    assert Task("first", ("cat", "dog", "sun")).answer == "cat"
    assert Task("last", ("cat", "dog", "sun", "pig")).answer == "pig"
    assert Task("repeat", ("cat", "dog")).answer == "cat dog"
    assert good_response(t) == "Sure! sun dog cat"


@pytest.mark.parametrize("response, finished, expected", [
    ("Sure! sun dog cat", True, 1.0),
    ("  Sure!   sun dog cat \n", True, 1.0),
    ("Sure! sun dog cat pig owl", True, 0.75),    # rambling
    ("Ugh. sun dog cat", True, 0.75),             # rude
    ("Whatever. sun dog cat", True, 0.75),
    ("sun dog cat", True, 0.75),                  # no opener at all
    ("Sure! cat dog sun", True, 0.5),             # wrong but polite, on format, stopped
    ("Sure! sun dog", True, 0.25),                # too short: wrong and off format
    ("Sure! cat dog sun pig", True, 0.25),        # wrong and rambling
    ("Sure! sun dog cat", False, 0.75),           # cut off by the length limit
    ("", True, 0.0),
    ("Fine. cat dog sun pig owl ice", True, 0.0),  # rude + wrong + rambling
    ("Ugh. sun dog cat pig", True, 0.5),          # rude + rambling
])
def test_gold_scores_by_hand(response, finished, expected):
    assert gold_score(P, response, finished) == expected


def test_score_parts_and_bad_prompt():
    assert score_parts(P, "Sure! sun dog cat pig") == {"polite": 0.25, "content": 0.5, "concise": 0.0}
    with pytest.raises(ValueError):
        gold_score("reverse: cat dog zebra", "Sure! zebra dog cat")


def test_parse_prompt_round_trip_every_kind():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        t = sample_task(rng)
        seen.add(t.kind)
        assert parse_prompt(t.prompt) == t
        assert len(set(t.words)) == len(t.words)
    assert seen == set(TASKS)


@pytest.mark.parametrize("junk", [
    "", "hello", "repeat:", "repeat: ", "repeat: cat", "repeat:cat dog", "Repeat: cat dog",
    "sort: cat dog", "repeat: cat cat", "repeat: cat  dog", "repeat: cat dog ",
    " repeat: cat dog", "repeat: cat zebra", "first: cat dog", "reverse: a b c d",
    "repeat: cat dog sun pig owl", "repeat: cat dog sun pig", "last: cat dog sun pig owl",
])
def test_parse_prompt_rejects_junk(junk):
    with pytest.raises(ValueError):
        parse_prompt(junk)


def test_make_response_defects():
    rng = random.Random(1)
    for _ in range(300):
        t = sample_task(rng)
        wrong, rude, rambles = (rng.random() < 0.5 for _ in range(3))
        r = make_response(t, rng, wrong=wrong, rude=rude, rambles=rambles)
        assert r.split()[0] in (RUDE_OPENERS if rude else (POLITE_OPENER,))
        assert _defects(t.prompt, r)["wrong"] == wrong
        body_len, k = len(r.split()) - 1, len(t.answer.split())
        assert (body_len > k) if rambles else (body_len == k)
        assert gold_score(t.prompt, r) == 0.25 * (not rude) + 0.5 * (not wrong) + 0.25 * (not rambles)


def test_render_exchange():
    assert render_exchange(P, "Sure! x") == f"{USER_TAG}\n{P}\n{ASSISTANT_TAG}\nSure! x"
    assert render_exchange(P, "y") == "<|user|>\nreverse: cat dog sun\n<|assistant|>\ny"


def test_determinism():
    for gen in (pretrain_corpus, sft_conversations, preference_pairs, eval_prompts):
        assert gen(50, 3) == gen(50, 3)
        assert gen(50, 3) != gen(50, 4)
        assert len(gen(50, 3)) == 50


def test_sft_conversations_are_correct_and_polite_but_some_ramble():
    rambles = 0
    convs = sft_conversations(2000, 0)
    for conv in convs:
        user, assistant = conv["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        parts = score_parts(user["content"], assistant["content"])
        assert parts["polite"] == 0.25 and parts["content"] == 0.5
        rambles += parts["concise"] == 0
    assert abs(rambles / len(convs) - 0.25) < 0.03
    assert all(gold_score(c["messages"][0]["content"], c["messages"][1]["content"]) == 1.0
               for c in sft_conversations(100, 0, p_ramble=0.0))


def test_preference_pairs():
    pairs = preference_pairs(1000, 0)
    counts = {"wrong": 0, "rude": 0, "rambles": 0}
    good_chosen = 0
    for p in pairs:
        assert gold_score(p["prompt"], p["chosen"]) > gold_score(p["prompt"], p["rejected"])
        good_chosen += gold_score(p["prompt"], p["chosen"]) == 1.0
        for d, has in _defects(p["prompt"], p["rejected"]).items():
            counts[d] += has
    assert all(c > 300 for c in counts.values()), counts
    assert 700 < good_chosen < 900


def _exchanges(doc):
    """A corpus document read back: its (prompt, response) pairs, or None for a word list."""
    lines = doc.split("\n")
    if lines[0] != USER_TAG:
        return None
    assert len(lines) % 4 == 0, doc
    pairs = []
    for i in range(0, len(lines), 4):
        assert (lines[i], lines[i + 2]) == (USER_TAG, ASSISTANT_TAG), doc
        pairs.append((lines[i + 1], lines[i + 3]))
    return pairs


def test_eval_prompts_heldout_and_disjoint():
    evals = eval_prompts(300, 0)
    assert len(set(evals)) == 300 and all(is_heldout(p) for p in evals)
    train = {p for d in pretrain_corpus(3000, 0) for p, _ in _exchanges(d) or []}
    train |= {c["messages"][0]["content"] for c in sft_conversations(3000, 0)}
    train |= {p["prompt"] for p in preference_pairs(3000, 0)}
    assert not any(is_heldout(p) for p in train)
    assert not set(evals) & train
    # the rule is not vacuous: roughly 10% of random prompts are held out
    rng = random.Random(5)
    frac = sum(is_heldout(sample_task(rng).prompt) for _ in range(5000)) / 5000
    assert 0.07 < frac < 0.13


@pytest.mark.parametrize("rates", [None, (0.5, 0.4, 0.4, 0.2), (0.1, 0.7, 0.0, 0.0)])
def test_corpus_defect_rates(rates):
    """None: the defaults, a corpus like web text: half repeated word lists, half threads whose
    answers are mostly right but often rude or rambling. Rates are per answer."""
    if rates is None:
        p_wrong, p_rude, p_ramble, p_list = 0.1, 0.3, 0.3, 0.5
        docs = pretrain_corpus(2000, 7)
    else:
        p_wrong, p_rude, p_ramble, p_list = rates
        docs = pretrain_corpus(2000, 7, p_wrong=p_wrong, p_rude=p_rude, p_ramble=p_ramble, p_list=p_list)
    totals = {"wrong": 0, "rude": 0, "rambles": 0}
    answers = lists = 0
    for doc in docs:
        pairs = _exchanges(doc)
        if pairs is None:
            lists += 1
            continue
        for prompt, response in pairs:
            d = _defects(prompt, response)
            body_len = len(response.split()) - 1
            k = len(parse_prompt(prompt).answer.split())
            totals["wrong"] += d["wrong"]
            totals["rude"] += d["rude"]
            totals["rambles"] += body_len > k
            answers += 1
    assert abs(lists / 2000 - p_list) < 0.05
    for defect, rate in (("wrong", p_wrong), ("rude", p_rude), ("rambles", p_ramble)):
        assert abs(totals[defect] / answers - rate) < 0.05, (defect, totals[defect] / answers)


def test_corpus_threads_and_lists_repeat_what_came_before():
    """What makes pretraining help SFT: later questions in a thread reuse the first one's words,
    and a list document is one run of words written out again and again."""
    docs = pretrain_corpus(1000, 3)
    multi = lists = 0
    for doc in docs:
        pairs = _exchanges(doc)
        if pairs is None:
            lines = doc.split("\n")
            assert 2 <= len(lines) <= 4 and len(set(lines)) == 1, doc
            assert 3 <= len(lines[0].split()) <= 6 and set(lines[0].split()) <= set(WORDS)
            lists += 1
            continue
        assert 1 <= len(pairs) <= 3
        first = parse_prompt(pairs[0][0]).words
        for prompt, _ in pairs[1:]:
            words = parse_prompt(prompt).words
            shared = min(len(words), len(first))
            assert words[:shared] == first[:shared], (first, words)
        multi += len(pairs) > 1
    assert lists > 300 and multi > 200, (lists, multi)
    single = pretrain_corpus(1000, 3, p_list=0.0, max_turns=1)
    assert all(len(_exchanges(d)) == 1 for d in single)


# --------------------------------------------------------------------------- micro chain


def _content_rate(path, prompts):
    from alignment import models as model_layer
    from alignment.evaluation import generate

    tok = model_layer.load_tokenizer(str(path))
    model = model_layer.load_causal_lm(str(path), tok)
    gens = generate(model, tok, prompts, max_new_tokens=8, progress=False)
    return sum(score_parts(g.prompt, g.text, g.finished)["content"] > 0 for g in gens) / len(gens)


@pytest.mark.dynamics
def test_micro_chain_sft_learns_content_the_base_model_lacks(micro_demo_chain):
    """init -> pretrain -> sft at micro scale (conftest's MICRO_DEMO_CHAIN: the default recipes
    with far fewer steps): after a short SFT, the model copies/chooses the right words on
    held-out prompts far more often than the pretrained base (which sits near chance: it has
    not learnt to pick words from the prompt). What it measures: that the demo world's content
    is learnable by SFT in this chain at all (demonstrations right, loss on the answer,
    held-out prompts of the same family), not the default's final figure."""
    runs = micro_demo_chain / "runs"
    # The single-word tasks (first, last): the skills SFT teaches first (docs/demo_world.md).
    prompts = [p for p in eval_prompts(300, 0) if parse_prompt(p).kind in ("first", "last")][:100]
    base, sft = _content_rate(runs / "pretrain", prompts), _content_rate(runs / "sft", prompts)
    print(f"margin: content base {base:.3f} (< 0.15), sft {sft:.3f} (> base + 0.15)")
    assert base < 0.15, base
    assert sft > base + 0.15, (base, sft)
