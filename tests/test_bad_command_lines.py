"""Bad command lines, as users type them: `python -m data_prep` (model layer, numbers, flags),
`alignment compare`, and usage errors of `alignment`. Each is one line naming the flag, file or
line, exit status 2, no traceback, and leaves every file as it was."""

from __future__ import annotations

import json

import pytest

from alignment.cli import main as alignment_main
from data_prep.cli import main as data_prep_main

from .conftest import RECIPES
from .test_bad_inputs import tree


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
    ("--k", "1", "--k 1: a pair needs at least 2 samples per prompt (best vs worst)"),
])
def test_onpolicy_sampling_settings_out_of_range(tmp_path, capsys, tiny_base, flag, value, expected):
    line = data_prep(["onpolicy", "--model", tiny_base, "--prompts", "demo", "--oracle", flag, value,
                      "--out", tmp_path / "o"], capsys, tmp_path)
    assert expected in line


@pytest.mark.parametrize("extra, expected", [
    (["--oracle", "--reward-fn", "gold"], "--oracle and --reward-fn: give one scorer"),
    (["--reward-fn", "score"], "--reward-fn / --reward-weights: 'score' is not a reward function"),
    (["--reward-fn", "gold", "--reward-weights", "1", "2"], "reward_weights has 2 entries for 1 reward sources"),
    (["--oracle", "--reward-weights", "1"], "--reward-weights weighs --reward-fn functions"),
    (["--reward-fn", "{tmp}/nope.py:score"], "--reward-fn: reward_fn '{tmp}/nope.py:score': no such file '{tmp}/nope.py'"),
])
def test_onpolicy_reward_function_mistakes_are_one_line(tmp_path, capsys, tiny_base, extra, expected):
    extra = [a.format(tmp=tmp_path) for a in extra]
    line = data_prep(["onpolicy", "--model", tiny_base, "--prompts", "demo", *extra, "--out", tmp_path / "o"], capsys, tmp_path)
    assert expected.format(tmp=tmp_path) in line


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


def test_stated_shape_whose_columns_no_row_has_is_refused(tmp_path, capsys, pairs):
    line = data_prep(["pairs", pairs, "--shape", "ranked", "--quiet", "--out", tmp_path / "o"], capsys, tmp_path)
    assert line == (f"error: {pairs}: no column 'ranked' in its rows (columns: chosen, prompt, rejected); shape 'ranked' "
                    "reads prompt, ranked: check --shape, or name the columns with --column ROLE=COLUMN "
                    "(a recipe: prep.sources[].shape / .columns)")


def test_column_no_row_has_is_refused(tmp_path, capsys, pairs):
    line = data_prep(["pairs", pairs, "--column", "prompt=question", "--quiet", "--out", tmp_path / "o"], capsys, tmp_path)
    assert line == (f"error: {pairs}: no column 'question' in its rows (columns: chosen, prompt, rejected); "
                    "--column prompt=question names a column no row has (a recipe: prep.sources[].columns): check the name")


@pytest.mark.parametrize("source", ["file", "demo"])
def test_data_prep_split_of_a_file_is_refused(tmp_path, capsys, pairs, source):
    src = pairs if source == "file" else "demo"
    what = f"the file {pairs} (a file is one split)" if source == "file" else "the demo data (generated, one split)"
    line = data_prep(["pairs", src, "--split", "test", "--quiet", "--out", tmp_path / "o"], capsys, tmp_path)
    assert line == ("error: --split: 'test' applies only to a hub dataset or a saved DatasetDict (or a data_prep output "
                    f"directory), not to {what}: leave the split out")


# ------------------------------------------------------------------ compare


def test_compare_split_of_a_prompt_file_is_refused(tmp_path, capsys, tiny_base):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    line = alignment(["compare", f"a={tiny_base}", f"b={tiny_base}", "--prompts", tmp_path / "p.jsonl", "--split", "test",
                      "--out", tmp_path / "o"], capsys, tmp_path)
    assert line == ("error: --split: 'test' applies only to a hub dataset or a saved DatasetDict (or a data_prep output "
                    f"directory), not to the file {tmp_path / 'p.jsonl'} (a file is one split): leave the split out")


def test_compare_prompt_file_not_utf8(tmp_path, capsys, tiny_base):
    (tmp_path / "p.txt").write_bytes("first\nsecond \xe9\n".encode("latin-1"))
    line = alignment(["compare", f"a={tiny_base}", f"b={tiny_base}", "--prompts", tmp_path / "p.txt",
                      "--out", tmp_path / "o"], capsys, tmp_path)
    assert line == f"error: --prompts: {tmp_path / 'p.txt'}:2: not UTF-8 text (byte 0xe9)"


def test_compare_infinite_temperature(tmp_path, capsys, tiny_base):
    line = alignment(["compare", f"a={tiny_base}", f"b={tiny_base}", "--temperature", "inf", "--out", tmp_path / "o"],
                     capsys, tmp_path)
    assert line.startswith("error: --temperature: ") and "finite number" in line


# ------------------------------------------------------------------ alignment: usage


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
