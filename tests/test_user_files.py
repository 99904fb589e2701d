"""Every command leaves alone what it did not write: a user's file in (or of the same name as)
an output of ours survives a rerun, an output never replaces its own input, a place that cannot
be written is refused before any work, and a replaced output is swapped whole (old or new,
never a mix)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from alignment import cli
from data_prep.cli import main as data_prep_main

from .conftest import RECIPES


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` ('<dir>' for directories)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def data_prep(args: list, capsys) -> tuple[int, list[str]]:
    try:
        code = data_prep_main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def pairs_file(path: Path, n: int = 12, reply: str = "good") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": reply, "rejected": "bad"}) + "\n" for i in range(n)))
    return path


DEMO = ["demo", "--pretrain", "5", "--sft", "5", "--pairs", "5", "--eval", "5"]


# ------------------------------------------------------------------ data_prep demo


def test_demo_refuses_a_directory_with_a_users_file_of_the_same_name(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sft.jsonl").write_text('{"messages": "my own conversations"}\n')
    before = snapshot(mine)
    code, err = data_prep([*DEMO, "--out", mine], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"error: --out {mine}: 'sft.jsonl' is there and was not written by data_prep demo" in err[0]
    assert snapshot(mine) == before


def test_demo_reruns_into_its_own_output_and_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert data_prep([*DEMO, "--out", out], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert data_prep([*DEMO, "--seed", "1", "--out", out], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        "demo.json", "eval_prompts.jsonl", "notes.txt", "preferences.jsonl", "pretrain.jsonl", "sft.jsonl"]


# ------------------------------------------------------------------ data_prep pairs


def test_pairs_refuses_an_out_that_holds_its_own_source(tmp_path, capsys):
    prev = tmp_path / "prev"
    assert data_prep(["pairs", pairs_file(tmp_path / "p.jsonl"), "--quiet", "--out", prev], capsys)[0] == 0
    before = snapshot(prev)
    code, err = data_prep(["pairs", prev / "train.jsonl", "--quiet", "--out", prev], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"--out {prev}: holds the input SOURCE {prev / 'train.jsonl'}; writing there would replace it" in err[0]
    assert snapshot(prev) == before


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_failed_swap_leaves_the_earlier_output_whole(tmp_path, capsys, monkeypatch, fail_at):
    """Each filesystem move of a rerun fails in turn: the output directory is then the old one,
    file for file (never a new train.jsonl beside an old summary.json), and nothing is left over."""
    out = tmp_path / "out"
    assert data_prep(["pairs", pairs_file(tmp_path / "a.jsonl"), "--quiet", "--out", out], capsys)[0] == 0
    (out / "mine.txt").write_text("x")
    before = snapshot(out)
    calls = []
    real_rename, real_replace = os.rename, os.replace

    def failing(real):
        def move(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) == fail_at:
                raise OSError(5, "simulated failure")
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    new_source = pairs_file(tmp_path / "b.jsonl", reply="better")
    try:
        data_prep(["pairs", new_source, "--quiet", "--out", out], capsys)
    except OSError:
        pass
    monkeypatch.undo()
    if len(calls) >= fail_at:
        assert snapshot(out) == before
    else:  # fewer moves than fail_at: the rerun went through, whole
        assert (out / "mine.txt").read_text() == "x" and "better" in (out / "train.jsonl").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]


# ------------------------------------------------------------------ alignment run


def test_rerun_of_a_stage_keeps_a_users_file_in_its_output(in_tmp, tiny_base, capsys):
    sft = [str(RECIPES / "sft.yaml"), f"model={tiny_base}", "data.num_examples=16", "training.max_steps=1", "output_dir=out"]
    assert cli.main(["run", *sft]) == 0
    first = json.loads((in_tmp / "out" / "run_info.json").read_text())["hash"]
    (in_tmp / "out" / "eval").mkdir()
    (in_tmp / "out" / "eval" / "result.json").write_text('{"accuracy": 0.9}')
    (in_tmp / "out" / "notes.md").write_text("what I saw")
    assert cli.main(["run", *sft, "seed=7"]) == 0  # another hash: the stage runs again and replaces its output
    info = json.loads((in_tmp / "out" / "run_info.json").read_text())
    assert info["hash"] != first and info["status"] == "finished"
    assert (in_tmp / "out" / "notes.md").read_text() == "what I saw"
    assert (in_tmp / "out" / "eval" / "result.json").read_text() == '{"accuracy": 0.9}'
    assert not [p.name for p in in_tmp.iterdir() if p.name != "out"]  # no old or partial directory left


# ------------------------------------------------------------------ alignment compare


COMPARE = ["compare", "--no-progress", "--num-prompts", "2", "--max-new-tokens", "2"]


def test_compare_rerun_keeps_a_users_file_in_its_output(tmp_path, tiny_base, capsys):
    out = tmp_path / "cmp"
    models = [f"a={tiny_base}", f"b={tiny_base}"]
    assert cli.main([*COMPARE, *models, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("keep")
    assert cli.main([*COMPARE, *models, "--seed", "1", "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "keep"
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 1


@pytest.mark.parametrize("where", ["a_file", "a_file/sub"])
def test_compare_out_that_cannot_be_written_is_refused_before_generating(tmp_path, tiny_base, capsys, monkeypatch, where):
    from alignment import evaluation

    def never(*args, **kwargs):
        raise AssertionError("generated before checking --out")

    monkeypatch.setattr(evaluation, "compare_models", never)
    (tmp_path / "a_file").write_text("mine")
    code = cli.main([*COMPARE, f"a={tiny_base}", f"b={tiny_base}", "--out", str(tmp_path / where)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --out: "), err
    assert f"'{tmp_path / 'a_file'}' is a file" in err[0]
    assert (tmp_path / "a_file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
