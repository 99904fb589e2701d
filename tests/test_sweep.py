"""`alignment sweep`: expansion of grids and lists, shared parents built once, a killed sweep
resumes, and the frontier report (Pareto front on hand-made points, curves drawn in a browser)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from alignment.cli import main
from alignment.errors import RecipeError
from alignment.frontier import kl_spreads, pareto_front, write_frontier
from alignment.sweep import MARKER, expand, plan_sweep, run_sweep
from tests.conftest import RECIPES
from tests.test_compare_report import drawn_plots, rendered_dom


def sweep_file(directory: Path, tiny_base: Path, **more) -> Path:
    """A micro sweep: SFT on the tiny base (2 steps), then sigmoid DPO at two betas and IPO at one."""
    recipe = {
        "stage": "sweep",
        "output_dir": "out/sweep",
        "set": {
            "sft:model": str(tiny_base), "sft:data.num_examples": 64, "sft:training.max_steps": 2,
            "sft:training.per_device_train_batch_size": 8, "*:training.logging_steps": 1,
            "data.num_examples": 32, "data.eval_examples": 8, "training.max_steps": 2,
            "training.per_device_train_batch_size": 8,
        },
        "methods": {
            "dpo": {"recipe": str(RECIPES / "dpo.yaml"), "set": {"dpo.loss_type": "sigmoid"}, "grid": {"dpo.beta": [0.1, 1.0]}},
            "ipo": {"recipe": str(RECIPES / "dpo.yaml"), "points": [{"dpo.loss_type": "ipo", "dpo.beta": 0.5}]},
        },
        "baseline": {"from": str(RECIPES / "sft.yaml")},
        "prompts": {"num_prompts": 6},
        "generation": {"max_new_tokens": 6, "samples_per_prompt": 2},
        **more,
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- expansion


def test_grid_and_list_expand_per_method_then_cross_the_sweep_grid(tmp_path, tiny_base):
    path = sweep_file(tmp_path, tiny_base, grid={"seed": [1, 2]})
    from alignment.recipe_file import load_recipe

    points = expand(load_recipe(path), path, tmp_path / "s")
    assert [p.label for p in points] == [
        "dpo beta=0.1 seed=1", "dpo beta=0.1 seed=2", "dpo beta=1.0 seed=1", "dpo beta=1.0 seed=2",
        "ipo loss_type=ipo beta=0.5 seed=1", "ipo loss_type=ipo beta=0.5 seed=2",
    ]
    first = points[0]
    assert first.settings["dpo.loss_type"] == "sigmoid" and first.settings["dpo.beta"] == 0.1 and first.settings["seed"] == 1
    assert first.settings["sft:training.max_steps"] == 2  # the sweep's `set` reaches every point
    assert first.out_dir == tmp_path / "s" / "dpo" / "beta-0.1_seed-1"
    assert len({p.out_dir for p in points}) == 6
    assert 'dpo.beta=0.1' in first.overrides() and f'output_dir="{first.out_dir}"' in first.overrides()


def test_points_share_their_parents_and_the_baseline(in_tmp, tiny_base):
    sweep = plan_sweep(sweep_file(in_tmp, tiny_base))
    names = [n.name for n in sweep.nodes]
    assert names.count("sft") == 1 and names.count("dpo") == 3  # one sft node for every point and the baseline
    sft = next(n for n in sweep.nodes if n.name == "sft")
    assert all(p.nodes[0] is sft for p in sweep.points)
    assert sweep.baseline[2] is sft and sft.out_dir == Path("out/sweep/chain/sft")
    assert {p.nodes[-1].recipe.dpo.beta for p in sweep.points} == {0.1, 1.0, 0.5}


@pytest.mark.parametrize("where, key", [("methods.dpo.grid", "dpo.betta"), ("set", "sft:training.max_stepz")])
def test_a_key_that_does_not_exist_is_one_line_naming_it(in_tmp, tiny_base, where, key, capsys):
    path = sweep_file(in_tmp, tiny_base)
    data = yaml.safe_load(path.read_text())
    node = data
    for part in where.split("."):
        node = node[part]
    node[key] = [1] if "grid" in where else 1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and key.rpartition(":")[2] in err
    assert not (in_tmp / "out").exists()


def test_bad_sweep_recipes_are_one_line(in_tmp, tiny_base):
    path = sweep_file(in_tmp, tiny_base)
    data = yaml.safe_load(path.read_text())
    for change, expected in [
        ({"methods": {"dpo": {"recipe": "nope.yaml"}}}, "methods.dpo.recipe: no such recipe 'nope.yaml'"),
        ({"grid": {"seed": []}}, "non-empty list"),
        ({"baseline": None}, "missing required key 'baseline'"),
        ({"methods": {}}, "at least one method"),
    ]:
        path.write_text(yaml.safe_dump({**data, **change}, sort_keys=False))
        with pytest.raises(RecipeError, match=expected):
            plan_sweep(path)


# --------------------------------------------------------------------------- running


def _finished(directory: Path) -> str:
    return json.loads((directory / "run_info.json").read_text())["finished"] + str((directory / "run_info.json").stat().st_mtime_ns)


def test_sweep_runs_resumes_and_reuses_its_parents(in_tmp, tiny_base, monkeypatch, capsys):
    import alignment.pipeline as pipeline

    path = sweep_file(in_tmp, tiny_base)
    real, ran = pipeline.run_node, []

    def killed_after_two(node, state):  # the sweep dies while its third stage runs
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append(node.name)
        return real(node, state)

    monkeypatch.setattr(pipeline, "run_node", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path)
    assert ran == ["sft", "dpo"]
    sweep = plan_sweep(path)
    first = sweep.points[0].nodes[-1].out_dir
    stamp = _finished(first)

    ran.clear()
    monkeypatch.setattr(pipeline, "run_node", lambda node, state: (ran.append(node.name), real(node, state))[1])
    run_sweep(path)
    assert ran == ["dpo", "dpo"]  # the two points left; neither sft nor the finished point again
    assert _finished(first) == stamp
    out = in_tmp / "out" / "sweep"
    report = json.loads((out / "report.json").read_text())
    assert {p["label"] for p in report["points"]} == {"sft", "dpo beta=0.1", "dpo beta=1.0", "ipo loss_type=ipo beta=0.5"}
    assert all(p["kl_mean"] is not None for p in report["points"])
    # the front is every point no other point beats on both axes (the baseline alone would not do)
    at = {p["label"]: (max(p["kl_mean"], 0.0), p["gold_mean"]) for p in report["points"]}
    undominated = [label for label, (k, s) in at.items()
                   if not any(k2 <= k and s2 >= s and (k2 < k or s2 > s) for k2, s2 in at.values())]
    assert report["front"] == undominated and max(at, key=lambda label: at[label][1]) in report["front"]
    assert set(report["front_beyond_ci"]) <= set(report["front"])  # the replies' scores reached the report
    assert all(p["front_beyond_ci"] is not None for p in report["points"])
    assert (out / "compare" / "report.html").is_file() and (out / "report.md").is_file()
    assert "Frontier: sweep" in capsys.readouterr().out

    # A second sweep over the same parents with one more point builds that point only (here in a
    # process of its own: --jobs 2), and the comparison again; an unchanged sweep builds and compares nothing.
    data = yaml.safe_load(path.read_text())
    data["methods"]["dpo"]["grid"]["dpo.beta"].append(0.3)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    ran.clear()
    run_sweep(path, jobs=2)
    assert ran == []  # nothing in this process: sft is up to date, the new point ran apart
    assert json.loads((out / "dpo" / "beta-0.3" / "run_info.json").read_text())["status"] == "finished"
    assert "[dpo] running stage 'dpo'" in (out / "logs" / "dpo" / "beta-0.3.log").read_text()
    assert _finished(first) == stamp
    ran.clear()
    capsys.readouterr()
    run_sweep(path)
    assert ran == [] and "comparison up to date" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert "dpo beta=0.3" in html and "Pareto front" in html


def test_a_sweep_never_writes_into_a_directory_it_did_not_make(in_tmp, tiny_base, capsys):
    path = sweep_file(in_tmp, tiny_base)
    (in_tmp / "out" / "sweep").mkdir(parents=True)
    (in_tmp / "out" / "sweep" / "notes.txt").write_text("mine")
    assert main(["sweep", str(path)]) == 2
    assert "holds files the toolkit did not write" in capsys.readouterr().err
    assert sorted(p.name for p in (in_tmp / "out" / "sweep").iterdir()) == ["notes.txt"]


def test_run_and_launch_of_a_sweep_recipe_run_the_sweep(in_tmp, tiny_base, capsys):
    path = sweep_file(in_tmp, tiny_base)
    assert main(["run", str(path), "--dry-run"]) == 0  # what `accelerate launch sweep.yaml` runs
    out = capsys.readouterr().out
    assert "4 points" not in out and "3 points" in out and "will run" in out and "point 'dpo beta=0.1'" in out
    from alignment.pipeline import plan

    with pytest.raises(RecipeError, match="is a sweep recipe: run it with `alignment sweep"):
        plan(path)


# --------------------------------------------------------------------------- the frontier math and report


def test_pareto_front_by_hand():
    # (KL, score): b dominates c (less KL, more score); a and d trade off; e ties d exactly.
    points = [(0.0, 0.80), (0.5, 0.90), (0.7, 0.85), (2.0, 0.95), (2.0, 0.95), (3.0, 0.95)]
    assert pareto_front(points) == [True, True, False, True, True, False]
    assert pareto_front([(1.0, 0.5)]) == [True]


def test_kl_spread_by_hand():  # over-optimisation and the front's intervals: tests/test_frontier.py
    assert not kl_spreads([(0.20, 0.30), (0.25, 0.35), (0.28, 0.31)])  # every interval overlaps
    assert kl_spreads([(0.20, 0.30), (0.25, 0.35), (0.40, 0.50)])  # the first and last are disjoint


def _summary():
    def m(kl, gold, reward):
        return {"kl_mean": kl, "kl_lo": kl * 0.8, "kl_hi": kl * 1.2 + 0.01, "gold_mean": gold, "gold_lo": gold - 0.02,
                "gold_hi": gold + 0.02, "reward_mean": reward, "reward_lo": reward - 0.1, "reward_hi": reward + 0.1,
                "polite_mean": 0.25, "content_mean": gold - 0.5, "concise_mean": 0.25, "eos_rate": 1.0, "length_mean": 5.0}
    models = {"sft": m(0.0, 0.80, 0.0), "dpo a": m(0.2, 0.86, 0.5), "dpo b": m(1.0, 0.90, 1.0), "ppo a": m(0.5, 0.84, 1.2),
              "ppo b": m(2.0, 0.80, 2.0), "ppo c": m(4.0, 0.70, 3.0)}
    return {"score_kinds": ["gold", "reward"], "parts": ["polite", "content", "concise"], "baseline": "sft", "models": models,
            "settings": {"num_prompts": 10, "samples_per_prompt": 2, "decoding": "T=1"}}


def _replies(summary: dict, spread: float = 0.1) -> dict:
    """Per-reply gold and reward of 10 prompts x 2 samples whose means are the summary's: each
    model's mean plus the same offsets on every prompt (+-spread), a small wobble between points."""
    offsets = np.tile(np.linspace(-spread, spread, 10), (2, 1)).T.reshape(-1)  # prompt-major, 2 samples each
    found = {}
    for i, (label, m) in enumerate(summary["models"].items()):
        wobble = 0.01 * np.where(np.arange(20) % 4 < 2, 1.0, -1.0) * (1 if i % 2 else -1)
        for kind in ("gold", "reward"):
            found.setdefault(kind, {})[label] = list(m[f"{kind}_mean"] + offsets + wobble)
    return found


def test_frontier_report_draws_a_curve_per_method_and_the_front(tmp_path):
    methods = {"dpo a": ("dpo", {"beta": 1}), "dpo b": ("dpo", {"beta": 0.1}), "ppo a": ("ppo", {}), "ppo b": ("ppo", {}),
               "ppo c": ("ppo", {})}
    summary = _summary()
    text = write_frontier(tmp_path, summary, methods, heading="Frontier: test", generator=MARKER, replies=_replies(summary))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["front"] == ["sft", "dpo a", "dpo b"]
    # paired on the same prompts, ppo b and ppo c fall below ppo a (0.84) while the reward rises; c also below b
    falls = [n for n in report["notes"] if n.startswith("ppo: gold falls while the reward rises")]
    assert len(falls) == 2 and "'ppo b' (KL 2) against 'ppo a' (KL 0.5): gold -0.040" in falls[0]
    assert "'ppo c' (KL 4) against 'ppo a' (KL 0.5): gold -0.140" in falls[1] and "over the method's 3 pairs" in falls[1]
    assert not any(n.startswith("dpo: gold falls") for n in report["notes"])
    assert "ppo: from KL 0.5 to 4, reward +1.800, gold -0.140" in report["notes"]
    # dpo a's KL interval [0.16, 0.25] lies above the baseline's and below dpo b's [0.8, 1.21]; each scores
    # beyond the paired intervals above every point that might have less KL: all three stay on the front
    assert report["front_beyond_ci"] == ["sft", "dpo a", "dpo b"]
    assert "dpo b" in text and "Pareto front by gold means" in text and "| dpo b | dpo | " in (tmp_path / "report.md").read_text()
    # dpo b at 0.865: still on the front by means (above dpo a's 0.86), but dpo a's KL interval [0.16, 0.25]
    # reaches below dpo b's and their paired gold difference (-0.005 +- 0.013) reaches 0
    summary["models"]["dpo b"]["gold_mean"] = 0.865
    (tmp_path / "close").mkdir()
    write_frontier(tmp_path / "close", summary, methods, heading="Frontier: close", generator=MARKER, replies=_replies(summary))
    close = json.loads((tmp_path / "close" / "report.json").read_text())
    assert close["front"] == ["sft", "dpo a", "dpo b"] and close["front_beyond_ci"] == ["sft", "dpo a"]
    marks = {p["label"]: p["front_beyond_ci"] for p in close["points"]}
    assert marks == {"sft": True, "dpo a": True, "dpo b": False, "ppo a": False, "ppo b": False, "ppo c": False}
    assert "beyond the 95% intervals (no other point's KL interval reaches below theirs with a paired gold difference " \
           "whose interval reaches 0): sft, dpo a;" in " ".join(close["notes"])
    md = (tmp_path / "close" / "report.md").read_text()
    assert md.count("| ** |") == 2 and md.count("| * |") == 1
    plots = drawn_plots(rendered_dom(tmp_path / "report.html", tmp_path))
    assert len(plots) == 2  # gold against KL, reward against KL
    gold, reward = plots["plot0"], plots["plot1"]
    assert gold[0] == 4 and gold[1] == 6  # baseline, dpo, ppo and the front; a marker for each of the 6 models
    assert reward[0] == 3 and reward[1] == 6  # no front on the proxy's plot
    assert "| dpo b | dpo |" in (tmp_path / "report.md").read_text()


def test_a_baseline_or_reward_model_given_as_a_path_is_keyed_by_its_content(in_tmp, tiny_base):
    """Retraining the baseline or the reward model in place (same path, new files) makes the
    comparison stale: its key follows the files, not the path string."""
    import shutil

    from alignment.sweep import comparison_key

    base, judge = in_tmp / "base", in_tmp / "judge"
    shutil.copytree(tiny_base, base)
    shutil.copytree(tiny_base, judge)
    path = sweep_file(in_tmp, tiny_base, baseline=str(base), reward_model=str(judge))
    first = comparison_key(plan_sweep(path))
    assert comparison_key(plan_sweep(path)) == first  # nothing changed: up to date
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "initializer_range": 0.5}))  # retrained in place
    second = comparison_key(plan_sweep(path))
    assert second != first
    weights = judge / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert comparison_key(plan_sweep(path)) not in (first, second)


def test_the_sweeps_world_reaches_every_chain_and_its_prompts(in_tmp, tiny_base):
    path = sweep_file(in_tmp, tiny_base, world="hard")
    sweep = plan_sweep(path)
    assert {n.recipe.world for n in sweep.nodes} == {"hard"} and sweep.recipe.world == "hard"
    default = plan_sweep(sweep_file(in_tmp, tiny_base))
    assert {n.recipe.world for n in default.nodes} == {"default"}
    assert default.nodes[0].hash != sweep.nodes[0].hash  # another world, another sft
    from alignment.sweep import comparison_key

    assert comparison_key(default) != comparison_key(sweep)
    # `*:world=hard` on the command line does the same, the sweep's prompts included
    assert plan_sweep(sweep_file(in_tmp, tiny_base), ["*:world=hard"]).recipe.world == "hard"
