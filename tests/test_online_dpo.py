"""Iterative online DPO as a recipe of rounds: the expansion into ordinary stages, a round resumed
after a failure, a round added to a finished run trains only itself, and the per-round table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.recipe_file import load_recipe
from alignment.errors import RecipeError
from alignment.pipeline import is_current, plan, run
from alignment.rounds import expand

RECIPE = """\
stage: online_dpo
model: {base}
reward_model: {rm}
rounds: {rounds}
online: {{k: 2, prompts_per_round: 10, max_new_tokens: 6, test_fraction: 0, scorer: reward_model, reference: {reference}}}
dpo: {{loss_type: sigmoid, beta: 0.1}}
training: {{max_length: 48, per_device_train_batch_size: 4, max_steps: 2, learning_rate: 1.0e-3, logging_steps: 1}}
"""


def write_recipe(directory: Path, tiny_base, reward_dir, rounds: int, reference: str = "previous") -> Path:
    path = directory / "online.yaml"
    path.write_text(RECIPE.format(base=tiny_base, rm=reward_dir, rounds=rounds, reference=reference))
    return path


def test_rounds_expand_into_prep_and_dpo_stages_chained_round_to_round(in_tmp, tiny_base, reward_dir):
    recipe = load_recipe(write_recipe(in_tmp, tiny_base, reward_dir, 3, reference="start"))
    stages = expand(recipe, "online", Path("runs/online"))
    assert [s.name for s in stages] == ["online.round-1-pairs", "online.round-1", "online.round-2-pairs",
                                        "online.round-2", "online.round-3-pairs", "online"]
    assert [s.out_dir.name for s in stages] == ["round-1-pairs", "round-1", "round-2-pairs", "round-2",
                                                "round-3-pairs", "round-3"]
    assert [s.recipe.stage for s in stages] == ["prep", "dpo"] * 3
    # round 2 samples from round 1's model and trains from it; the reference is the starting model (start)
    pairs2, dpo2 = stages[2], stages[3]
    assert pairs2.refs == {"model": "online.round-1"} and pairs2.recipe.ref_model == str(tiny_base)
    assert dpo2.refs == {"data": "online.round-2-pairs", "model": "online.round-1"}
    assert dpo2.recipe.ref_model == str(tiny_base) and stages[1].recipe.ref_model is None
    # each round draws other prompts (seed + round) and keeps best vs worst of k = 2 samples
    assert [s.recipe.prep.seed for s in stages[::2]] == [43, 44, 45]
    assert pairs2.recipe.prep.sources[0].samples.k == 2 and pairs2.recipe.prep.kind == "pairs"
    previous = expand(load_recipe(write_recipe(in_tmp, tiny_base, reward_dir, 3)), "online", Path("runs/online"))
    assert previous[3].recipe.ref_model is None  # reference: previous -> the model the round starts from


def test_rounds_is_not_hashed_so_earlier_rounds_keep_their_hashes(in_tmp, tiny_base, reward_dir):
    two = {n.out_dir.name: n.hash for n in plan(write_recipe(in_tmp, tiny_base, reward_dir, 2))}
    three = {n.out_dir.name: n.hash for n in plan(write_recipe(in_tmp, tiny_base, reward_dir, 3))}
    assert set(three) - set(two) == {"round-3-pairs", "round-3"}
    assert all(three[name] == h for name, h in two.items())
    assert len(set(three.values())) == 6


@pytest.mark.parametrize("override, message", [
    ("online.scorer=oracle data.source={from: x.yaml}", "data.source: online_dpo reads prompts"),
    ("reward_model=null", "online.scorer 'reward_model' needs 'reward_model'"),
    ("online.k=1", "online.k"),
    ("online.scorer=reward_fn", "online.scorer 'reward_fn' needs 'reward_fn'"),
    ("reward_fn=f.py:score", "reward_fn is set but no online.scorer is 'reward_fn'"),
    ("online.scorer=reward_fn reward_fn=score", r"reward_fn: .*'score' is not a reward function"),
    # the reward model set beside the functions is a source of the sum, weighed first
    ("online.scorer=reward_fn reward_fn=f.py:score reward_weights=[2.0]", "reward_weights has 1 entries for 2 reward sources"),
])
def test_online_dpo_recipe_mistakes(in_tmp, tiny_base, reward_dir, override, message):
    overrides = []
    for item in override.split(" ", 1) if "{" in override else override.split():
        key, value = item.split("=", 1)
        import yaml

        overrides.append((key.split("."), yaml.safe_load(value), item))
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(in_tmp, tiny_base, reward_dir, 2), overrides)


def test_a_failed_round_resumes_in_its_round_and_an_added_round_trains_only_itself(in_tmp, tiny_base, reward_dir,
                                                                                   monkeypatch, capsys):
    import alignment.stages.dpo as dpo

    real = dpo.run

    def fails_in_round_2(recipe, inputs, work_dir):
        if "round-2" in str(work_dir):
            raise RuntimeError("killed in round 2")
        return real(recipe, inputs, work_dir)

    path = write_recipe(in_tmp, tiny_base, reward_dir, 2)
    monkeypatch.setattr(dpo, "run", fails_in_round_2)
    with pytest.raises(RuntimeError, match="killed in round 2"):
        run(path)
    monkeypatch.setattr(dpo, "run", real)
    out = in_tmp / "runs" / "online"
    assert {p.name for p in out.iterdir()} >= {"round-1-pairs", "round-1", "round-2-pairs", "round-2.partial"}
    finished = {name: json.loads((out / name / "run_info.json").read_text())["finished"]
                for name in ("round-1-pairs", "round-1", "round-2-pairs")}
    capsys.readouterr()

    nodes = run(path)  # resumes: only round 2's dpo stage runs
    said = capsys.readouterr().out
    for name in ("online.round-1-pairs", "online.round-1", "online.round-2-pairs"):
        assert f"[{name}] up to date" in said
    assert "[online] running stage 'dpo' -> runs/online/round-2" in said
    assert all(json.loads((out / n / "run_info.json").read_text())["finished"] == t for n, t in finished.items())
    assert (out / "round-2" / "model.safetensors").is_file() and not (out / "round-2.partial").exists()

    # The per-round table: one line per round, with the samples, the pairs kept and DPO's loss.
    table = said[said.index("online: per round"):].splitlines()[2:4]
    assert [line.split()[0] for line in table] == ["1", "2"]
    summary = json.loads((out / "round-2-pairs" / "run_info.json").read_text())["summary"]
    assert summary["samples/prompts/samples"] == 20 and table[1].split()[1] == "20"
    assert int(table[1].split()[4]) == summary["kept"]
    assert summary["kept"] + sum(v for k, v in summary.items() if k.startswith("dropped/")) == 10
    assert "samples/prompts/kl" in summary and "samples/prompts/mean_score" in summary
    round2 = json.loads((out / "round-2" / "run_info.json").read_text())
    assert round2["inputs"] == {"model": "runs/online/round-1", "data": "runs/online/round-2-pairs"}

    # rounds: 3 -> rounds 1 and 2 are up to date; only round 3's two stages would run
    three = plan(write_recipe(in_tmp, tiny_base, reward_dir, 3))
    assert [n.out_dir.name for n in three if not is_current(n)] == ["round-3-pairs", "round-3"]
    assert all(is_current(n) for n in nodes)


LENGTH_RECIPE = """\
stage: online_dpo
model: {base}
reward_fn: lengths.py:longer
rounds: 1
online: {{k: 4, prompts_per_round: 10, max_new_tokens: 6, test_fraction: 0, scorer: reward_fn}}
dpo: {{loss_type: sigmoid, beta: 0.1}}
training: {{max_length: 48, per_device_train_batch_size: 4, max_steps: 2, learning_rate: 1.0e-3, logging_steps: 1}}
"""
LENGTH_FN = "def longer(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"


def test_rounds_scored_by_a_reward_function_pair_its_best_against_its_worst_and_rerun_when_it_changes(in_tmp, tiny_base):
    """scorer reward_fn with a function of the recipe's that scores a reply by its length: every pair is the
    longest sample against the shortest, with the function's scores, and round 1 trains on them. The
    function's file is in the pairs stage's hash: edited, the round samples and trains again."""
    (in_tmp / "lengths.py").write_text(LENGTH_FN)  # a relative path: from the working directory, as in RL
    path = in_tmp / "online.yaml"
    path.write_text(LENGTH_RECIPE.format(base=tiny_base))
    run(path)
    out = in_tmp / "runs" / "online"
    pairs = [json.loads(line) for line in (out / "round-1-pairs" / "train.jsonl").read_text().splitlines()]
    assert pairs and (out / "round-1" / "model.safetensors").is_file()
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert (pair["score_chosen"], pair["score_rejected"]) == (len(chosen), len(rejected))
        assert len(chosen) > len(rejected) and pair["generated"] is True
    summary = json.loads((out / "round-1-pairs" / "run_info.json").read_text())["summary"]
    assert summary["samples/prompts/empty_replies"] == sum(not p["rejected"][0]["content"].strip() for p in pairs)
    assert summary["samples/prompts/mean_score"] > 0

    assert all(is_current(n) for n in plan(path))
    (in_tmp / "lengths.py").write_text(LENGTH_FN.replace("float(len(c))", "-float(len(c))"))
    assert [n.out_dir.name for n in plan(path) if not is_current(n)] == ["round-1-pairs", "round-1"]


def test_a_reward_function_that_cannot_be_loaded_is_refused_when_planned(in_tmp, tiny_base):
    path = in_tmp / "online.yaml"
    path.write_text(LENGTH_RECIPE.format(base=tiny_base).replace("lengths.py:longer", "missing.py:longer"))
    with pytest.raises(RecipeError, match=r"online\.yaml: reward_fn 'missing\.py:longer': no such file 'missing\.py'"):
        plan(path)
    assert not (in_tmp / "runs").exists()


def test_sampled_replies_are_scored_as_the_rl_stages_score_them():
    """Three replies, batches of two: each function is called once per batch with lists (TRL's calling
    convention: prompts, completions, the prompt rows' columns, completion_ids, finished). f returns None for
    reply 1 (adds nothing); with the reward model's scores [1, -2, 4] and weights 0.5 / 2 / 1:
      reply 0: 0.5 * 1  + 2 * 1 + (1 + 0.5) = 4.0
      reply 1: 0.5 * -2 + 0     + (2 + 0)   = 1.0
      reply 2: 0.5 * 4  + 2 * 0 + (0 + 0.5) = 2.5
    Without the reward model, a reply that no function scores is refused."""
    from alignment.evaluation import Generation
    from data_prep.onpolicy import summed_scores

    calls = []

    def f(prompts, completions, answer):
        calls.append((list(prompts), list(completions), list(answer)))
        return [None if c == "b" else float(c == a) for c, a in zip(completions, answer)]

    def g(completion_ids, finished):
        return [len(ids) + (0.5 if done else 0.0) for ids, done in zip(completion_ids, finished)]

    gens = [Generation("p", "a", True, 2), Generation("p", "b", False, 2), Generation("q", "c", True, 1)]
    ids, columns = [[5], [6, 7], []], [{"answer": "a"}, {"answer": "a"}, {"answer": "x", "other": 1}]
    weights = {"reward_model": 0.5, "f": 2.0, "g": 1.0}
    assert summed_scores(gens, ids, columns, {"f": f, "g": g}, weights, [1.0, -2.0, 4.0], 2) == [4.0, 1.0, 2.5]
    assert calls == [(["p", "p"], ["a", "b"], ["a", "a"]), (["q"], ["c"], ["x"])]
    with pytest.raises(RecipeError, match=r"every function returned None for prompt 1 \('p'\)"):
        summed_scores(gens, ids, columns, {"f": f}, {"f": 1.0}, None, 2)
