"""The three ways users launch a recipe, run as they type them (subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import MICRO, RECIPES

CHAIN = [*MICRO, "pretrain:data.num_examples=300", "pretrain:training.max_steps=4", "sft:data.num_examples=100", "sft:training.max_steps=3"]
MAIN_JOB = [*CHAIN, "dpo:data.num_examples=60", "dpo:data.eval_examples=10", "dpo:training.max_steps=3",
            "report.num_prompts=16", "report.max_new_tokens=8"]


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_accelerate_launch_as_typed_then_main_job_reuses_the_chain(tmp_path, monkeypatch, capsys):
    """`accelerate launch recipes/sft.yaml` builds init -> pretrain -> sft; the module form of
    the main job (`-m alignment recipes/dpo.yaml`) reuses them, adds dpo and ends with the gold table."""
    shutil.copytree(RECIPES, tmp_path / "recipes")
    done = launch(["accelerate", "launch", "--num_processes", "1", "recipes/sft.yaml", *CHAIN], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("init", "pretrain", "sft"):
        assert (tmp_path / "runs" / name / "model.safetensors").is_file(), name
    assert "[sft] done" in done.stdout

    done = launch(["accelerate", "launch", "--num_processes", "1", "-m", "alignment", "recipes/dpo.yaml", *MAIN_JOB], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[sft] up to date" in done.stdout and "[dpo] done" in done.stdout
    table = done.stdout[done.stdout.index("Gold score on 16 held-out demo prompts"):]
    for row in ("base ", "sft ", "dpo ", "sft - base:", "dpo - sft:", "rewards/margins", "rewards/accuracies"):
        assert row in table, row
    report = json.loads((tmp_path / "runs" / "dpo" / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft", "dpo"}
    assert all(0 <= m["gold_lo"] <= m["gold_mean"] <= m["gold_hi"] <= 1 for m in report["models"].values())

    from alignment.cli import main  # the same command in-process (the console script is run in the tests below)

    monkeypatch.chdir(tmp_path)
    assert main(["run", "recipes/dpo.yaml", *MAIN_JOB, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("up to date") == 4


def test_multi_process_launch_falls_back_to_cpu_gloo(tmp_path):
    shutil.copytree(RECIPES, tmp_path / "recipes")
    done = launch(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "recipes/dpo.yaml", *MAIN_JOB], tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "dpo" / "model.safetensors").is_file()
    assert done.stdout.count("[dpo] done") == 1 and done.stdout.count("Gold score") == 1  # main process only


def test_bad_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((RECIPES / "sft.yaml").read_text().replace("max_steps:", "max_stepz:"))
    for args in (["alignment", "run", str(recipe)], [sys.executable, str(recipe)]):
        done = launch(args, tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "training.max_stepz" in lines[0] and "max_steps" in lines[0], done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_mistake_in_a_recipe_is_refused_before_torch_is_imported(tmp_path):
    """A typo in a key is found from the schema alone: the answer comes in a second, not after the
    seconds that importing torch and transformers takes (a run, or a sweep, checks every recipe of
    the chain first)."""
    shutil.copytree(RECIPES, tmp_path / "recipes")
    sft = tmp_path / "recipes" / "sft.yaml"
    sft.write_text(sft.read_text().replace("max_steps:", "max_stepz:"))
    probe = ("import sys\nfrom alignment.cli import main\n"
             "codes = main(['run', 'recipes/dpo.yaml']), main(['sweep', 'recipes/frontier.yaml'])\n"
             "print(*codes, sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    done = launch([sys.executable, "-c", probe], tmp_path)
    assert done.stdout.split("\n")[0] == "2 2 []", done.stdout + done.stderr
    assert done.stderr.count("sft.yaml:") == 2 and done.stderr.count("training.max_stepz: unknown key") == 2, done.stderr


def test_bad_recipe_under_accelerate_launch(tmp_path):
    """What a user sees when a recipe is refused under `accelerate launch`: our one line (whatever
    accelerate prints around it; its wording changes between releases and is not ours to pin), a
    non-zero exit status, and nothing written."""
    shutil.copytree(RECIPES, tmp_path / "recipes")
    bad = tmp_path / "recipes" / "sft.yaml"
    bad.write_text(bad.read_text().replace("max_steps:", "max_stepz:"))
    done = launch(["accelerate", "launch", "--num_processes", "1", "recipes/sft.yaml"], tmp_path)
    line_no = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "max_stepz:" in text)
    ours = f"error: {bad}:{line_no}: training.max_stepz: unknown key (did you mean 'max_steps'?)"
    assert ours in done.stderr.splitlines(), done.stderr  # our line, whole, on a line of its own
    assert done.returncode != 0
    assert not (tmp_path / "runs").exists()


def test_runner_uses_the_cores_accelerate_would_pin_to_one(tmp_path):
    """`accelerate launch` with no config sets OMP_NUM_THREADS=1; the runner takes the
    machine's cores back, unless the user chose the count."""
    (tmp_path / "probe.py").write_text(
        "from alignment.cli import launcher_thread_default, use_launcher_cores\n"
        "import torch\n"
        "chosen = launcher_thread_default()\n"
        "use_launcher_cores()\n"
        "print('threads', chosen, torch.get_num_threads())\n"
    )
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(["accelerate", "launch", "--num_processes", "1", "probe.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"threads {cores} {cores}" in done.stdout.splitlines()


def test_thread_count_tells_accelerates_default_from_the_users(monkeypatch):
    """The decision, against stand-in launcher processes whose environment and arguments we set."""
    from alignment.cli import launcher_thread_default

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what accelerate hands its child either way
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # set by every accelerate launcher
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def decided(extra_env: dict, extra_args: list[str] = ()) -> int | None:
        stand_in = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
                                     *extra_args], env={**clean, **extra_env}, stdout=subprocess.PIPE, text=True)
        try:
            stand_in.stdout.readline()  # exec'd: /proc shows its own environment now, not the forked parent's
            return launcher_thread_default(stand_in.pid)
        finally:
            stand_in.kill()
            stand_in.wait()

    assert decided({}) == cores  # accelerate's default: take the cores
    assert decided({"OMP_NUM_THREADS": "1"}) is None  # the user exported it: keep it
    assert decided({}, ["--num_cpu_threads_per_process", "1"]) is None  # the user passed it: keep it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert decided({}) == max(1, cores // 2)  # two local processes share the cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert decided({}) is None  # not accelerate's default
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    assert decided({}) is None  # not under accelerate launch


def test_help_explains_overrides():
    done = launch(["alignment", "run", "--help"], Path.cwd())
    assert done.returncode == 0 and "NAME:KEY=VALUE" in done.stdout and "accelerate launch" in done.stdout


def test_fsdp_config_on_cpu_is_said_to_run_as_ddp(in_tmp, monkeypatch, capsys):
    """accelerate ignores an FSDP launcher config on CPUs (plain DDP): the runner names the training stages
    that run so; a chain of main-process stages only (init) gets no note. (The RL stages shard themselves:
    their note, with several processes, is checked in tests/test_fsdp.py's launches.)"""
    from alignment.pipeline import run
    from alignment.stages import common

    monkeypatch.setattr(common, "use_cpu", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `--config_file recipes/accelerate/fsdp.yaml` sets
    run(RECIPES / "sft.yaml", dry_run=True)
    out = capsys.readouterr().out
    assert "FSDP on GPUs only" in out and "pretrain, sft train as plain data parallel" in out
    run(RECIPES / "init.yaml", dry_run=True)
    assert "FSDP" not in capsys.readouterr().out
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    run(RECIPES / "sft.yaml", dry_run=True)
    assert "FSDP" not in capsys.readouterr().out
