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
