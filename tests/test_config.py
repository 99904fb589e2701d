"""Recipe schema: strict keys, typed values, one-line errors, overrides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from alignment.recipe_file import load_recipe, parse_override
from alignment.errors import RecipeError
from alignment.pipeline import plan

from .conftest import RECIPES

GOOD = """\
stage: sft
model: some/model
lora:
  r: 8
training:
  learning_rate: 1.0e-4
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [(k, v, raw) for raw in overrides for (_, k, v) in [parse_override(raw)]])
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "text, expected",
    [
        # unknown keys at several depths, each with the closest valid key
        ("stage: sft\nmodel: m\nmodle_options: {}\n", ["r.yaml:3", "modle_options", "did you mean 'model_options'"]),
        ("stage: sft\nmodel: m\ntraining:\n  learnig_rate: 1\n", ["r.yaml:4", "training.learnig_rate", "'learning_rate'"]),
        ("stage: sft\nmodel: m\nlora:\n  r: 4\n  alpah: 8\n", ["r.yaml:5", "lora.alpah", "'alpha'"]),
        ("stage: init\ninit:\n  hiden_size: 8\n", ["init.hiden_size", "'hidden_size'"]),
        ("stage: sft\nmodel: {frm: x.yaml}\n", ["model.frm", "unknown key"]),
        # wrong types name the type expected
        ("stage: sft\nmodel: m\ntraining:\n  max_steps: ten\n", ["training.max_steps", "expected an integer", "'ten'"]),
        ("stage: sft\nmodel: m\ntraining:\n  learning_rate: fast\n", ["training.learning_rate", "expected a number"]),
        ("stage: sft\nmodel: m\nmodel_options:\n  trust_remote_code: maybe\n", ["model_options.trust_remote_code", "true or false"]),
        ("stage: sft\nmodel: m\ntraining:\n  report_to: 3\n", ["training.report_to", "expected a list"]),
        ("stage: sft\nmodel: m\nmodel_options:\n  dtype: float8\n", ["model_options.dtype", "'float32'", "'float8'"]),
        ("stage: sft\nmodel: m\ntraining: 5\n", ["training", "expected a mapping"]),
        # missing required fields
        ("model: m\n", ["stage: missing required key", "init, pretrain, sft"]),
        ("stage: sft\n", ["missing required key 'model'"]),
        ("stage: dance\nmodel: m\n", ["stage: got 'dance'"]),
        ("stage: [sft]\nmodel: m\n", ["stage: got ['sft']", "expected one of init"]),
        ("stage: sft\nmodel: m\nlora: {target_modules: []}\n", ["r.yaml:3", "lora.target_modules", "at least 1 item"]),
        # not a mapping / not YAML
        ("- stage: sft\n", ["expected a mapping of keys at the top level"]),
        ("stage: sft\nmodel: [unclosed\n", ["r.yaml:", "not valid YAML"]),
        # cross-field check
        ("stage: init\ninit:\n  hidden_size: 30\n  num_attention_heads: 4\n", ["init", "multiple of num_attention_heads"]),
    ],
)
def test_malformed_recipe_gives_one_line_error(tmp_path, text, expected):
    message = error_of(write(tmp_path, text))
    assert str(tmp_path / "r.yaml") in message
    for part in expected:
        assert part in message


def test_missing_file_is_named(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "cannot read recipe" in message


@pytest.mark.parametrize("raw", ["training.learning_rate", "=3", "training..x=1", "training.lr-x=1", "a.b=[unclosed"])
def test_bad_override_syntax(raw):
    with pytest.raises(RecipeError) as info:
        parse_override(raw)
    assert raw in str(info.value) and "\n" not in str(info.value)


def test_override_sets_typed_values_and_unknown_override_is_named(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, [(["training", "learning_rate"], "3e-5", "training.learning_rate=3e-5")])
    assert recipe.training.learning_rate == pytest.approx(3e-5)  # YAML reads 3e-5 as a string; the schema converts it
    message = error_of(path, ["training.learnin_rate=1"])
    assert "override 'training.learnin_rate=1'" in message and "did you mean 'learning_rate'" in message


def test_override_prefix_targets_a_recipe_in_the_chain(tmp_path):
    write(tmp_path, "stage: init\n", "base.yaml")
    top = write(tmp_path, "stage: sft\nmodel: {from: base.yaml}\n", "top.yaml")
    nodes = plan(top, ["base:init.hidden_size=64", "*:seed=7", "training.max_steps=3"])
    base, sft = nodes
    assert (base.name, sft.name) == ("base", "top")
    assert base.recipe.init.hidden_size == 64 and base.recipe.seed == 7 and base.recipe.training.max_steps == -1
    assert sft.recipe.seed == 7 and sft.recipe.training.max_steps == 3
    with pytest.raises(RecipeError, match=r"override 'basse:seed=1': no recipe 'basse' in this run \(base, top\)"):
        plan(top, ["basse:seed=1"])


def test_an_override_with_an_empty_recipe_name_quotes_what_was_typed(tmp_path):
    top = write(tmp_path, "stage: sft\n", "top.yaml")
    with pytest.raises(RecipeError) as caught:
        plan(top, [":training.max_steps=2"])
    message = str(caught.value)
    assert message.startswith("override ':training.max_steps=2': no recipe name before ':'") and "\n" not in message


def test_reference_to_missing_recipe_and_cycles(tmp_path):
    top = write(tmp_path, "stage: sft\nmodel: {from: gone.yaml}\n", "top.yaml")
    with pytest.raises(RecipeError, match="gone.yaml.*no such recipe"):
        plan(top)
    write(tmp_path, "stage: sft\nmodel: {from: b.yaml}\n", "a.yaml")
    write(tmp_path, "stage: sft\nmodel: {from: a.yaml}\n", "b.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        plan(tmp_path / "a.yaml")


def test_shipped_recipes_are_valid_and_launchable():
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = load_recipe(path)
        first = path.read_text().splitlines()[0]
        assert first.startswith("launcher: str = ") and path.read_text().rstrip().endswith('# """'), path
        # The file is also a Python program whose first statement carries the whole recipe in a
        # string: read that way, it is the same recipe (nothing after the string's end).
        module = ast.parse(path.read_text(), str(path))
        assert len(module.body) == 1, path
        _, embedded = module.body[0].value.values  # launch(__file__) or r"""..."""
        assert yaml.safe_load(embedded.value) == {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "launcher"}
        assert recipe.stage == yaml.safe_load(embedded.value)["stage"]


@pytest.mark.parametrize("text, expected", [
    # a KL term in the loss with k1: expected gradient 0 (tests/test_losses.py enumerates it)
    ("stage: grpo\nmodel: m\nreward_fn: gold\ngrpo:\n  kl_estimator: k1\n",
     "kl_estimator 'k1' in the loss has expected gradient 0 and pulls nothing toward the reference: use 'k2' or 'k3'"),
    ("stage: rloo\nmodel: m\nreward_fn: gold\nrloo:\n  kl_in: loss\n", "kl_estimator 'k1' in the loss has expected gradient 0"),
    ("stage: grpo\nmodel: m\nreward_fn: gold\ngrpo:\n  beta: 0\n  kl_control: adaptive\n",
     "kl_control 'adaptive' with beta 0 never moves (its update multiplies beta)"),
    ("stage: ppo\nmodel: m\nreward_model: r\nppo:\n  kl_coef: 0\n  kl_control: adaptive\n",
     "kl_control 'adaptive' with kl_coef 0 never moves"),
    ("stage: grpo\nmodel: m\nreward_fn: [gold, r.py:f, gold]\n",
     "'gold' is listed more than once; list it once and give it the sum of its weights in reward_weights"),
    ("stage: grpo\nmodel: m\nreward_fn: gold\ngrpo:\n  response_length: 8\n  soft_punish_cache: 9\n",
     "soft_punish_cache 9 is longer than response_length 8"),
    ("stage: grpo\nmodel: m\nreward_fn: gold\ngrpo:\n  kl_estimator: k4\n", "grpo.kl_estimator: expected 'k1', 'k2' or 'k3', got 'k4'"),
])
def test_rl_settings_without_a_meaning_are_refused_in_one_line(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


def test_rl_settings_with_a_meaning_are_accepted(tmp_path):
    """k1 with no KL at all (beta 0, fixed), k2/k3 in the loss, k1 in the reward; DAPO's and GSPO's keys
    under TRL's names."""
    for text in ("stage: grpo\nmodel: m\nreward_fn: gold\ngrpo:\n  kl_estimator: k1\n  beta: 0\n",
                 "stage: rloo\nmodel: m\nreward_fn: gold\nrloo:\n  kl_in: loss\n  kl_estimator: k2\n",
                 "stage: grpo\nmodel: m\nreward_fn: gold\ngrpo:\n  kl_in: reward\n  kl_estimator: k1\n"):
        load_recipe(write(tmp_path, text))
    recipe = load_recipe(write(tmp_path, "stage: grpo\nmodel: m\nreward_fn: gold\ngrpo:\n  epsilon_high: 0.28\n"
                               "  importance_sampling_level: sequence\n  dynamic_sampling: true\n  soft_punish_cache: 4\n"))
    o = recipe.rl
    assert (o.ratio_clip_high, o.ratio_level, o.drops_equal_groups, o.soft_punish_cache) == (0.28, "sequence", True, 4)


@pytest.mark.parametrize("stage, rows", [("pretrain", 20000), ("sft", 4000), ("reward", 4000), ("dpo", 4000),
                                         ("kto", 4000), ("ppo", 2000), ("grpo", 2000), ("rloo", 2000), ("init", None)])
def test_num_examples_default_is_the_stages_demo_size_and_a_file_is_read_whole(tmp_path, stage, rows):
    """The schema holds each stage's demo size (docs/recipe_keys.md shows it); a file or a prep output
    is read whole unless num_examples is set; null with demo is the stage's size again (init: its
    tokenizer corpus, init.tokenizer_examples)."""
    def data(*overrides):
        more = {"ppo": "reward_fn: gold\n", "grpo": "reward_fn: gold\n", "rloo": "reward_fn: gold\n"}
        text = f"stage: {stage}\n" + ("" if stage == "init" else "model: some/model\n") + more.get(stage, "")
        path = write(tmp_path, text, f"{stage}.yaml")
        return load_recipe(path, [(k, v, raw) for raw in overrides for (_, k, v) in [parse_override(raw)]]).data

    assert data().num_examples == rows
    assert data("data.num_examples=null").num_examples == rows
    assert data("data.num_examples=7").num_examples == 7
    (tmp_path / "rows.jsonl").write_text("{}\n")
    assert data(f"data.source={tmp_path / 'rows.jsonl'}").num_examples is None
    assert data(f"data.source={tmp_path / 'rows.jsonl'}", "data.num_examples=7").num_examples == 7


def test_demo_rows_come_from_the_schema():
    from alignment.config import SFTDataOptions
    from alignment.data import load_rows

    asked = []
    rows = load_rows(SFTDataOptions(), lambda n, seed: asked.append(n) or [{"n": i} for i in range(n)])
    assert asked == [4000] and len(rows) == 4000
    load_rows(SFTDataOptions(num_examples=3), lambda n, seed: asked.append(n) or [])
    assert asked[-1] == 3


def test_a_home_of_no_user_is_refused_not_made_a_directory(tmp_path):
    """`~nosuchuser/x` is not expanded by the system; kept as it is, it would become a directory
    literally called `~nosuchuser` under the current one."""
    with pytest.raises(RecipeError, match=r"output_dir: '~nosuchuser/x': no user 'nosuchuser' on this machine"):
        load_recipe(RECIPES / "sft.yaml", [(["output_dir"], "~nosuchuser/x", "output_dir=~nosuchuser/x")])
    assert load_recipe(RECIPES / "sft.yaml", [(["output_dir"], "~/x", "output_dir=~/x")]).output_dir == str(Path.home() / "x")
