"""The toolkit never destroys or overwrites what it did not write, and refuses an output
location it cannot use before anything is trained: one line, exit status 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignment.cli import main
from alignment.errors import RecipeError
from alignment.pipeline import complete_interrupted_swap, run, swap_into_place

from .conftest import REPO, RECIPES


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (and '<dir>' for directories)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def refused(capsys, *args: str) -> str:
    """Run `alignment run` in-process; assert exit status 2 and a one-line error; return it."""
    status = main(["run", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def sft(model: Path, *extra: str) -> list[str]:
    return [RECIPES / "sft.yaml", f"model={model}", "data.num_examples=32", "training.max_steps=1", *extra]


def test_directory_of_user_files_survives_a_run_into_it(in_tmp, tiny_base, capsys):
    mine = in_tmp / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "notes" / "a.txt").write_text("more")
    before = snapshot(in_tmp)
    line = refused(capsys, *sft(tiny_base, "output_dir=mine"))
    assert "output_dir 'mine'" in line and "did not write" in line
    assert snapshot(in_tmp) == before  # nothing removed, changed or added (no mine.partial)

    # A directory named like our work directory but not ours is not removed either.
    (in_tmp / "other.partial").mkdir()
    (in_tmp / "other.partial" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(in_tmp)
    line = refused(capsys, *sft(tiny_base, "output_dir=other"))
    assert "other.partial' holds files the toolkit did not write" in line
    assert snapshot(in_tmp) == before


def test_input_checkpoint_is_never_an_output(in_tmp, tiny_base, capsys):
    ckpt = in_tmp / "models" / "base"
    shutil.copytree(tiny_base, ckpt)  # a finished output of ours: only the input rule protects it
    before = snapshot(in_tmp)
    for out, words in (
        (ckpt, "is sft.yaml's model"),  # the checkpoint itself
        (ckpt / "sub", "is sft.yaml's model"),  # inside it
        (in_tmp / "models", "holds sft.yaml's model"),  # around it
    ):
        line = refused(capsys, *sft(ckpt, f"output_dir={out}"))
        assert words in line and f"output_dir '{out}'" in line, line
        assert snapshot(in_tmp) == before


def test_two_recipes_of_a_chain_with_one_output_dir_are_refused(in_tmp, capsys):
    from .conftest import MICRO

    line = refused(capsys, RECIPES / "sft.yaml", *MICRO, "pretrain:output_dir=runs/init")
    assert "output_dir 'runs/init': is the same as the output of" in line
    line = refused(capsys, RECIPES / "sft.yaml", *MICRO, "output_dir=runs/pretrain/sft")
    assert "lies inside the output of pretrain.yaml" in line
    assert list(in_tmp.iterdir()) == []


def test_file_working_directory_and_path_under_a_file_are_refused(in_tmp, tiny_base, capsys):
    (in_tmp / "afile").write_text("keep me")
    before = snapshot(in_tmp)
    cases = {
        "afile": "'afile': '" + str(in_tmp / "afile") + "' is a file, expected a directory",
        "afile/out": "is a file, not a directory",
        ".": "is the working directory or holds it",
        "..": "is the working directory or holds it",
    }
    for out, words in cases.items():
        line = refused(capsys, *sft(tiny_base, f"output_dir={out}"))
        assert words in line, line
        assert snapshot(in_tmp) == before


def test_read_only_location_is_refused_before_training(tmp_path):
    """chmod 555 on the parent. Root ignores permission bits, so as root the command runs with
    CAP_DAC_OVERRIDE dropped (setpriv): then the bits bind root too, as they bind a user."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "root needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE"
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    # The model is never loaded: the output check comes first.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "alignment", "run", str(RECIPES / "sft.yaml"), "model=nobody/not-downloaded",
         f"output_dir={ro / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"output_dir '{ro / 'out'}': cannot write in '{ro}' (Permission denied)" in lines[0]
    assert list(ro.iterdir()) == []
    ro.chmod(0o755)


def test_output_problem_writes_a_scratch_directory_only_when_asked(tmp_path, monkeypatch):
    """The one output check (paths.output_problem, used by the pipeline, the sweep and the report):
    with probe=False (a dry run) nothing is created, so a place that cannot be written passes; with
    probe it is refused in the words the pipeline prints after `output_dir '...': `."""
    from alignment import paths

    made = []

    def refuse(**kwargs):
        made.append(kwargs["dir"])
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(paths.tempfile, "mkdtemp", refuse)
    out = tmp_path / "a" / "out"
    assert paths.output_problem(out, probe=False) is None and made == []
    assert paths.output_problem(out) == f"cannot write in '{tmp_path}' (Permission denied)" and made == [tmp_path]
    (tmp_path / "a").write_text("")
    assert paths.output_problem(out, probe=False) == f"'{tmp_path / 'a'}' is a file, not a directory"


def test_swap_keeps_one_output_whole_at_every_moment(tmp_path, monkeypatch):
    out, work = tmp_path / "sft", tmp_path / "sft.partial"
    for directory, text in ((out, "old"), (work, "new")):
        directory.mkdir()
        (directory / "run_info.json").write_text(json.dumps({"stage": "sft", "hash": text, "status": "finished"}))
        (directory / "model.safetensors").write_text(text)

    # Crash right after the old output is set aside, before the new one is moved in.
    real_rename = Path.rename
    calls = []

    def crash_on_second(self, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_rename(self, target)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Path, "rename", crash_on_second)
        swap_into_place(work, out)
    [aside] = tmp_path.glob("sft.old-*")
    assert (aside / "model.safetensors").read_text() == "old" and (work / "model.safetensors").read_text() == "new"

    # The next run of the same recipe completes the swap and removes what it set aside.
    complete_interrupted_swap(SimpleNamespace(out_dir=out, hash="new"))
    assert (out / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]

    # Files the toolkit did not write that appear in the output during a run are not replaced.
    shutil.rmtree(out)
    out.mkdir()
    (out / "user.txt").write_text("mine")
    work.mkdir()
    (work / "run_info.json").write_text(json.dumps({"stage": "sft", "hash": "x", "status": "finished"}))
    with pytest.raises(RecipeError, match="did not write during the run; the finished output is left in"):
        swap_into_place(work, out)
    assert (out / "user.txt").read_text() == "mine" and (work / "run_info.json").is_file()


def test_rerun_replaces_our_own_output_and_leaves_nothing_aside(in_tmp, tiny_base):
    recipe, *overrides = sft(tiny_base, "output_dir=out/sft")
    [first] = run(recipe, overrides)
    old_hash = json.loads((first.out_dir / "run_info.json").read_text())["hash"]
    [second] = run(recipe, [*overrides, "training.learning_rate=1e-4"])
    info = json.loads((second.out_dir / "run_info.json").read_text())
    assert info["hash"] == second.hash != old_hash and info["status"] == "finished"
    assert sorted(p.name for p in (in_tmp / "out").iterdir()) == ["sft"]
