"""Bad inputs, run as users type them (`alignment run RECIPE KEY=VALUE...`, in process): each
gives one line on stderr naming the key, file or line, exit status 2, no traceback, and
leaves every file as it was (nothing written, nothing removed, input checkpoints unchanged)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from alignment import models
from alignment.cli import main
from alignment.errors import RecipeError

from .conftest import RECIPES

SFT = [str(RECIPES / "sft.yaml"), "data.num_examples=16", "training.max_steps=1"]
DPO = [str(RECIPES / "dpo.yaml"), "data.num_examples=24", "data.eval_examples=8", "training.max_steps=1"]
REWARD = [str(RECIPES / "reward.yaml"), "data.num_examples=24", "data.eval_examples=8", "training.max_steps=1"]


def tree(*roots: Path) -> dict[str, str]:
    """Every file and directory under `roots`, with each file's content hash."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


@pytest.fixture
def fails_cleanly(in_tmp, tiny_base, capsys):
    """Run the CLI; return its one error line after checking status, traceback and files."""

    def check(argv: list[str], *expected: str) -> str:
        before = tree(in_tmp, tiny_base)
        status = main(["run", *argv])
        err = capsys.readouterr().err
        assert status == 2, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, and the last word
        for part in expected:
            assert part in errors[0], errors[0]
        assert tree(in_tmp, tiny_base) == before
        return errors[0]

    return check


def recipe_file(directory: Path, text: str) -> str:
    path = directory / "r.yaml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ recipes


def test_misspelt_scheduler_is_named_with_the_closest_one(fails_cleanly, in_tmp):
    path = recipe_file(in_tmp, "stage: sft\nmodel: m\ntraining:\n  lr_scheduler_type: cosinee\n")
    fails_cleanly([path], "r.yaml:4: training.lr_scheduler_type", "did you mean 'cosine'", "constant_with_warmup")


@pytest.mark.parametrize(
    "value, expected",
    [("sdpaa", "did you mean 'sdpa'"), ("flash_attention_2", "not available here: it needs the flash-attn package")],
)
def test_attention_implementation_unknown_or_not_installed(fails_cleanly, tiny_base, monkeypatch, value, expected):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)  # as on a machine without it
    fails_cleanly([*SFT, f"model={tiny_base}", f"model_options.attn_implementation={value}"],
                  "model_options.attn_implementation", expected)


def test_key_written_twice_is_an_error_not_a_silent_drop(fails_cleanly, in_tmp):
    path = recipe_file(in_tmp, "stage: sft\nmodel: m\ntraining:\n  max_steps: 3\nseed: 1\ntraining:\n  learning_rate: 1.0e-3\n")
    fails_cleanly([path], "r.yaml:6", "'training' is written twice (first at line 3)")


@pytest.mark.parametrize("value, expected", [("0", "got 0"), ("-2", "got -2"), ("true", "expected an integer, got True")])
def test_max_steps_must_be_positive_or_minus_one(fails_cleanly, tiny_base, value, expected):
    fails_cleanly([*SFT, f"model={tiny_base}", f"training.max_steps={value}"], "training.max_steps", expected)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"stage: sft\nmodel: m\n\xff\xfe\x00\x01", "r.yaml:3: not a text file (byte 0xff is not UTF-8)"),
        (b"stage: sft\nmodel: m\n\x00\x01\x02", "r.yaml:3: not a text file (control character 0x00)"),
    ],
)
def test_binary_or_non_utf8_recipe(fails_cleanly, in_tmp, content, expected):
    path = in_tmp / "r.yaml"
    path.write_bytes(content)
    fails_cleanly([str(path)], expected)


# ------------------------------------------------------------------ model inputs


@pytest.mark.parametrize("argv", [SFT, DPO], ids=["sft", "dpo"])
def test_lora_target_modules_naming_no_module(fails_cleanly, tiny_base, argv):
    fails_cleanly([*argv, f"model={tiny_base}", "lora={target_modules: [q_proj, qproj]}"],
                  "lora.target_modules: 'qproj' names no module", "q_proj, up_proj, v_proj")


def test_corrupt_weights_file_is_named(fails_cleanly, tiny_base, in_tmp):
    broken = in_tmp / "broken"
    shutil.copytree(tiny_base, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    fails_cleanly([*SFT, f"model={broken}"], f"{weights}: not a readable safetensors file")


def test_model_directory_without_tokenizer(fails_cleanly, tiny_base, in_tmp):
    bare = in_tmp / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, bare / name)
    line = fails_cleanly([*SFT, f"model={bare}"], f"cannot load tokenizer from {bare}: the directory has no tokenizer")
    assert line.endswith("save the tokenizer beside the model")  # the whole sentence, not its first line


@pytest.fixture
def classifier_dir(tiny_base, in_tmp) -> Path:
    """A reward-model checkpoint: tiny_base's weights under a sequence-classification config."""
    path = in_tmp / "rm"
    shutil.copytree(tiny_base, path)
    config = json.loads((path / "config.json").read_text())
    one_label = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    (path / "config.json").write_text(json.dumps({**config, **one_label}))
    return path


@pytest.mark.parametrize(
    "argv, role, key",
    [(SFT, "model={rm}", "model"), (DPO, "ref_model={rm}", "ref_model"), (DPO, "report.models={{a: {rm}}}|report.baseline=null", "report.models.a")],
    ids=["policy", "reference", "report"],
)
def test_reward_model_given_where_a_policy_is_expected(fails_cleanly, tiny_base, classifier_dir, argv, role, key):
    fails_cleanly([*argv, f"model={tiny_base}", *role.format(rm=classifier_dir).split("|")],
                  f"{key}: {classifier_dir} is a sequence classifier", "expected a causal language model")


def test_bad_checkpoint_late_in_a_chain_stops_it_before_the_first_stage(fails_cleanly, classifier_dir):
    """dpo.yaml builds init -> pretrain -> sft first; its bad ref_model stops the run before init."""
    fails_cleanly([str(RECIPES / "dpo.yaml"), f"ref_model={classifier_dir}"], f"ref_model: {classifier_dir} is a sequence")


def test_policy_given_where_a_reward_model_is_expected(tiny_base, classifier_dir):
    with pytest.raises(RecipeError) as info:
        models.check_model_kind(str(tiny_base), "classifier", key="reward_model")
    assert str(info.value) == (f"reward_model: {tiny_base} is a causal language model, its config says LlamaForCausalLM; "
                               "expected a one-label sequence classifier (a reward model; train one with the reward stage)")
    models.check_model_kind(str(classifier_dir), "classifier", key="reward_model")  # the right kind passes


def test_hub_id_without_network_fails_at_once(fails_cleanly, monkeypatch):
    """No HF_HUB_OFFLINE, and the hub's host does not answer: the loaders go to the local cache
    only (no minute of download retries) and the line says why."""
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models.socket, "create_connection", no_network)
    models.hub_unreachable.cache_clear()
    try:
        fails_cleanly([*SFT, "model=nobody-here/no-such-model"], "cannot load tokenizer 'nobody-here/no-such-model'",
                      "the hub cannot be reached (huggingface.co: Name or service not known)")
    finally:
        models.hub_unreachable.cache_clear()


# ------------------------------------------------------------------ data against max_length


@pytest.mark.parametrize("argv, rows", [(SFT, "16 conversations"), (REWARD, "16 training pairs"), (DPO, "16 training pairs")],
                         ids=["sft", "reward", "dpo"])
def test_every_row_too_long_for_max_length(fails_cleanly, tiny_base, argv, rows):
    fails_cleanly([*argv, f"model={tiny_base}", "training.max_length=4"],
                  f"training.max_length: 4: all {rows} were dropped")


# ------------------------------------------------------------------ recipes, checked at plan time (before any stage runs)


def test_missing_chat_template_file(fails_cleanly, tiny_base):
    fails_cleanly([*SFT, f"model={tiny_base}", "model_options.chat_template=missing.jinja"],
                  "model_options.chat_template: 'missing.jinja': no such file")


def test_chat_template_file_that_is_not_utf8(fails_cleanly, tiny_base, in_tmp):
    (in_tmp / "t.jinja").write_bytes(b"{{ messages }}\xff\xfe\n")
    fails_cleanly([*SFT, f"model={tiny_base}", "model_options.chat_template=t.jinja"],
                  "model_options.chat_template: 't.jinja': not UTF-8 text (byte 0xff at offset 14)")


@pytest.mark.parametrize("as_file", [False, True], ids=["text", "file"])
def test_chat_template_that_does_not_compile(fails_cleanly, tiny_base, in_tmp, as_file):
    broken = "{% for m in messages %}{{ m.content }"
    if as_file:
        (in_tmp / "t.jinja").write_text(broken + "\n")
    value = "t.jinja" if as_file else json.dumps(broken)  # a quoted YAML scalar
    line = fails_cleanly([*SFT, f"model={tiny_base}", f"model_options.chat_template={value}"],
                         "model_options.chat_template: ", "does not compile, Jinja syntax error on line 1")
    assert ("'t.jinja': the chat template" in line) == as_file, line
    assert "row" not in line, line


def test_model_whose_chat_template_does_not_compile(fails_cleanly, tiny_base, in_tmp):
    bad = in_tmp / "bad"
    shutil.copytree(tiny_base, bad)
    (bad / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    fails_cleanly([*SFT, f"model={bad}"], f"{bad / 'chat_template.jinja'}: the tokenizer's chat_template does not compile, "
                  "Jinja syntax error on line 1", "model_options.chat_template: FILE")


def test_weights_that_do_not_match_config_json(fails_cleanly, tiny_base, in_tmp):
    bad = in_tmp / "bad"
    shutil.copytree(tiny_base, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    fails_cleanly([*SFT, f"model={bad}"], f"model: {bad / 'model.safetensors'}: tensor 'model.layers.0.mlp.",
                  "the weights do not match config.json")


def test_data_from_a_recipe_that_is_not_prep_is_refused_before_it_is_built(fails_cleanly, in_tmp):
    (in_tmp / "r.yaml").write_text(f"stage: dpo\nmodel: {{from: {RECIPES / 'sft.yaml'}}}\ndata:\n  source: {{from: {RECIPES / 'sft.yaml'}}}\n")
    fails_cleanly([str(in_tmp / "r.yaml")], "data.source: from: sft.yaml is a 'sft' recipe", "output of a 'prep' recipe")


@pytest.mark.parametrize("role", ["model", "ref_model"])
def test_model_from_a_compare_or_prep_recipe_is_refused_before_anything_runs(fails_cleanly, in_tmp, role):
    (in_tmp / "c.yaml").write_text(f"stage: compare\nmodels: {{a: {RECIPES / 'sft.yaml'}, b: x}}\n")
    (in_tmp / "p.yaml").write_text("stage: prep\nprep: {kind: pairs}\n")
    other = "" if role == "model" else f"model: {{from: {RECIPES / 'sft.yaml'}}}\n"
    (in_tmp / "r.yaml").write_text(f"stage: dpo\n{other}{role}: {{from: c.yaml}}\n")
    fails_cleanly([str(in_tmp / "r.yaml")], f"{in_tmp / 'r.yaml'}: {role}: from: c.yaml is a 'compare' recipe; "
                  "a compare stage writes a report, not a model")
    (in_tmp / "r.yaml").write_text(f"stage: dpo\n{other}{role}: {{from: p.yaml}}\n")
    fails_cleanly([str(in_tmp / "r.yaml")], f"{role}: from: p.yaml is a 'prep' recipe; a prep stage writes data")


def test_data_from_a_prep_recipe_of_another_kind_is_refused_before_it_is_built(fails_cleanly, in_tmp):
    (in_tmp / "p.yaml").write_text("stage: prep\nprep: {kind: sft}\n")
    (in_tmp / "r.yaml").write_text(f"stage: dpo\nmodel: {{from: {RECIPES / 'sft.yaml'}}}\ndata:\n  source: {{from: p.yaml}}\n")
    fails_cleanly([str(in_tmp / "r.yaml")], "r.yaml: data.source: from: p.yaml makes 'sft' rows (its prep.kind)",
                  "a dpo recipe reads 'pairs' rows")


def test_a_report_model_directory_that_does_not_exist_is_refused_before_training(fails_cleanly, tiny_base, in_tmp):
    missing = in_tmp / "nonexistent" / "model"
    fails_cleanly([*SFT, f"model={tiny_base}", f"report.models={{x: {missing}, y: sft}}"],
                  f"report.models.x: '{missing}': no such directory")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 is refused on a CPU only")
def test_fp16_on_a_cpu_is_refused_before_training(fails_cleanly, tiny_base):
    fails_cleanly([*SFT, f"model={tiny_base}", "training.mixed_precision=fp16"],
                  "sft.yaml: training.mixed_precision: fp16 needs a GPU")


@pytest.mark.parametrize("override, expected", [
    ("training.learning_rate=.inf", "training.learning_rate: expected a finite number, got inf"),
    ("training.max_grad_norm=.nan", "training.max_grad_norm: expected a finite number, got nan"),
])
def test_non_finite_numbers(fails_cleanly, tiny_base, override, expected):
    fails_cleanly([*SFT, f"model={tiny_base}", override], expected)


def test_non_finite_dpo_beta(fails_cleanly, tiny_base):
    fails_cleanly([str(RECIPES / "dpo.yaml"), f"model={tiny_base}", "dpo.beta=.inf"], "dpo.beta: expected a finite number, got inf")


@pytest.mark.parametrize("recipe, override, key", [
    ("sft.yaml", "data.prompt_field=q", "data.prompt_field"),
    ("prep.yaml", "lora={}", "lora"),
    ("prep.yaml", "training.max_steps=3", "training"),
    ("init.yaml", "model=x", "model"),
    ("init.yaml", "lora={r: 4}", "lora"),
])
def test_keys_a_stage_never_reads(fails_cleanly, recipe, override, key):
    stage = recipe.removesuffix(".yaml")
    fails_cleanly([str(RECIPES / recipe), override], f"{key}: the {stage} stage never reads this key")


def test_split_of_a_data_file(fails_cleanly, tiny_base, in_tmp):
    (in_tmp / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    fails_cleanly([*SFT, f"model={tiny_base}", f"data.source={in_tmp / 'd.jsonl'}", "data.split=test"],
                  "data.split: ", "d.jsonl is a file, which has no splits")


def test_empty_output_dir(fails_cleanly, tiny_base):
    fails_cleanly([*SFT, f"model={tiny_base}", "output_dir=''"], "output_dir: expected a directory path, got ''")


def test_home_in_output_dir_is_expanded(in_tmp, tiny_base, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    assert main(["run", *SFT, f"model={tiny_base}", "output_dir=~/runs/x", "--dry-run"]) == 0
    assert f"-> {in_tmp / 'home' / 'runs' / 'x'}" in capsys.readouterr().out
    assert not (in_tmp / "~").exists()


def test_typo_inside_a_list_item_names_the_valid_keys(fails_cleanly, in_tmp):
    (in_tmp / "r.yaml").write_text("stage: prep\nprep:\n  sources:\n    - path: demo\n      xyz: 2\n")
    line = fails_cleanly([str(in_tmp / "r.yaml")], "r.yaml:5: prep.sources.0.xyz: unknown key (valid keys: path, shape")
    assert "weight" in line


def test_a_chain_wide_override_is_not_an_unread_key(in_tmp, capsys):
    """`*:training.logging_steps=1` sets init's training too, which init never reads: let through."""
    assert main(["run", str(RECIPES / "sft.yaml"), "*:training.logging_steps=1", "--dry-run"]) == 0
    assert "init" in capsys.readouterr().out
