"""Bad inputs of the second round (issue 15, item 3) and data_prep's row parsing (item 5): each
bad input is one line naming the key, flag, file or line, exit status 2, and leaves every file
as it was; the reader counts every row it does not use."""

from __future__ import annotations

import json
import shutil

import pytest

from alignment.cli import main as alignment_main
from data_prep.cli import main as data_prep_main
from data_prep.read import read_source

from .conftest import RECIPES
from .test_bad_inputs import SFT, classifier_dir, fails_cleanly, tree  # noqa: F401  (fixtures)


def one_line(code, err: str) -> str:
    """Assert exit status 2 and a single error line without a traceback; return the line."""
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def data_prep(args: list, capsys, tmp_path) -> str:
    """Run `python -m data_prep ARGS` expecting a refusal; check nothing under tmp_path changed."""
    before = tree(tmp_path)
    try:
        code = data_prep_main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    line = one_line(code, capsys.readouterr().err)
    assert tree(tmp_path) == before
    return line


def alignment(args: list, capsys, *roots) -> str:
    before = tree(*roots)
    try:
        code = alignment_main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    line = one_line(code, capsys.readouterr().err)
    assert tree(*roots) == before
    return line


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4)))
    return path


# ------------------------------------------------------------------ data_prep: model layer, numbers, flags


def test_data_prep_missing_tokenizer_is_one_line(tmp_path, capsys, pairs):
    line = data_prep(["pairs", pairs, "--max-length", "9", "--tokenizer", tmp_path / "nope", "--quiet", "--out", tmp_path / "o"],
                     capsys, tmp_path)
    assert "cannot load tokenizer" in line and "nope" in line


def test_onpolicy_missing_model_is_one_line(tmp_path, capsys):
    line = data_prep(["onpolicy", "--model", tmp_path / "nope", "--prompts", "demo", "--oracle", "--out", tmp_path / "o"],
                     capsys, tmp_path)
    assert "cannot load model config" in line and "nope" in line


def test_onpolicy_causal_lm_as_reward_model_is_refused_before_sampling(tmp_path, capsys, tiny_base):
    line = data_prep(["onpolicy", "--model", tiny_base, "--prompts", "demo", "--reward-model", tiny_base,
                      "--out", tmp_path / "o"], capsys, tmp_path)
    assert f"--reward-model: {tiny_base} is a causal language model" in line
    assert "expected a one-label sequence classifier" in line


@pytest.mark.parametrize("flag, value, expected", [
    ("--temperature", "-1", "--temperature: Input should be greater than or equal to 0"),
    ("--temperature", "inf", "argument --temperature: expected a finite number, got inf"),
    ("--top-p", "0", "--top-p: Input should be greater than 0"),
    ("--top-p", "2", "--top-p: Input should be less than or equal to 1"),
])
def test_onpolicy_sampling_settings_out_of_range(tmp_path, capsys, tiny_base, flag, value, expected):
    line = data_prep(["onpolicy", "--model", tiny_base, "--prompts", "demo", "--oracle", flag, value,
                      "--out", tmp_path / "o"], capsys, tmp_path)
    assert expected in line


def test_data_prep_infinite_weight_is_one_line(tmp_path, capsys, pairs):
    line = data_prep(["pairs", pairs, "--weights", "inf", "--quiet", "--out", tmp_path / "o"], capsys, tmp_path)
    assert line.endswith("argument --weights: expected a finite number, got inf")


def test_two_roles_on_one_column_are_refused(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"prompt": "p", "x": "a"}) + "\n")
    line = data_prep(["pairs", src, "--column", "chosen=x", "--column", "rejected=x", "--quiet", "--out", tmp_path / "o"],
                     capsys, tmp_path)
    assert "columns: chosen and rejected both name the column 'x'" in line


def test_strict_with_a_weight_below_one_names_the_conflict(tmp_path, capsys, pairs):
    line = data_prep(["pairs", pairs, "--weights", "0.5", "--strict", "--quiet", "--out", tmp_path / "o"], capsys, tmp_path)
    assert "strict (--strict) and a source weight below 1 (0.5, --weights) conflict" in line
    assert "p.jsonl:" not in line  # no valid row is blamed


# ------------------------------------------------------------------ compare


def test_compare_prompt_file_not_utf8(tmp_path, capsys, tiny_base):
    (tmp_path / "p.txt").write_bytes("first\nsecond \xe9\n".encode("latin-1"))
    line = alignment(["compare", f"a={tiny_base}", f"b={tiny_base}", "--prompts", tmp_path / "p.txt",
                      "--out", tmp_path / "o"], capsys, tmp_path)
    assert line == f"error: --prompts: {tmp_path / 'p.txt'}:2: not UTF-8 text (byte 0xe9)"


def test_compare_infinite_temperature(tmp_path, capsys, tiny_base):
    line = alignment(["compare", f"a={tiny_base}", f"b={tiny_base}", "--temperature", "inf", "--out", tmp_path / "o"],
                     capsys, tmp_path)
    assert line.startswith("error: --temperature: ") and "finite number" in line


# ------------------------------------------------------------------ the reader


def test_csv_cell_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    long = "x" * 200_000
    (tmp_path / "r.csv").write_text(f"prompt,chosen,rejected\nq,{long},b\n")
    [(_, row)] = list(read_source(str(tmp_path / "r.csv")))
    assert row == {"prompt": "q", "chosen": long, "rejected": "b"}


def test_json_file_with_a_lone_surrogate_is_a_counted_bad_row(tmp_path):
    (tmp_path / "r.json").write_text('[{"prompt": "a\\ud800"}, {"prompt": "ok \\ud83d\\ude00"}]')
    (first, bad), (_, good) = read_source(str(tmp_path / "r.json"))
    assert first.endswith("row 1") and bad.reason == "not valid JSON"
    assert good == {"prompt": "ok \U0001F600"}


def test_blank_csv_row_is_counted(tmp_path):
    (tmp_path / "r.csv").write_text("prompt,chosen,rejected\nq,a,b\n , ,\n\nr,c,d\n")
    rows = list(read_source(str(tmp_path / "r.csv")))
    assert [getattr(r, "reason", "row") for _, r in rows] == ["row", "blank CSV row", "row"]
    assert rows[1][0].endswith("r.csv:3")


def test_csv_cell_that_reads_as_json_stays_text_unless_it_is_messages(tmp_path):
    messages = json.dumps([{"role": "user", "content": "hi"}])
    (tmp_path / "r.csv").write_text(f'prompt,chosen,rejected\n"List 1-3","[1, 2, 3]","{{""a"": 1}}"\n"{messages.replace(chr(34), chr(34) * 2)}",x,y\n')
    (_, first), (_, second) = read_source(str(tmp_path / "r.csv"))
    assert first == {"prompt": "List 1-3", "chosen": "[1, 2, 3]", "rejected": '{"a": 1}'}
    assert second["prompt"] == [{"role": "user", "content": "hi"}]


def test_ratings_in_a_csv_cell_are_still_a_list(tmp_path):
    from alignment.config import PrepOptions, PrepSource
    from data_prep.prepare import prepare

    (tmp_path / "r.csv").write_text('prompt,completions,ratings\nq,"[""good"", ""bad""]","[9, 2]"\n')
    got = prepare(PrepOptions(sources=[PrepSource(path=str(tmp_path / "r.csv"))], test_fraction=0), progress=False)
    [row] = got.splits["train"]
    assert row["chosen"][0]["content"] == "good" and row["rejected"][0]["content"] == "bad"


# ------------------------------------------------------------------ recipes, checked at plan time


def test_missing_chat_template_file(fails_cleanly, tiny_base):
    fails_cleanly([*SFT, f"model={tiny_base}", "model_options.chat_template=missing.jinja"],
                  "model_options.chat_template: 'missing.jinja': no such file")


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
    assert alignment_main(["run", *SFT, f"model={tiny_base}", "output_dir=~/runs/x", "--dry-run"]) == 0
    assert f"-> {in_tmp / 'home' / 'runs' / 'x'}" in capsys.readouterr().out
    assert not (in_tmp / "~").exists()


def test_typo_inside_a_list_item_names_the_valid_keys(fails_cleanly, in_tmp):
    (in_tmp / "r.yaml").write_text("stage: prep\nprep:\n  sources:\n    - path: demo\n      xyz: 2\n")
    line = fails_cleanly([str(in_tmp / "r.yaml")], "r.yaml:5: prep.sources.0.xyz: unknown key (valid keys: path, shape")
    assert "weight" in line


# ------------------------------------------------------------------ command lines


@pytest.mark.parametrize("argv, expected", [
    ([], "error: alignment: the following arguments are required: COMMAND"),
    (["run"], "error: alignment run: the following arguments are required: recipe"),
    (["compare"], "error: alignment compare: the following arguments are required: MODEL"),
    (["nope"], "error: alignment: argument COMMAND: invalid choice: 'nope'"),
    (["run", "r.yaml", "--nope"], "error: alignment: unrecognized arguments: --nope"),
])
def test_usage_errors_are_one_line(in_tmp, capsys, argv, expected):
    assert alignment(argv, capsys, in_tmp).startswith(expected)


def test_overrides_after_dry_run_are_applied(in_tmp, capsys):
    assert alignment_main(["run", str(RECIPES / "sft.yaml"), "--dry-run", "output_dir=elsewhere"]) == 0
    assert "-> elsewhere" in capsys.readouterr().out


# ------------------------------------------------------------------ data_prep row parsing (item 5)


def parse_explicit(row: dict):
    from alignment.config import PrepColumns, PrepOptions
    from data_prep.shapes import make_parser

    return make_parser("explicit", PrepColumns(), PrepOptions())(row)


def test_text_prompt_with_trailing_whitespace_matches_a_transcript_reply():
    [pair] = parse_explicit({"prompt": "What is X? \n", "chosen": "\n\nHuman: What is X?\n\nAssistant: Y",
                             "rejected": "\n\nHuman: What is X?\n\nAssistant: Z"})
    assert pair["chosen"] == [{"role": "assistant", "content": "Y"}] and pair["rejected"][0]["content"] == "Z"


def test_reply_quoting_a_dialogue_is_the_reply_itself():
    quote = "Here is an example:\n\nHuman: hi\n\nAssistant: hello"
    [pair] = parse_explicit({"prompt": "Show me a chat", "chosen": quote, "rejected": "No."})
    assert pair["chosen"] == [{"role": "assistant", "content": quote}]


def test_transcript_with_single_newlines_is_parsed():
    [pair] = parse_explicit({"prompt": "Human: a\nAssistant:", "chosen": "b", "rejected": "c"})
    assert pair["prompt"] == [{"role": "user", "content": "a"}]


def test_a_chain_wide_override_is_not_an_unread_key(in_tmp, capsys):
    """`*:training.logging_steps=1` sets init's training too, which init never reads: let through."""
    assert alignment_main(["run", str(RECIPES / "sft.yaml"), "*:training.logging_steps=1", "--dry-run"]) == 0
    assert "init" in capsys.readouterr().out
