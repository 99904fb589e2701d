"""`alignment show RECIPE [overrides]`: every key of every recipe a run would build, in the order
they run, defaults and overrides applied, as YAML; before anything runs (torch is not imported)."""

from __future__ import annotations

import subprocess
import sys

import yaml

from alignment.cli import main
from alignment.config import DPOOptions, TrainingOptions, resolved_dict
from alignment.pipeline import resolve

from .conftest import REPO, RECIPES

DPO = str(RECIPES / "dpo.yaml")


def test_show_prints_every_key_of_the_chain_with_defaults_and_overrides(in_tmp, capsys):
    overrides = ["dpo.beta=0.05", "sft:training.max_steps=7", "*:seed=3"]
    assert main(["show", DPO, *overrides, "--runs-dir", "elsewhere"]) == 0
    chain = yaml.safe_load(capsys.readouterr().out)
    assert list(chain) == ["init", "pretrain", "sft", "dpo"]  # parents first, as a run builds them
    dpo, sft = chain["dpo"], chain["sft"]
    assert dpo["dpo"]["beta"] == 0.05 and sft["training"]["max_steps"] == 7  # overrides, top and by name
    assert {r["seed"] for r in chain.values()} == {3}  # a chain-wide one
    assert dpo["dpo"]["loss_type"] == "ipo" and dpo["data"]["num_examples"] == 2600  # what dpo.yaml sets
    # keys no recipe file sets, at the schema's defaults
    assert dpo["dpo"]["label_smoothing"] == DPOOptions().label_smoothing
    assert dpo["training"]["weight_decay"] == TrainingOptions().weight_decay
    assert dpo["model"] == {"from": "sft.yaml"}
    assert chain["init"]["output_dir"] == "elsewhere/init"  # where each stage writes, also when unset
    # the very keys a run resolves (the same loader and overrides)
    for node in resolve(DPO, overrides, "elsewhere"):
        assert chain[node.name] == {**resolved_dict(node.recipe), "output_dir": str(node.out_dir)}


def test_show_imports_neither_torch_nor_transformers(tmp_path):
    code = ("import sys; from alignment.cli import main; rc = main(['show', sys.argv[1]]); "
            "sys.exit(rc or 3 * any(m in sys.modules for m in ('torch', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", code, DPO], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dpo:" in done.stdout


def test_show_refuses_a_misspelt_override_in_one_line(in_tmp, capsys):
    assert main(["show", DPO, "dpo.betta=1"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "dpo.betta" in err[0] and "beta" in err[0] and captured.out == ""
