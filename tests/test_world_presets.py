"""World presets (alignment/demo/world.py `World`, `PRESETS`): the default world's data unchanged
byte for byte, a recipe's `world` key reaching every place demo data are made, the oracle
grading prompts of every preset, one-line errors for an unknown preset, and the hard preset's
headroom after SFT."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from alignment.config import CompareRecipe, PrepOptions, PrepSource, PromptOptions, ReportOptions
from alignment.errors import RecipeError
from alignment.demo import world
from alignment.demo.world import DEFAULT, HARD, PRESETS, World
from alignment.pipeline import plan

from .conftest import RECIPES


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


# The default generators' outputs as they were BEFORE world presets existed (commit 47ae314,
# module constants only), hashed as _digest does: the calls the default recipes make (init's
# tokenizer corpus, pretrain, sft, dpo/reward, the report's eval prompts, ppo/grpo/rloo prompts;
# data.seed 0) and a few other seeds. The default world's data, and so every documented figure,
# must stay byte-identical.
PRE_PRESET = {
    ("pretrain_corpus", 4000, 0): "3edb224cb1a6dab3",
    ("pretrain_corpus", 8000, 0): "b6b6ca3ff4a9df1c",
    ("sft_conversations", 10000, 0): "e4a3b2f5277af871",
    ("preference_pairs", 2600, 0): "477a1572bf180b85",
    ("preference_pairs", 4000, 0): "300119f8ad3b6e32",
    ("eval_prompts", 300, 0): "4225339f8bbb3c4a",
    ("train_prompts", 2000, 0): "23bcac06fbb61eca",
    ("pretrain_corpus", 500, 1): "15985a74ad02e13d",
    ("sft_conversations", 500, 1): "50b296f5eb803b86",
    ("preference_pairs", 500, 1): "3e582011211979ce",
    ("eval_prompts", 300, 1): "f0c60d9758d56e17",
    ("train_prompts", 500, 1): "de05f8d27521ebce",
    ("pretrain_corpus", 500, 42): "156a7b5a3eeb0d6b",
    ("sft_conversations", 500, 42): "a3a8ec73cd4c7680",
    ("preference_pairs", 500, 42): "f1d5773f51727995",
    ("eval_prompts", 300, 42): "eceabc13494ba210",
    ("train_prompts", 500, 42): "9889dbfce9d30f6b",
}


def test_default_world_data_are_byte_identical_to_before_presets():
    for (name, n, seed), expected in PRE_PRESET.items():
        assert _digest(getattr(world, name)(n, seed)) == expected, (name, n, seed)  # module function, no world
        if n <= 500:  # the other spellings of the default world make the same rows
            assert _digest(getattr(world.preset("default"), name)(n, seed)) == expected, (name, n, seed)
            assert _digest(getattr(world, name)(n, seed, world="default")) == expected, (name, n, seed)


def test_presets_are_one_settings_object():
    assert set(PRESETS) == {"default", "hard"}
    assert world.preset("default") is DEFAULT and world.preset("hard") is HARD and world.preset(HARD) is HARD
    assert DEFAULT == World() and DEFAULT.words == world.WORDS and DEFAULT.tasks == world.TASKS
    with pytest.raises(Exception):
        HARD.sft_wrong = 0.0  # frozen
    # the hard world differs in what SFT and preference learning learn from, not in its prompts
    assert HARD.sft_wrong > 0 and HARD.sft_ramble > DEFAULT.sft_ramble and HARD.pref_flip > 0 and HARD.pref_subtle > 0
    assert HARD.eval_prompts(50, 0) == DEFAULT.eval_prompts(50, 0)  # the same held-out prompts: comparable figures
    assert HARD.sft_conversations(50, 0) != DEFAULT.sft_conversations(50, 0)
    assert HARD.preference_pairs(50, 0) != DEFAULT.preference_pairs(50, 0)
    with pytest.raises(ValueError, match="sft_wrong must be in"):
        World(name="x", sft_wrong=2.0)
    with pytest.raises(ValueError, match="unknown task kind 'sort'"):
        World(name="x", word_counts=(("sort", 2, 3),))


# --------------------------------------------------------------------------- the oracle


def test_oracle_grades_prompts_of_every_preset():
    for w in PRESETS.values():
        prompts = w.eval_prompts(200, 0) + [r["prompt"] for r in w.train_prompts(200, 0)]
        for prompt in prompts:
            task = world.parse_prompt(prompt)
            assert task.prompt == prompt
            good = world.good_response(task)
            assert world.gold_score(prompt, good) == 1.0
            assert world.score_parts(prompt, good + " owl") == {"polite": 0.25, "content": 0.5, "concise": 0.0}
            assert world.gold_score(prompt, "Ugh. " + task.answer, finished=False) == 0.5
    # the rewards' 'gold' function and compare's check take them too
    from alignment.evaluation import has_gold
    from alignment.rewards import gold

    hard = [c["messages"] for c in HARD.sft_conversations(300, 0)]
    assert has_gold([m[0]["content"] for m in hard]) and not has_gold(["hello there"])
    scores = gold([m[0]["content"] for m in hard], [m[1]["content"] for m in hard], [True] * len(hard))
    assert scores == [world.gold_score(m[0]["content"], m[1]["content"]) for m in hard]
    assert min(scores) == 0.25 and sum(s < 1 for s in scores) > 100  # wrong and/or rambling demonstrations, graded


def test_oracle_accepts_the_union_of_the_presets():
    """The oracle is not told the world: it takes every task, word and length of any preset, and
    nothing else (a preset with more words or longer lists widens what it takes)."""
    assert world.ANY_WORDS == frozenset(w for p in PRESETS.values() for w in p.words)
    for kind, lo, hi in (row for p in PRESETS.values() for row in p.word_counts):
        assert world.ANY_COUNTS[kind][0] <= lo and hi <= world.ANY_COUNTS[kind][1]
    assert set(world.ANY_COUNTS) == {k for p in PRESETS.values() for k in p.tasks}


@pytest.mark.parametrize("junk", ["reverse: cat dog zebra", "sort: cat dog", "repeat: cat", "repeat: cat cat",
                                  "first: " + " ".join(world.WORDS[:12]), "nonsense"])
def test_oracle_rejects_what_no_preset_makes_in_one_line(junk):
    with pytest.raises(ValueError) as info:
        world.gold_score(junk, "Sure! cat")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- unknown preset


def test_unknown_world_is_a_one_line_error(tmp_path, capsys):
    from alignment import cli
    from alignment.recipe_file import load_recipe

    with pytest.raises(ValueError) as info:
        world.preset("nope")
    assert str(info.value) == "unknown world 'nope'; expected one of default, hard"
    path = tmp_path / "r.yaml"
    path.write_text("stage: sft\nmodel: m\nworld: hrad\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message and "world" in message and "did you mean 'hard'" in message
    assert "expected one of default, hard" in message
    assert cli.main(["run", str(RECIPES / "dpo.yaml"), "*:world=nope", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown world 'nope'" in err and "default, hard" in err


@pytest.mark.parametrize("argv", [
    ["compare", "a", "b", "--world", "nope"],
])
def test_unknown_world_on_the_compare_command_line(argv, capsys):
    from alignment import cli

    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--world" in err and "'nope'" in err and "hard" in err


def test_unknown_world_on_the_data_prep_command_line(tmp_path, capsys):
    from data_prep.cli import main

    for argv in (["demo", "--out", str(tmp_path / "d"), "--world", "nope"], ["sft", "demo", "--out", str(tmp_path / "s"), "--world", "nope"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--world" in err and "'nope'" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- `world: hard` reaches every stage


def test_world_override_switches_a_whole_chain(in_tmp):
    default = plan(RECIPES / "dpo.yaml")
    hard = plan(RECIPES / "dpo.yaml", ["*:world=hard"])
    assert [n.name for n in hard] == ["init", "pretrain", "sft", "dpo"]
    assert all(n.recipe.world == "default" for n in default)
    assert all(n.recipe.world == "hard" for n in hard)
    assert all(a.hash != b.hash for a, b in zip(default, hard))  # the key is in every stage's cache key
    one = plan(RECIPES / "dpo.yaml", ["world=hard"])  # without `*:`, the top recipe alone
    assert [n.recipe.world for n in one] == ["default", "default", "default", "hard"]


class _Stop(Exception):
    """Raised by a stand-in once it has seen what a stage would load."""


# A preset whose every prompt is a 2-word reversal (and whose demonstrations all ramble): data no
# other preset makes, so that what a stage loads shows which world it was given. The hard preset
# shares the default's prompts and corpus; only its demonstrations and pairs tell it apart.
PROBE = World(name="probe", word_counts=(("reverse", 2, 2),), sft_ramble=1.0)


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(PRESETS, "probe", PROBE)
    return PROBE


def _seen_demo_rows(monkeypatch, target: str) -> dict:
    """Replace `target` (a load_rows) by a stand-in that records the rows its demo factory makes."""
    seen = {}

    def fake(options, demo, *args, **kwargs):
        seen["rows"] = demo(6, 3)
        raise _Stop

    monkeypatch.setattr(target, fake)
    return seen


@pytest.mark.parametrize("preset", ["hard", "probe"])
def test_the_world_key_reaches_the_data_of_every_training_stage(preset, probe, in_tmp, monkeypatch, tmp_path, tiny_base):
    from alignment.stages import dpo, init, pretrain, reward, rl, sft

    w = world.preset(preset)
    nodes = {}
    for recipe in ("dpo.yaml", "reward.yaml", "grpo.yaml"):
        nodes.update({n.name: n for n in plan(RECIPES / recipe, [f"*:world={preset}"])})
    corpus = [{"text": t} for t in w.pretrain_corpus(6, 3)]
    expected = {
        "init": (init, "alignment.stages.init.load_rows", corpus),
        "pretrain": (pretrain, "alignment.stages.pretrain.load_rows", corpus),
        "sft": (sft, "alignment.stages.sft.load_rows", w.sft_conversations(6, 3)),
        "dpo": (dpo, "alignment.data.load_rows", w.preference_pairs(6, 3)),
        "reward": (reward, "alignment.data.load_rows", w.preference_pairs(6, 3)),
    }
    for name, (stage, target, rows) in expected.items():
        recipe = nodes[name].recipe
        assert recipe.world == preset
        seen = _seen_demo_rows(monkeypatch, target)
        with pytest.raises(_Stop):
            stage.run(recipe, {"model": str(tiny_base)}, tmp_path)  # sft and dpo load the tokenizer first
        assert seen["rows"] == rows, name
    seen = _seen_demo_rows(monkeypatch, "alignment.stages.rl.load_rows")  # ppo, grpo and rloo load prompts here
    with pytest.raises(_Stop):
        rl.load_prompts(nodes["grpo"].recipe, None)
    assert seen["rows"] == w.train_prompts(6, 3)
    if preset == "probe":  # data no other world makes: the world given is the one used
        assert all(world.parse_prompt(r["prompt"]).kind == "reverse" for r in seen["rows"])
        assert corpus != [{"text": t} for t in DEFAULT.pretrain_corpus(6, 3)]
    else:  # hard: other demonstrations and pairs on the same prompts
        assert w.sft_conversations(6, 3) != DEFAULT.sft_conversations(6, 3)


def test_the_world_key_reaches_the_report_and_compare(probe, in_tmp, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from alignment import evaluation, report
    from alignment.stages import compare as compare_stage

    seen = {}

    def fake_compare(models, prompts, generation, **kwargs):
        seen["prompts"], seen["source"] = prompts, kwargs.get("prompt_source")
        raise _Stop

    # the closing report: the pipeline passes the top recipe's world
    monkeypatch.setattr(report, "compare_models", fake_compare)
    top = SimpleNamespace(name="dpo", out_dir=tmp_path, recipe=SimpleNamespace(stage="dpo", world="probe"))
    with pytest.raises(_Stop):
        report.build_report(ReportOptions(models={"a": "a", "b": "b"}, num_prompts=7), [top], {"a": "x", "b": "y"}, "probe")
    assert seen["prompts"] == PROBE.eval_prompts(7, 0) and seen["source"] == "held-out demo prompts (probe world)"
    import inspect

    from alignment import pipeline

    assert "build_report(report, nodes, reported, nodes[-1].recipe.world)" in inspect.getsource(pipeline.run)

    # compare: the function, the stage (its recipe's world) and the command line (--world)
    assert evaluation.load_prompts(PromptOptions(num_prompts=7), "probe") == (PROBE.eval_prompts(7, 0),
                                                                           "held-out demo prompts (probe world)")
    assert evaluation.load_prompts(PromptOptions(num_prompts=7)) == (DEFAULT.eval_prompts(7, 0), "held-out demo prompts")
    monkeypatch.setattr(evaluation, "compare_models", fake_compare)
    recipe = CompareRecipe(stage="compare", models={"a": "x", "b": "y"}, world="probe", prompts=PromptOptions(num_prompts=5))
    with pytest.raises(_Stop):
        compare_stage.run(recipe, {"models.a": "x", "models.b": "y"}, tmp_path / "cmp")
    assert seen["prompts"] == PROBE.eval_prompts(5, 0)
    import argparse

    parser = argparse.ArgumentParser()
    compare_stage.add_arguments(parser)
    assert parser.parse_args(["a", "b"]).world == "default"
    assert parser.parse_args(["a", "b", "--world", "hard"]).world == "hard"


def test_the_world_key_reaches_data_prep(probe, tmp_path, monkeypatch):
    from data_prep import prepare as prepare_module
    from data_prep.cli import main
    from data_prep.onpolicy import read_prompts

    def user_prompts(prepared):
        return {row["prompt"][-1]["content"] if isinstance(row["prompt"], list) else row["prompt"]
                for rows in prepared.splits.values() for row in rows}

    options = PrepOptions(kind="pairs", sources=[PrepSource(path="demo", num_examples=40)], test_fraction=0.0)
    probed = user_prompts(prepare_module.prepare(options, progress=False, world="probe"))
    assert probed and probed <= {p["prompt"] for p in PROBE.preference_pairs(40, 0)}
    default = user_prompts(prepare_module.prepare(options, progress=False))
    assert default <= {p["prompt"] for p in DEFAULT.preference_pairs(40, 0)} and not default & probed
    assert read_prompts("demo", "prompt", 5, 0, "probe") == [
        (f"demo prompt {i + 1}", c["messages"][0]["content"]) for i, c in enumerate(PROBE.sft_conversations(5, 0))]

    # the prep stage passes its recipe's world
    from alignment.config import PrepRecipe
    from alignment.stages import prep

    seen = {}

    def fake_prepare(options, tokenizer=None, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(prepare_module, "prepare", fake_prepare)
    with pytest.raises(_Stop):
        prep.run(PrepRecipe(stage="prep", world="hard"), {}, tmp_path / "prep")
    assert seen["world"] == "hard"
    monkeypatch.undo()

    # python -m data_prep demo --world hard
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--world", "hard", "--pretrain", "5", "--sft", "5", "--pairs", "5",
                 "--eval", "5", "--seed", "2"]) == 0
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    assert read("sft.jsonl") == HARD.sft_conversations(5, 2) != DEFAULT.sft_conversations(5, 2)
    assert read("preferences.jsonl") == HARD.preference_pairs(5, 2)
    assert [r["prompt"] for r in read("eval_prompts.jsonl")] == HARD.eval_prompts(5, 2)
    assert [r["text"] for r in read("pretrain.jsonl")] == HARD.pretrain_corpus(5, 2)


# --------------------------------------------------------------------------- the hard preset's data


def _demo_gold(convs) -> dict[str, float]:
    parts = [world.score_parts(c["messages"][0]["content"], c["messages"][1]["content"]) for c in convs]
    return {k: sum(p[k] for p in parts) / len(parts) for k in ("polite", "content", "concise")}


def test_hard_preset_leaves_headroom_after_sft():
    """A model that imitated the SFT demonstrations perfectly would sample them at temperature 1:
    their own gold mean is what SFT reaches at best, sampled (the default recipes' SFT lands a few
    points below it: default 0.90 against 0.94; hard 0.76-0.81 against 0.81, docs/demo_world.md).
    Default: 0.94 (a quarter ramble on); hard: 0.81 (a fifth wrong, 35% ramble on), i.e. at least
    0.15 of headroom before the model's own errors, for preference learning and RL to take back."""
    default = _demo_gold(DEFAULT.sft_conversations(4000, 0))
    hard = _demo_gold(HARD.sft_conversations(4000, 0))
    assert sum(default.values()) > 0.92
    assert sum(hard.values()) < 0.84
    assert hard["polite"] == 0.25  # demonstrations stay polite: the headroom is in content and concision
    assert hard["content"] < default["content"] - 0.08
    assert hard["concise"] < default["concise"] - 0.01


def test_hard_preference_pairs_are_subtler_and_noisier():
    def gap(pairs):
        return [world.gold_score(p["prompt"], p["chosen"]) - world.gold_score(p["prompt"], p["rejected"]) for p in pairs]

    default, hard = gap(DEFAULT.preference_pairs(2000, 0)), gap(HARD.preference_pairs(2000, 0))
    assert all(g > 0 for g in default)
    flipped = sum(g < 0 for g in hard) / len(hard)
    assert abs(flipped - HARD.pref_flip) < 0.03  # a share of labels is wrong
    assert sum(hard) / len(hard) < 0.75 * sum(default) / len(default)  # smaller gaps on average (0.37 vs 0.53)
    # a subtle pair differs by one word: rejected is chosen with one answer word changed, or one word more
    pairs = HARD.preference_pairs(2000, 0)
    one_word = 0
    for p in pairs:
        c, r = p["chosen"].split(), p["rejected"].split()
        one_word += (len(c) == len(r) and sum(a != b for a, b in zip(c, r)) <= 2) or r[:-1] == c or c[:-1] == r
    assert one_word / len(pairs) > 0.8 * HARD.pref_subtle


def test_hard_prompts_are_held_out_like_the_default_ones():
    evals = HARD.eval_prompts(300, 0)
    assert len(set(evals)) == 300 and all(world.is_heldout(p) for p in evals)
    train = {c["messages"][0]["content"] for c in HARD.sft_conversations(2000, 0)}
    train |= {p["prompt"] for p in HARD.preference_pairs(2000, 0)} | {r["prompt"] for r in HARD.train_prompts(2000, 0)}
    assert not any(world.is_heldout(p) for p in train)
    rng = random.Random(0)
    kinds = {world.sample_task(rng, HARD).kind for _ in range(200)}
    assert kinds == set(HARD.tasks)
