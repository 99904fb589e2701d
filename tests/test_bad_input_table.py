"""The bad-input table: several hundred realistic mistakes, each of which must end cleanly.

A table of bad inputs, grouped by family (recipes,
overrides, data files, models, output directories, data_prep, compare, launch, and the online
RL stages grpo/rloo/ppo), each a command line plus the files it needs, run in a subprocess. A
case is *clean* when

- the command exits with status 2 (`alignment run ...`, `alignment compare ...`,
  `python -m data_prep ...`); for `accelerate launch recipes/X.yaml` the documented behaviour
  is our line followed by accelerate's own traceback, exit 1 (docs/launching.md): clean when our
  one `error: ...` line is there with no traceback before it;
- the last non-empty line of stderr (under accelerate: our `error:` line) is a single line
  starting with `error:` that names what is at fault (the file, line, key or flag: each case
  lists the names that count), with no Python traceback of ours and no argparse usage block;
- nothing is written (no new file or directory in the working directory or $HOME, no
  `.partial` left) and no pre-existing file is changed or removed (every file is hashed before
  and after). Python's own `__pycache__/` (written beside a user's reward-function file when
  it is imported) is not counted.

A few cases are reruns into an output of ours that holds a file the user put there: for those,
exit 0 is clean too, provided the user's file is kept byte for byte.

Everything is built in a temporary directory: one tiny base checkpoint (`alignment run
recipes/init.yaml` with a 1-layer, 32-wide model and a 300-token BPE vocabulary), a one-label
and a two-label reward model made from it, broken variants (no tokenizer, truncated weights,
weights that do not match config.json, ...), the demo world's data in every format, a data_prep
output and a finished `alignment compare` output. Each case runs in a fresh copy of that
working directory, with HOME and HF_HOME pointed into the temporary directory and
HF_HUB_OFFLINE=1 (hub ids fail at once instead of waiting on the network).

Speed: importing torch, transformers, trl and peft costs ~10 s of CPU per command, which would
make 450 cases an hour on one core. So by default one parent process imports the toolkit once
and forks a child per case, which runs the same entry point as the command line
(`alignment.cli.main`, `data_prep.cli.main`) with its argv, cwd, stdout and stderr, and exits
with its status (an uncaught exception prints its traceback and exits 1, as the interpreter
does). `accelerate launch` cases always run the real `accelerate` command, and a sample of the
other cases is run again as real commands (`alignment ...`, `python -m data_prep ...`) to check
that both ways give the same verdict. `--exec` runs every case as a real command (slow).

Two ways to run it, both on one core and one thread (it takes minutes, so `make test` leaves
it out: pytest marker `bad_inputs`, deselected in pyproject.toml's addopts):

    OMP_NUM_THREADS=1 .venv/bin/pytest -m bad_inputs tests/test_bad_input_table.py   # one test per case
    OMP_NUM_THREADS=1 .venv/bin/python tests/test_bad_input_table.py                 # the table, per family

The script's options: `--family NAME` (repeatable), `-k TEXT` (cases whose name contains TEXT),
`--exec`, `--no-crosscheck`, `--keep` (keep the temporary directory), `--json FILE` (every
verdict). It prints per family clean/total, each unclean case with its command and last stderr
lines, and the overall clean/total.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PY = sys.executable

# ---------------------------------------------------------------------------- the case table


@dataclass
class Case:
    family: str
    name: str
    argv: list[str]  # argv[0]: "alignment", "data_prep" or "accelerate"
    names: tuple[str, ...] = ()  # the error line must contain one of these
    setup: dict = field(default_factory=dict)  # relative path -> str | bytes | None (a directory) | callable(ws, path)
    may_succeed: tuple[str, ...] = ()  # user files that must survive; exit 0 is then clean too
    timeout: float = 240.0

    def command(self) -> str:
        head = {"alignment": ["alignment"], "data_prep": ["python", "-m", "data_prep"], "accelerate": ["accelerate"]}[self.argv[0]]
        return shlex.join(head + self.argv[1:])


def copy_from(src: str):
    def make(ws: Path, path: Path):
        source = ws / src
        shutil.copytree(source, path) if source.is_dir() else shutil.copy2(source, path)

    return make


def model_variant(src: str, edit: Callable[[Path], None]):
    def make(ws: Path, path: Path):
        shutil.copytree(ws / src, path)
        edit(path)

    return make


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def msgs(*turns) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


PAIRS = [{"prompt": f"repeat: cat dog {i}", "chosen": f"Sure! cat dog {i}", "rejected": "Ugh. no"} for i in range(12)]
CONVS = [{"messages": msgs(("user", f"first: cat dog {i}"), ("assistant", "Sure! cat"))} for i in range(12)]
TEXTS = [{"text": f"cat dog {i} cat dog {i}"} for i in range(12)]

LAUNCHER = 'launcher: str = __import__("alignment").launch(__file__) or r"""\n'
TINY_INIT = ["init.vocab_size=300", "init.hidden_size=32", "init.intermediate_size=64", "init.num_hidden_layers=1",
             "init.num_attention_heads=2", "init.tokenizer_examples=300"]

A = "alignment"
DP = "data_prep"
BASE = "models/base"
SFT = [A, "run", "recipes/sft.yaml", f"model={BASE}", "data.num_examples=16", "training.max_steps=1"]
PRETRAIN = [A, "run", "recipes/pretrain.yaml", f"model={BASE}", "data.num_examples=16", "training.max_steps=1"]
DPO = [A, "run", "recipes/dpo.yaml", f"model={BASE}", "data.num_examples=24", "data.eval_examples=4", "training.max_steps=1",
       "report.models={}"]
REWARD = [A, "run", "recipes/reward.yaml", f"model={BASE}", "data.num_examples=24", "data.eval_examples=4",
          "training.max_steps=1"]
INIT = [A, "run", "recipes/init.yaml", *TINY_INIT]
RL_FAST = {
    "grpo": ["grpo.total_episodes=4", "grpo.batch_size=4", "grpo.num_generations=2", "grpo.response_length=4"],
    "rloo": ["rloo.total_episodes=4", "rloo.batch_size=4", "rloo.num_generations=2", "rloo.response_length=4",
             "reward_model=models/rm"],
    "ppo": ["ppo.total_episodes=4", "ppo.batch_size=4", "ppo.num_minibatches=1", "ppo.ppo_epochs=1", "ppo.response_length=4",
            "reward_model=models/rm"],
}


def rl(stage: str, *extra: str) -> list[str]:
    return [A, "run", f"recipes/{stage}.yaml", f"model={BASE}", "data.num_examples=8", *RL_FAST[stage], "report.models={}", *extra]


GRPO = rl("grpo")
# A chain whose first stage is a one-step sft from the base checkpoint: what a bad input of a later stage must stop before.
SFT_IN_CHAIN = [f"sft:model={BASE}", "sft:data.num_examples=16", "sft:training.max_steps=1"]
CMP = [A, "compare", f"a={BASE}", f"b={BASE}", "--prompts", "data/prompts.jsonl", "--num-prompts", "4", "--max-new-tokens", "4",
       "--no-progress"]
DPP = [DP, "pairs", "data/pairs.jsonl", "--quiet"]
ONP = [DP, "onpolicy", "--model", BASE, "--prompts", "demo", "--num-prompts", "4", "--k", "2", "--max-new-tokens", "4", "--quiet"]
SFT_RECIPE = "stage: sft\nmodel: models/base\ndata:\n  num_examples: 16\ntraining:\n  max_steps: 1\n"


def rec(text: str) -> dict:
    return {"bad/r.yaml": text}


def sft_with(section: str) -> dict:
    """An SFT recipe (tiny, one step) plus `section` (YAML text at the top level)."""
    return rec(SFT_RECIPE + section)


def recipes_family() -> list[Case]:
    F = "recipes"
    run = [A, "run", "bad/r.yaml"]
    cases = [
        Case(F, "recipe file missing", [A, "run", "bad/nope.yaml"], ("nope.yaml",)),
        Case(F, "recipe is a directory", [A, "run", "bad/x.yaml"], ("x.yaml",), {"bad/x.yaml": None}),
        Case(F, "recipe without .yaml is a directory", [A, "run", "bad"], ("bad",), {"bad/keep.txt": "x"}),
        Case(F, "empty recipe", run, ("r.yaml",), rec("")),
        Case(F, "recipe of comments only", run, ("r.yaml",), rec("# stage: sft\n# model: x\n")),
        Case(F, "recipe not UTF-8 (latin-1)", run, ("r.yaml",), {"bad/r.yaml": "stage: sft\n# caf\xe9\n".encode("latin-1")}),
        Case(F, "recipe is binary", run, ("r.yaml",), {"bad/r.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}),
        Case(F, "recipe is UTF-16", run, ("r.yaml",), {"bad/r.yaml": SFT_RECIPE.encode("utf-16")}),
        Case(F, "YAML: bad indentation", run, ("r.yaml",), rec("stage: sft\n model: models/base\n  training: 3\n")),
        Case(F, "YAML: unclosed flow mapping", run, ("r.yaml",), rec("stage: sft\ntraining: {max_steps: 1\n")),
        Case(F, "YAML: tab indentation", run, ("r.yaml",), rec("stage: sft\ntraining:\n\tmax_steps: 1\n")),
        Case(F, "YAML: unclosed quote", run, ("r.yaml",), rec("stage: sft\nmodel: \"models/base\n")),
        Case(F, "YAML: a second document", run, ("r.yaml",), rec(SFT_RECIPE + "---\nstage: dpo\n")),
        Case(F, "top level is a list", run, ("r.yaml",), rec("- stage: sft\n- model: models/base\n")),
        Case(F, "top level is a scalar", run, ("r.yaml",), rec("sft\n")),
        Case(F, "no stage", run, ("stage",), rec("model: models/base\n")),
        Case(F, "unknown stage", run, ("stage",), rec("stage: sftt\nmodel: models/base\n")),
        Case(F, "stage: null", run, ("stage",), rec("stage:\nmodel: models/base\n")),
        Case(F, "stage is a list", run, ("stage",), rec("stage: [sft]\nmodel: models/base\n")),
        Case(F, "stage in capitals", run, ("stage",), rec("stage: SFT\nmodel: models/base\n")),
        Case(F, "unknown top-level key", run, ("modle",), rec("stage: sft\nmodle: models/base\n")),
        Case(F, "typo in a nested key", run, ("learnin_rate",), sft_with("  learnin_rate: 1.0e-4\n")),
        Case(F, "scheduler misspelt", run, ("lr_scheduler_type",), sft_with("  lr_scheduler_type: cosinee\n")),
        Case(F, "section written twice", run, ("training",), sft_with("seed: 1\ntraining:\n  learning_rate: 1.0e-3\n")),
        Case(F, "key written twice", run, ("max_steps",), sft_with("  max_steps: 2\n")),
        Case(F, "section given a number", run, ("training",), rec("stage: sft\nmodel: models/base\ntraining: 5\n")),
        Case(F, "section given a list", run, ("training",), rec("stage: sft\nmodel: models/base\ntraining: [1, 2]\n")),
        Case(F, "max_steps: ten", run, ("max_steps",), rec("stage: sft\nmodel: models/base\ntraining:\n  max_steps: ten\n")),
        Case(F, "max_steps: 1.5", run, ("max_steps",), rec("stage: sft\nmodel: models/base\ntraining:\n  max_steps: 1.5\n")),
        Case(F, "max_steps: 0", run, ("max_steps",), rec("stage: sft\nmodel: models/base\ntraining:\n  max_steps: 0\n")),
        Case(F, "max_steps: true", run, ("max_steps",), rec("stage: sft\nmodel: models/base\ntraining:\n  max_steps: true\n")),
    ]
    training_bad = [
        ("per_device_train_batch_size", "0"), ("per_device_train_batch_size", "-4"), ("per_device_train_batch_size", "2.5"),
        ("learning_rate", "-1.0e-4"), ("learning_rate", ".inf"), ("learning_rate", ".nan"), ("learning_rate", "abc"),
        ("learning_rate", "0"), ("warmup_steps", "-1"), ("max_grad_norm", "0"), ("max_grad_norm", ".inf"), ("max_length", "1"),
        ("gradient_accumulation_steps", "0"), ("weight_decay", "-0.1"), ("save_steps", "-1"), ("mixed_precision", "fp8"),
        ("report_to", "[wandbb]"), ("report_to", "[tensorboardd]"), ("logging_steps", "0"),
        ("lr_scheduler_type", "exponential"),
    ]
    for key, value in training_bad:
        cases.append(Case(F, f"training.{key}: {value}", run, (key,),
                          rec(f"stage: sft\nmodel: models/base\ntraining:\n  max_steps: 1\n  {key}: {value}\n")))
    cases.append(Case(F, "num_train_epochs: 0 with max_steps -1", run, ("num_train_epochs",),
                      rec("stage: sft\nmodel: models/base\ntraining:\n  max_steps: -1\n  num_train_epochs: 0\n")))
    model_options_bad = [
        ("dtype", "float64"), ("dtype", "fp32"), ("attn_implementation", "sdpaa"), ("attn_implementation", "flash_attention_2"),
        ("chat_template", "missing.jinja"), ("trust_remote_code", "maybe"), ("gradient_checkpointing", "sometimes"),
    ]
    for key, value in model_options_bad:
        cases.append(Case(F, f"model_options.{key}: {value}", run, (key,), sft_with(f"model_options:\n  {key}: {value}\n")))
    cases += [
        Case(F, "chat_template file not UTF-8", run, ("t.jinja",),
             {**sft_with("model_options:\n  chat_template: bad/t.jinja\n"), "bad/t.jinja": b"{{ messages }}\xff\xfe\n"}),
        Case(F, "chat_template names a directory", run, ("t.jinja",),
             {**sft_with("model_options:\n  chat_template: bad/t.jinja\n"), "bad/t.jinja": None}),
        Case(F, "chat_template text with a Jinja syntax error", run, ("chat_template",),
             sft_with("model_options:\n  chat_template: \"{% for m in messages %}{{ m['content'] }}\"\n")),
        Case(F, "chat_template file with a Jinja syntax error", run, ("t.jinja", "chat_template"),
             {**sft_with("model_options:\n  chat_template: bad/t.jinja\n"), "bad/t.jinja": "{% for m in messages %}{{ m.content }\n"}),
        Case(F, "chat_template whose assistant turns end with no stop token", run, ("chat_template",),
             sft_with("model_options:\n  chat_template: \"{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}\"\n")),
        Case(F, "chat_template file empty", run, ("t.jinja", "chat_template"),
             {**sft_with("model_options:\n  chat_template: bad/t.jinja\n"), "bad/t.jinja": ""}),
    ]
    lora_bad = [("{r: 0}", "r"), ("{alpha: -1}", "alpha"), ("{dropout: 1.0}", "dropout"), ("{target_modules: [qproj]}", "qproj"),
                ("8", "lora"), ("{rank: 8}", "rank"), ("{r: 4.5}", "r"), ("{target_modules: []}", "target_modules")]
    for value, name in lora_bad:
        cases.append(Case(F, f"lora: {value}", run, (name,), sft_with(f"lora: {value}\n")))
    cases += [
        Case(F, "seed: 1.5", run, ("seed",), sft_with("seed: 1.5\n")),
        Case(F, "seed: abc", run, ("seed",), sft_with("seed: abc\n")),
        Case(F, "output_dir: ''", run, ("output_dir",), sft_with("output_dir: ''\n")),
        Case(F, "output_dir: a list", run, ("output_dir",), sft_with("output_dir: [a, b]\n")),
        Case(F, "data: a number", run, ("data",), rec("stage: sft\nmodel: models/base\ndata: 5\n")),
        Case(F, "data.on_bad_row: skip", run, ("on_bad_row",), rec("stage: sft\nmodel: models/base\ndata:\n  on_bad_row: skip\n")),
        Case(F, "data.num_examples: 0", run, ("num_examples",), rec("stage: sft\nmodel: models/base\ndata:\n  num_examples: 0\n")),
        Case(F, "data.prompt_field in sft (never read)", run, ("prompt_field",),
             rec("stage: sft\nmodel: models/base\ndata:\n  prompt_field: question\n")),
        Case(F, "data.eval_examples in sft (not a key)", run, ("eval_examples",),
             rec("stage: sft\nmodel: models/base\ndata:\n  eval_examples: 10\n")),
        Case(F, "data.split with a data file", run, ("split",),
             rec("stage: sft\nmodel: models/base\ndata:\n  source: data/sft.jsonl\n  split: test\n")),
        Case(F, "init.vocab_size: 10", run, ("vocab_size",), rec("stage: init\ninit:\n  vocab_size: 10\n")),
        Case(F, "init.hidden_size: 0", run, ("hidden_size",), rec("stage: init\ninit:\n  hidden_size: 0\n")),
        Case(F, "init: hidden_size not divisible by heads", run, ("hidden_size", "num_attention_heads"),
             rec("stage: init\ninit:\n  vocab_size: 300\n  hidden_size: 30\n  num_attention_heads: 4\n  tokenizer_examples: 300\n")),
        Case(F, "init.tokenizer_examples: 0", run, ("tokenizer_examples",), rec("stage: init\ninit:\n  tokenizer_examples: 0\n")),
        Case(F, "init with model (never read)", run, ("model",), rec("stage: init\nmodel: models/base\n")),
        Case(F, "init with lora (never read)", run, ("lora",), rec("stage: init\nlora: {r: 4}\n")),
        Case(F, "init key in an sft recipe", run, ("init",), sft_with("init:\n  vocab_size: 300\n")),
        Case(F, "dpo.loss_type: kto", run, ("loss_type",), rec("stage: dpo\nmodel: models/base\ndpo:\n  loss_type: kto\n")),
        Case(F, "dpo.beta: 0", run, ("beta",), rec("stage: dpo\nmodel: models/base\ndpo:\n  beta: 0\n")),
        Case(F, "dpo.beta: .inf", run, ("beta",), rec("stage: dpo\nmodel: models/base\ndpo:\n  beta: .inf\n")),
        Case(F, "dpo.label_smoothing: 0.5", run, ("label_smoothing",), rec("stage: dpo\nmodel: models/base\ndpo:\n  label_smoothing: 0.5\n")),
        Case(F, "dpo.reference: none", run, ("reference",), rec("stage: dpo\nmodel: models/base\ndpo:\n  reference: none\n")),
        Case(F, "dpo.precompute_batch_size: 0", run, ("precompute_batch_size",),
             rec("stage: dpo\nmodel: models/base\ndpo:\n  reference: precompute\n  precompute_batch_size: 0\n")),
        Case(F, "data.eval_examples: -1 (dpo)", run, ("eval_examples",), rec("stage: dpo\nmodel: models/base\ndata:\n  eval_examples: -1\n")),
        Case(F, "dpo section in an sft recipe", run, ("dpo",), sft_with("dpo:\n  beta: 0.1\n")),
        Case(F, "ref_model in an sft recipe", run, ("ref_model",), sft_with("ref_model: models/base\n")),
        Case(F, "reward.center_coef: -1", run, ("center_coef",), rec("stage: reward\nmodel: models/base\nreward:\n  center_coef: -1\n")),
        Case(F, "reward section in a dpo recipe", run, ("reward",), rec("stage: dpo\nmodel: models/base\nreward:\n  center_coef: 0.1\n")),
        Case(F, "prep.sources: []", run, ("sources",), rec("stage: prep\nprep:\n  sources: []\n")),
        Case(F, "prep.sources[0] typo 'pth'", run, ("pth",), rec("stage: prep\nprep:\n  sources:\n    - pth: demo\n")),
        Case(F, "prep.sources[0] without path", run, ("path",), rec("stage: prep\nprep:\n  sources:\n    - weight: 1\n")),
        Case(F, "prep.sources is a string", run, ("sources",), rec("stage: prep\nprep:\n  sources: data/pairs.jsonl\n")),
        Case(F, "prep.kind: dpo", run, ("kind",), rec("stage: prep\nprep:\n  kind: dpo\n")),
        Case(F, "prep.test_fraction: 1.0", run, ("test_fraction",), rec("stage: prep\nprep:\n  test_fraction: 1.0\n")),
        Case(F, "prep.sources[0].weight: 0", run, ("weight",), rec("stage: prep\nprep:\n  sources:\n    - {path: demo, weight: 0}\n")),
        Case(F, "prep.sources[0].shape: bogus", run, ("shape",), rec("stage: prep\nprep:\n  sources:\n    - {path: demo, shape: bogus}\n")),
        Case(F, "prep.max_length without a model", run, ("max_length", "model"), rec("stage: prep\nprep:\n  max_length: 10\n")),
        Case(F, "prep.dedup: fuzzy", run, ("dedup",), rec("stage: prep\nprep:\n  dedup: fuzzy\n")),
        Case(F, "prep.min_ratio: 0.5", run, ("min_ratio",), rec("stage: prep\nprep:\n  min_ratio: 0.5\n")),
        Case(F, "prep with a training section", run, ("training",), rec("stage: prep\ntraining:\n  max_steps: 3\n")),
        Case(F, "prep source file missing", run, ("missing.jsonl",),
             rec("stage: prep\nprep:\n  sources:\n    - path: data/missing.jsonl\n")),
        Case(F, "prep.sources[0].columns typo", run, ("promt",),
             rec("stage: prep\nprep:\n  sources:\n    - path: data/pairs.jsonl\n      columns: {promt: question}\n")),
        Case(F, "compare recipe with one model", run, ("models",), rec("stage: compare\nmodels:\n  a: models/base\n")),
        Case(F, "compare baseline not among the models", run, ("baseline", "zz"),
             rec("stage: compare\nmodels:\n  a: models/base\n  b: models/base\nbaseline: zz\n")),
        Case(F, "compare prompts file missing", run, ("missing.txt",),
             rec("stage: compare\nmodels:\n  a: models/base\n  b: models/base\nprompts:\n  source: data/missing.txt\n")),
        Case(F, "compare generation.temperature: -1", run, ("temperature",),
             rec("stage: compare\nmodels:\n  a: models/base\n  b: models/base\ngeneration:\n  temperature: -1\n")),
        Case(F, "compare generation.samples_per_prompt: 0", run, ("samples_per_prompt",),
             rec("stage: compare\nmodels:\n  a: models/base\n  b: models/base\ngeneration:\n  samples_per_prompt: 0\n")),
        Case(F, "from: a recipe that does not exist", run, ("missing.yaml",), rec("stage: sft\nmodel: {from: missing.yaml}\n")),
        Case(F, "{form: ...} typo", run, ("form",), rec("stage: sft\nmodel: {form: ../recipes/pretrain.yaml}\n")),
        Case(F, "a recipe that refers to itself", run, ("r.yaml", "cycle"), rec("stage: sft\nmodel: {from: r.yaml}\n")),
        Case(F, "two recipes in a cycle", run, ("cycle", "r.yaml", "s.yaml"),
             {"bad/r.yaml": "stage: sft\nmodel: {from: s.yaml}\n", "bad/s.yaml": "stage: pretrain\nmodel: {from: r.yaml}\n"}),
        Case(F, "data.source from a recipe that is not prep", run, ("data.source", "sft"),
             rec("stage: dpo\nmodel: models/base\ndata:\n  source: {from: ../recipes/sft.yaml}\n")),
        Case(F, "model from a compare recipe", run, ("compare", "c.yaml"),
             {"bad/r.yaml": "stage: sft\nmodel: {from: c.yaml}\n",
              "bad/c.yaml": "stage: compare\nmodels: {a: models/base, b: models/base}\nprompts: {num_prompts: 4}\n"
                            "generation: {max_new_tokens: 4}\n"}),
        Case(F, "model from a prep recipe", run, ("prep",), rec("stage: sft\nmodel: {from: ../recipes/prep.yaml}\n")),
        Case(F, "a referenced recipe has a typo", run, ("s.yaml",),
             {"bad/r.yaml": "stage: sft\nmodel: {from: s.yaml}\n", "bad/s.yaml": "stage: pretrain\nmodel: models/base\ntrainng: {}\n"}),
        Case(F, "report.baseline not a label", run, ("baseline", "zz"),
             sft_with("report:\n  models: {a: models/base, b: r}\n  baseline: zz\n")),
        Case(F, "report.num_prompts: 1", run, ("num_prompts",), sft_with("report:\n  num_prompts: 1\n")),
        Case(F, "report.temperature: -1", run, ("temperature",), sft_with("report:\n  temperature: -1\n")),
        Case(F, "ppo.kl_estimator: k4", run, ("kl_estimator",),
             rec("stage: ppo\nmodel: models/base\nreward_model: models/rm\nppo:\n  kl_estimator: k4\n")),
        Case(F, "grpo.kl_estimator: k1 (in the loss: no expected gradient)", run, ("kl_estimator", "k1"),
             rec("stage: grpo\nmodel: models/base\nreward_fn: gold\ngrpo:\n  kl_estimator: k1\n")),
        Case(F, "ppo.top_p: 1.5", run, ("top_p",), rec("stage: ppo\nmodel: models/base\nreward_model: models/rm\nppo:\n  top_p: 1.5\n")),
        Case(F, "ppo.temperature: 0", run, ("temperature",),
             rec("stage: ppo\nmodel: models/base\nreward_model: models/rm\nppo:\n  temperature: 0\n")),
        Case(F, "ppo.gamma: 1.5", run, ("gamma",), rec("stage: ppo\nmodel: models/base\nreward_model: models/rm\nppo:\n  gamma: 1.5\n")),
    ]
    return cases


def overrides_family() -> list[Case]:
    F = "overrides"
    bad = [
        ("training.max_steps", ("training.max_steps",)), ("=3", ("=3",)), ("training.max_stepz=3", ("max_stepz",)),
        ("training.max_steps=[1", ("max_steps",)), ("training.max_steps=abc", ("max_steps",)),
        ("training.max_steps=1e3", ("max_steps",)), ("training.max_steps=2.5", ("max_steps",)),
        ("sfft:training.max_steps=3", ("sfft",)), ("*:training.nope=1", ("nope",)), ("modle=models/base", ("modle",)),
        ("training=3", ("training",)), ("training.learning_rate=.inf", ("learning_rate",)),
        ("training.learning_rate=.nan", ("learning_rate",)), ("training.learning_rate=-1", ("learning_rate",)),
        ("training.learning_rate=1e-4,2e-4", ("learning_rate",)), ("seed=null", ("seed",)), ("stage=nope", ("stage",)),
        ("training.=3", ("training.",)), ("training..max_steps=3", ("training..max_steps",)),
        ("model_options.dtype=fp32", ("dtype",)), ("report.models={a: b", ("report.models",)),
        ("reward_fn=missing.py:f", ("reward_fn",)), ("ref_model=models/base", ("ref_model",)), ("dpo.beta=0.1", ("dpo",)),
        ("lora.r=0", ("lora",)), ("training.per_device_train_batch_size=-1", ("per_device_train_batch_size",)),
        ("data.num_examples=many", ("num_examples",)), ("training.lr_scheduler_type=cosinee", ("lr_scheduler_type",)),
        ("TRAINING.max_steps=3", ("TRAINING",)), ("data.source={from: nope.yaml}", ("nope.yaml",)),
        ("model={from: nope.yaml}", ("nope.yaml",)), ("pretrain:training.max_steps=3", ("pretrain",)),
        ("*:init.vocab_size=10", ("vocab_size", "init")), ("output_dir=~nosuchuser/x", ("~nosuchuser", "output_dir")),
        ("data.source=", ("data.source",)), ("training.max_steps=", ("max_steps",)), ("data={source: x", ("data",)),
        ("model_options.chat_template=nope.jinja", ("nope.jinja",)), ("training.report_to=wandbb", ("wandbb", "report_to")),
        ("model=", ("model",)),
    ]
    cases = [Case(F, f"override {o}", SFT + [o], names) for o, names in bad]
    cases += [
        Case(F, "override as three words (spaces around =)", SFT + ["training.max_steps", "=", "3"], ("training.max_steps", "=")),
        Case(F, "chain: pretrain:data.num_examples=-5", [A, "run", "recipes/sft.yaml", "pretrain:data.num_examples=-5"],
             ("num_examples",)),
        Case(F, "chain: init:init.vocab_size=1", [A, "run", "recipes/sft.yaml", "init:init.vocab_size=1"], ("vocab_size",)),
        Case(F, "chain: init:training.nope=1", [A, "run", "recipes/sft.yaml", "init:training.nope=1"], ("nope",)),
        Case(F, "override after --dry-run with a typo", [A, "run", "recipes/sft.yaml", "--dry-run", "training.nope=1"], ("nope",)),
        Case(F, "last of two overrides is bad", SFT + ["training.max_steps=2", "training.max_steps=abc"], ("max_steps",)),
        Case(F, "cli: no command", [A], ("COMMAND", "command")),
        Case(F, "cli: unknown command", [A, "runn", "recipes/sft.yaml"], ("runn",)),
        Case(F, "cli: run without a recipe", [A, "run"], ("recipe",)),
        Case(F, "cli: run --dry-run without a recipe", [A, "run", "--dry-run"], ("recipe",)),
        Case(F, "cli: unknown flag", [A, "run", "recipes/sft.yaml", "--nope"], ("--nope",)),
        Case(F, "cli: misspelt --dry-run", [A, "run", "recipes/sft.yaml", "--dryrun"], ("--dryrun",)),
        Case(F, "cli: short flag", [A, "run", "recipes/sft.yaml", "-n", "3"], ("-n",)),
        Case(F, "cli: compare without models", [A, "compare"], ("MODEL",)),
        Case(F, "cli: recipe given twice", [A, "run", "recipes/sft.yaml", "recipes/dpo.yaml"], ("dpo.yaml",)),
        Case(F, "cli: recipe path typo", [A, "run", "recipes/stf.yaml"], ("stf.yaml",)),
        Case(F, "cli: python -m alignment with a missing recipe", [A, "recipes/nope.yaml"], ("nope.yaml",)),
    ]
    return cases


# Bad data files: relative path -> content, and the names the error must give.
def data_files() -> list[tuple[str, str, object, tuple[str, ...]]]:
    """(label, file, content, names) for files that are bad for every stage."""
    long_cell = "x" * 200_000
    return [
        ("missing file", "data/missing.jsonl", "MISSING", ("missing.jsonl",)),
        ("empty directory", "bad/dir", None, ("dir",)),
        ("directory of unrelated files", "bad/stuff", {"a.txt": "hello", "b.bin": b"\x00\x01"}, ("stuff",)),
        ("empty .jsonl", "bad/e.jsonl", "", ("e.jsonl",)),
        ("whitespace-only .jsonl", "bad/w.jsonl", "\n  \n\n", ("w.jsonl",)),
        ("non-UTF-8 .jsonl", "bad/l.jsonl", '{"x": "caf\xe9"}\n'.encode("latin-1"), ("l.jsonl",)),
        ("binary named .jsonl", "bad/b.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", ("b.jsonl",)),
        ("bad JSON on line 3", "bad/j.jsonl", "VALID\nVALID\n{\"prompt\": oops}\nVALID\n", ("j.jsonl:3",)),
        ("truncated last line", "bad/t.jsonl", "VALID\nVALID\n{\"prompt\": \"p\", \"cho", ("t.jsonl:3",)),
        ("a line that is a list", "bad/a.jsonl", "VALID\n[1, 2, 3]\n", ("a.jsonl:2",)),
        ("a line that is a string", "bad/s.jsonl", "VALID\n\"just text\"\n", ("s.jsonl:2",)),
        ("JSONL named .txt", "bad/d.txt", "VALID\nVALID\n", ("d.txt",)),
        ("JSONL named .JSONL", "bad/d.JSONL", "VALID\nVALID\n", ("d.JSONL",)),
        ("TSV file", "bad/d.tsv", "a\tb\n1\t2\n", ("d.tsv",)),
        ("corrupt .jsonl.gz", "bad/c.jsonl.gz", "GZCUT", ("c.jsonl.gz",)),
        ("plain text named .jsonl.gz", "bad/p.jsonl.gz", "VALID\n", ("p.jsonl.gz",)),
        ("empty .csv", "bad/e.csv", "", ("e.csv",)),
        ("header-only .csv", "bad/h.csv", "HEADER\n", ("h.csv",)),
        ("ragged CSV row", "bad/r.csv", "CSV_RAGGED", ("r.csv:3",)),
        ("CSV with an unclosed quote", "bad/q.csv", "CSV_QUOTE", ("q.csv",)),
        ("CSV with a long cell, then a ragged row", "bad/long.csv", ("CSV_LONG", long_cell), ("long.csv:3",)),
        ("semicolon-separated CSV", "bad/semi.csv", "CSV_SEMI", ("semi.csv",)),
        ("invalid .json", "bad/i.json", "[{\"a\": 1},", ("i.json",)),
        ("empty .json", "bad/e.json", "", ("e.json",)),
        (".json that is an object", "bad/o.json", "{\"data\": []}", ("o.json",)),
        (".json list of strings", "bad/ls.json", "[\"a\", \"b\"]", ("ls.json",)),
        (".json with a lone surrogate", "bad/sur.json", "JSON_SURROGATE", ("sur.json",)),
        ("corrupt .parquet", "bad/c.parquet", b"PAR1garbage-not-parquet", ("c.parquet",)),
        ("empty .parquet", "bad/e.parquet", b"", ("e.parquet",)),
        ("hub dataset id not reachable", "nobody-here/no-such-dataset", "HUB", ("nobody-here/no-such-dataset",)),
        ("hub dataset id with a config", "nobody-here/no-such-dataset:cfg", "HUB", ("nobody-here/no-such-dataset",)),
    ]


def render(content, valid_row: dict, columns: list[str]):
    """Make the file content for a stage: VALID lines become a valid row of that stage, ..."""
    if content in ("MISSING", "HUB"):
        return None
    if isinstance(content, dict):
        return content
    if content == "GZCUT":
        data = gzip.compress((json.dumps(valid_row) + "\n").encode() * 20)
        return data[: len(data) // 2]
    cells = [valid_row[c] if isinstance(valid_row[c], str) else json.dumps(valid_row[c]) for c in columns]

    def csv_line(values):
        return ",".join('"' + v.replace('"', '""') + '"' for v in values) + "\n"

    if content == "CSV_RAGGED":
        return ",".join(columns) + "\n" + csv_line(cells) + csv_line(cells + ["extra", "more"])
    if content == "CSV_QUOTE":
        return ",".join(columns) + "\n" + csv_line(cells) + '"unclosed,' + ",".join(cells[1:]) + "\n"
    if isinstance(content, tuple) and content[0] == "CSV_LONG":  # a valid row whose first text is over 131,072 characters
        long = json.loads(json.dumps(valid_row))
        if "messages" in long:
            long["messages"][0]["content"] = content[1]
        else:
            long[columns[0]] = content[1]
        long_cells = [long[c] if isinstance(long[c], str) else json.dumps(long[c]) for c in columns]
        return ",".join(columns) + "\n" + csv_line(long_cells) + csv_line(cells + ["extra"])
    if content == "CSV_SEMI":
        return ";".join(columns) + "\n" + ";".join(cells) + "\n"
    if content == "JSON_SURROGATE":
        first = json.dumps(valid_row)
        return "[" + first[:-1] + ', "note": "a\\ud800"}, ' + first + "]"
    if isinstance(content, str):
        parts = content.replace("HEADER", ",".join(columns)).split("VALID")
        return "".join(part + (json.dumps(variant(valid_row, i)) if i < len(parts) - 1 else "") for i, part in enumerate(parts))
    return content


def variant(row: dict, i: int) -> dict:
    """A valid row made distinct (so that deduplication drops none of them)."""
    row = json.loads(json.dumps(row))
    if "messages" in row:
        row["messages"][0]["content"] += f" v{i}"
    else:
        key = "prompt" if "prompt" in row else "text"
        row[key] += f" v{i}"
    return row


def stage_data_cases(F: str, label: str, base: list[str], valid_row: dict, columns: list[str], key="data.source") -> list[Case]:
    cases = []
    for what, path, content, names in data_files():
        made = render(content, valid_row, columns)
        setup = {}
        if isinstance(made, dict):
            setup = {f"{path}/{k}": v for k, v in made.items()}
        elif content not in ("MISSING", "HUB"):
            setup = {path: made}
        cases.append(Case(F, f"{label}: {what}", base + [f"{key}={path}"], names, setup))
    return cases


def data_family() -> list[Case]:
    F = "data files"
    pair = PAIRS[0]
    conv = CONVS[0]
    cases = []
    cases += stage_data_cases(F, "sft", SFT, conv, ["messages"])
    cases += stage_data_cases(F, "dpo", DPO, pair, ["prompt", "chosen", "rejected"])
    # Row-level mistakes, per stage.
    rows = [
        ("sft", SFT, "pairs file given to sft", jsonl(*PAIRS), ("p.jsonl", "messages")),
        ("sft", SFT, "text file given to sft", jsonl(*TEXTS), ("p.jsonl", "messages")),
        ("sft", SFT, "messages is a string", jsonl(*CONVS[:2], {"messages": "hi there"}), ("p.jsonl:3",)),
        ("sft", SFT, "message without a role", jsonl(*CONVS[:2], {"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}),
         ("p.jsonl:3",)),
        ("sft", SFT, "role 'bot'", jsonl(*CONVS[:2], {"messages": msgs(("user", "hi"), ("bot", "hello"))}), ("p.jsonl:3",)),
        ("sft", SFT, "content null", jsonl(*CONVS[:2], {"messages": [{"role": "user", "content": None},
                                                                  {"role": "assistant", "content": "a"}]}), ("p.jsonl:3",)),
        ("sft", SFT, "no assistant turn", jsonl(*CONVS[:2], {"messages": msgs(("user", "hi"))}), ("p.jsonl:3",)),
        ("sft", SFT, "empty messages list", jsonl(*CONVS[:2], {"messages": []}), ("p.jsonl:3",)),
        ("dpo", DPO, "sft file given to dpo", jsonl(*CONVS), ("p.jsonl", "prompt", "chosen")),
        ("dpo", DPO, "row without rejected", jsonl(*PAIRS[:1], {"prompt": "q", "chosen": "a"}, *PAIRS[2:]), ("p.jsonl:2",)),
        ("dpo", DPO, "empty prompt", jsonl(*PAIRS[:2], {"prompt": "", "chosen": "a", "rejected": "b"}, *PAIRS[3:]), ("p.jsonl:3",)),
        ("dpo", DPO, "chosen equals rejected", jsonl(*PAIRS[:2], {"prompt": "q", "chosen": "a", "rejected": "a"}, *PAIRS[3:]),
         ("p.jsonl:3",)),
        ("dpo", DPO, "chosen null", jsonl(*PAIRS[:2], {"prompt": "q", "chosen": None, "rejected": "b"}, *PAIRS[3:]), ("p.jsonl:3",)),
        ("dpo", DPO, "chosen a number", jsonl(*PAIRS[:2], {"prompt": "q", "chosen": 5, "rejected": "b"}, *PAIRS[3:]), ("p.jsonl:3",)),
        ("reward", REWARD, "sft file given to reward", jsonl(*CONVS), ("p.jsonl", "prompt", "chosen")),
        ("reward", REWARD, "margin not a number", jsonl(*[{**p, "margin": "big"} for p in PAIRS]), ("p.jsonl:1", "margin")),
        ("reward", REWARD, "margin is NaN", jsonl(*PAIRS[:1], {**PAIRS[1], "margin": float("nan")}, *PAIRS[2:]),
         ("p.jsonl:2", "margin")),
        ("pretrain", PRETRAIN, "sft file given to pretrain", jsonl(*CONVS), ("p.jsonl", "text")),
        ("pretrain", PRETRAIN, "text null", jsonl(*TEXTS[:2], {"text": None}, *TEXTS[3:]), ("p.jsonl:3",)),
        ("pretrain", PRETRAIN, "text a list", jsonl(*TEXTS[:2], {"text": ["a", "b"]}, *TEXTS[3:]), ("p.jsonl:3",)),
        ("pretrain", PRETRAIN, "all texts empty", jsonl(*[{"text": ""} for _ in range(6)]), ("p.jsonl",)),
    ]
    for stage, base, what, content, names in rows:
        cases.append(Case(F, f"{stage}: {what}", base + ["data.source=bad/p.jsonl"], names, {"bad/p.jsonl": content}))
    cases += [
        Case(F, "sft: data.messages_field names no column", SFT + ["data.source=data/sft.jsonl", "data.messages_field=conversation"],
             ("conversation",)),
        Case(F, "dpo: data.prompt_field names no column", DPO + ["data.source=data/pairs.jsonl", "data.prompt_field=question"],
             ("question",)),
        Case(F, "dpo: chosen_field = rejected_field", DPO + ["data.source=data/pairs.jsonl", "data.chosen_field=rejected"],
             ("chosen_field", "both name")),
        Case(F, "pretrain: data.text_field names no column", PRETRAIN + ["data.source=data/text.jsonl", "data.text_field=body"],
             ("body",)),
        Case(F, "dpo: on_bad_row=drop and every row bad", DPO + ["data.source=bad/p.jsonl", "data.on_bad_row=drop"],
             ("p.jsonl", "dropped"), {"bad/p.jsonl": jsonl(*[{"prompt": "q", "chosen": "a", "rejected": "a"}] * 6)}),
        Case(F, "sft: on_bad_row=drop and every row bad", SFT + ["data.source=bad/p.jsonl", "data.on_bad_row=drop"],
             ("p.jsonl", "dropped"), {"bad/p.jsonl": jsonl(*[{"messages": "x"}] * 6)}),
        Case(F, "sft: every row longer than max_length", SFT + ["training.max_length=4"], ("max_length",)),
        Case(F, "dpo: every row longer than max_length", DPO + ["training.max_length=4"], ("max_length",)),
        Case(F, "reward: every row longer than max_length", REWARD + ["training.max_length=4"], ("max_length",)),
        Case(F, "dpo: data_prep output without train.jsonl", DPO + ["data.source=bad/prev"], ("prev",),
             {"bad/prev": lambda ws, p: (shutil.copytree(ws / "prev", p), *(f.unlink() for f in p.glob("train.*")))}),
        Case(F, "dpo: data_prep output with a corrupt train.jsonl", DPO + ["data.source=bad/prev"], ("train.jsonl",),
             {"bad/prev": lambda ws, p: (shutil.copytree(ws / "prev", p), (p / "train.jsonl").write_text("{oops\n"),
                                         *(f.unlink() for f in p.glob("*.parquet")))}),
        Case(F, "dpo: data.split=test of a data_prep output without test", DPO + ["data.source=prev", "data.split=validation"],
             ("validation", "split")),
        Case(F, "sft: a data file given as a prep dir path with a typo", SFT + ["data.source=prev/trian.jsonl"], ("trian.jsonl",)),
        Case(F, "dpo: eval_examples larger than the data", DPO + ["data.source=data/pairs.jsonl", "data.eval_examples=5000"],
             ("eval_examples",)),
    ]
    return cases


def _truncate(name: str):
    def edit(p: Path):
        f = p / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    return edit


def _config(**changes):
    def edit(p: Path):
        config = json.loads((p / "config.json").read_text())
        config.update(changes)
        (p / "config.json").write_text(json.dumps(config))

    return edit


def _write(name: str, content):
    def edit(p: Path):
        (p / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return edit


def _remove(*names: str):
    def edit(p: Path):
        for name in names:
            (p / name).unlink()

    return edit


def _weights_dir(p: Path):
    (p / "model.safetensors").unlink()
    (p / "model.safetensors").mkdir()


MODEL_VARIANTS = {
    "notok": _remove("tokenizer.json", "tokenizer_config.json"),
    "noweights": _remove("model.safetensors"),
    "halfweights": _truncate("model.safetensors"),
    "mismatch": _config(intermediate_size=128),
    "badconfig": _write("config.json", "{\"model_type\": \"llama\","),
    "latin1config": _write("config.json", b"{\"model_type\": \"llama\", \"x\": \"caf\xe9\"}"),
    "unknowntype": _config(model_type="llamaa"),
    "badtok": _write("tokenizer.json", "not json at all"),
    "remote": _config(model_type="my_custom", auto_map={"AutoModelForCausalLM": "modeling_my.MyModel",
                                                        "AutoConfig": "configuration_my.MyConfig"}),
    "weightsdir": _weights_dir,
    "badtemplate": _write("chat_template.jinja", "{% for m in messages %}{{ m.content }"),
    "latin1tokconfig": _write("tokenizer_config.json", b"{\"x\": \"caf\xe9\"}"),
    "noconfig": _remove("config.json"),
}


def models_family() -> list[Case]:
    F = "models"
    cases = []
    for variant, names in [
        ("notok", ("notok",)), ("noweights", ("noweights",)), ("halfweights", ("model.safetensors",)),
        ("mismatch", ("mismatch", "config.json")), ("badconfig", ("config.json",)), ("latin1config", ("config.json",)),
        ("unknowntype", ("llamaa", "model_type")), ("badtok", ("tokenizer",)), ("remote", ("trust_remote_code",)),
        ("weightsdir", ("model.safetensors",)), ("badtemplate", ("chat_template",)), ("latin1tokconfig", ("tokenizer_config.json",)),
        ("noconfig", ("config.json",)),
    ]:
        setup = {f"bad/{variant}": model_variant(BASE, MODEL_VARIANTS[variant])}
        cases.append(Case(F, f"sft model: {variant}", SFT + [f"model=bad/{variant}"], names + (f"bad/{variant}",), setup))
    for variant, names in [("notok", ("notok",)), ("halfweights", ("model.safetensors",)), ("mismatch", ("mismatch", "config.json"))]:
        setup = {f"bad/{variant}": model_variant(BASE, MODEL_VARIANTS[variant])}
        names = names + (f"bad/{variant}",)
        if variant != "notok":  # the reference needs no tokenizer of its own
            cases.append(Case(F, f"dpo ref_model: {variant}", DPO + [f"ref_model=bad/{variant}"], names, setup))
        cases.append(Case(F, f"compare model: {variant}", CMP[:2] + ["a=models/base", f"b=bad/{variant}"] + CMP[4:] + ["--out", "cmp"],
                          names, setup))
    cases += [
        Case(F, "sft model: missing directory", SFT + ["model=models/missing"], ("missing",)),
        Case(F, "sft model: a typo in the path", SFT + ["model=models/bse"], ("bse",)),
        Case(F, "sft model: a data file", SFT + ["model=data/pairs.jsonl"], ("pairs.jsonl",)),
        Case(F, "sft model: an empty directory", SFT + ["model=bad/empty"], ("empty",), {"bad/empty": None}),
        Case(F, "sft model: a directory with only config.json", SFT + ["model=bad/oc"], ("oc",),
             {"bad/oc": model_variant(BASE, _remove("model.safetensors", "tokenizer.json", "tokenizer_config.json"))}),
        Case(F, "sft model: a data_prep output", SFT + ["model=prev"], ("prev",)),
        Case(F, "sft model: a reward model", SFT + ["model=models/rm"], ("rm", "classifier")),
        Case(F, "pretrain model: a reward model", PRETRAIN + ["model=models/rm"], ("rm", "classifier")),
        Case(F, "dpo ref_model: a reward model", DPO + ["ref_model=models/rm"], ("rm", "classifier")),
        Case(F, "dpo ref_model: missing", DPO + ["ref_model=models/missing"], ("missing",)),
        Case(F, "dpo report.models: a reward model", DPO[:-1] + ["report.models={a: models/rm, b: dpo}", "report.baseline=null"],
             ("models/rm",)),
        Case(F, "sft model: hub id not reachable", SFT + ["model=nobody-here/no-such-model"], ("nobody-here/no-such-model",)),
        Case(F, "sft model: ''", SFT + ["model="], ("model",)),
        Case(F, "sft model: null", SFT + ["model=null"], ("model",)),
        Case(F, "sft model: a recipe path instead of {from: ...}", SFT + ["model=recipes/pretrain.yaml"], ("pretrain.yaml",)),
        Case(F, "sft model: ~/ path that does not exist", SFT + ["model=~/no-model"], ("no-model",)),
        Case(F, "sft: lora target_modules name no module", SFT + ["lora={target_modules: [q_proj, qproj]}"], ("qproj",)),
        Case(F, "dpo: lora target_modules name no module", DPO + ["lora={target_modules: [qproj]}"], ("qproj",)),
        Case(F, "sft: attn_implementation flash_attention_2 (not installed)",
             SFT + ["model_options.attn_implementation=flash_attention_2"], ("flash_attention_2", "attn_implementation")),
        Case(F, "ppo reward_model: a causal LM", rl("ppo", f"reward_model={BASE}"), ("reward_model",)),
        Case(F, "ppo reward_model: a two-label classifier", rl("ppo", "reward_model=models/rm2"), ("rm2", "reward_model")),
        Case(F, "ppo reward_model: missing", rl("ppo", "reward_model=models/missing"), ("missing",)),
        Case(F, "ppo reward_model: weights truncated", rl("ppo", "reward_model=bad/rmhalf"), ("model.safetensors",),
             {"bad/rmhalf": model_variant("models/rm", _truncate("model.safetensors"))}),
        Case(F, "reward stage model: a data file", REWARD + ["model=data/pairs.jsonl"], ("pairs.jsonl",)),
    ]
    return cases


def outputs_family() -> list[Case]:
    F = "output directories"
    user_dir = {"userdir/notes.md": "my notes\n", "userdir/eval/result.json": "{\"acc\": 0.9}\n"}
    prev_run = {"runs/old": copy_from(BASE), "runs/old/notes.md": "mine\n"}
    cases = []
    for label, base in [("sft", SFT), ("init", INIT)]:
        cases += [
            Case(F, f"{label}: output_dir is a file", base + ["output_dir=notes.txt"], ("notes.txt",)),
            Case(F, f"{label}: output_dir under a file", base + ["output_dir=notes.txt/sub"], ("notes.txt",)),
            Case(F, f"{label}: output_dir not writable (/proc)", base + ["output_dir=/proc/bad-inputs-out"], ("/proc",)),
            Case(F, f"{label}: output_dir holds user files", base + ["output_dir=userdir"], ("userdir",), user_dir),
            Case(F, f"{label}: output_dir is the working directory", base + ["output_dir=."], ("output_dir", "'.'")),
        ]
    cases += [
        Case(F, "sft: output_dir /dev/null", SFT + ["output_dir=/dev/null"], ("/dev/null",)),
        Case(F, "sft: output_dir above the working directory", SFT + ["output_dir=.."], ("output_dir", "..")),
        Case(F, "sft: output_dir holds only a hidden file", SFT + ["output_dir=userdir"], ("userdir",), {"userdir/.DS_Store": b"\x00"}),
        Case(F, "sft: output_dir.partial holds user files", SFT + ["output_dir=runs/x"], ("x.partial",),
             {"runs/x.partial/mine.txt": "mine\n"}),
        Case(F, "sft: output_dir is the input model", SFT + [f"output_dir={BASE}"], ("base",)),
        Case(F, "sft: output_dir inside the input model", SFT + [f"output_dir={BASE}/out"], ("base",)),
        Case(F, "sft: output_dir holds the input model", SFT + ["output_dir=models"], ("models",)),
        Case(F, "sft: output_dir holds the data file", SFT + ["data.source=data/sft.jsonl", "output_dir=data"], ("data",)),
        Case(F, "sft: output_dir is the data file", SFT + ["data.source=data/sft.jsonl", "output_dir=data/sft.jsonl"], ("sft.jsonl",)),
        Case(F, "sft: output_dir holds the chat template", SFT + ["model_options.chat_template=tpl/t.jinja", "output_dir=tpl"],
             ("tpl",), {"tpl/t.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}),
        Case(F, "sft: output_dir is a data_prep output", SFT + ["output_dir=prev"], ("prev",)),
        Case(F, "sft: output_dir is the recipes directory", SFT + ["output_dir=recipes"], ("recipes",)),
        Case(F, "sft: output_dir is HOME", SFT + ["output_dir=~/"], ("output_dir", "home")),
        Case(F, "sft: output_dir name too long", SFT + ["output_dir=runs/" + "x" * 300], ("output_dir", "xxxx")),
        Case(F, "chain: two recipes, one output_dir", [A, "run", "recipes/sft.yaml", "pretrain:output_dir=runs/same",
                                                       "output_dir=runs/same"], ("same",)),
        Case(F, "chain: nested output_dirs", [A, "run", "recipes/sft.yaml", "pretrain:output_dir=runs/a", "output_dir=runs/a/b"],
             ("runs/a",)),
        Case(F, "prep: output_dir is a file", [A, "run", "recipes/prep.yaml", "output_dir=notes.txt"], ("notes.txt",)),
        Case(F, "prep: output_dir holds its source", [A, "run", "bad/r.yaml"], ("data",),
             rec("stage: prep\nprep:\n  sources:\n    - path: data/pairs.jsonl\noutput_dir: data\n")),
        Case(F, "compare recipe: output_dir holds user files", [A, "run", "bad/r.yaml"], ("userdir",),
             {**user_dir, **rec("stage: compare\nmodels: {a: models/base, b: models/base}\nprompts: {num_prompts: 4}\n"
                                "generation: {max_new_tokens: 4}\noutput_dir: userdir\n")}),
        Case(F, "init: rerun into a run of ours holding a user file", INIT + ["output_dir=runs/old"], ("runs/old", "notes.md"),
             prev_run, may_succeed=("runs/old/notes.md",)),
        Case(F, "init: rerun into a run of ours holding a user folder", INIT + ["output_dir=runs/old"], ("runs/old", "eval"),
             {"runs/old": copy_from(BASE), "runs/old/eval/result.json": "{\"acc\": 1}\n"}, may_succeed=("runs/old/eval/result.json",)),
    ]
    return cases


def data_prep_family() -> list[Case]:
    F = "data_prep"
    out = ["--out", "out"]
    P = DPP + out
    strict = DPP[:2]
    cases = [
        Case(F, "no command", [DP], ("COMMAND", "command")),
        Case(F, "unknown command", [DP, "pair", "data/pairs.jsonl", "--out", "out"], ("pair",)),
        Case(F, "pairs without --out", DPP, ("--out",)),
        Case(F, "pairs without a source", [DP, "pairs", "--out", "out"], ("SOURCE",)),
        Case(F, "source missing", [DP, "pairs", "data/nope.jsonl", "--quiet", *out], ("nope.jsonl",)),
        Case(F, "source an empty directory", [DP, "pairs", "bad/dir", "--quiet", *out], ("dir",), {"bad/dir": None}),
        Case(F, "--shape bogus", P + ["--shape", "bogus"], ("--shape",)),
        Case(F, "--shape ranked on explicit pairs", P + ["--shape", "ranked"], ("ranked", "pairs.jsonl")),
        Case(F, "ambiguous shape", [DP, "pairs", "bad/amb.jsonl", "--quiet", *out], ("--shape", "shape"),
             {"bad/amb.jsonl": jsonl(*[{**p, "ranked": ["a", "b"]} for p in PAIRS])}),
        Case(F, "--column without =", P + ["--column", "prompt"], ("--column",)),
        Case(F, "--column unknown role", P + ["--column", "answer=x"], ("answer",)),
        Case(F, "--column two roles on one column", [DP, "pairs", "bad/x.jsonl", "--quiet", "--column", "chosen=x", "--column",
                                                     "rejected=x", *out], ("x",), {"bad/x.jsonl": jsonl({"prompt": "p", "x": "a"})}),
        Case(F, "--column names a missing column", P + ["--column", "prompt=question"], ("question",)),
        Case(F, "--weights count mismatch", P + ["--weights", "1", "2"], ("--weights",)),
        Case(F, "--names count mismatch", P + ["--names", "a", "b"], ("--names",)),
        Case(F, "--max-length without --tokenizer", P + ["--max-length", "50"], ("--tokenizer", "--max-length")),
        Case(F, "--max-prompt-tokens without --tokenizer", P + ["--max-prompt-tokens", "5"], ("--tokenizer", "--max-prompt-tokens")),
        Case(F, "--tokenizer missing", P + ["--max-length", "50", "--tokenizer", "models/missing"], ("missing",)),
        Case(F, "--tokenizer a file", P + ["--max-length", "50", "--tokenizer", "data/pairs.jsonl"], ("pairs.jsonl",)),
        Case(F, "--tokenizer without tokenizer files", P + ["--max-length", "50", "--tokenizer", "bad/notok"], ("notok",),
             {"bad/notok": model_variant(BASE, MODEL_VARIANTS["notok"])}),
        Case(F, "--strict with a bad row", [DP, "pairs", "bad/p.jsonl", "--quiet", "--strict", *out], ("p.jsonl:2",),
             {"bad/p.jsonl": jsonl(PAIRS[0], {"prompt": "", "chosen": "a", "rejected": "b"}, *PAIRS[2:])}),
        Case(F, "--strict with --weights 0.5", P + ["--strict", "--weights", "0.5"], ("--strict", "--weights")),
        Case(F, "--strict with a duplicate row", [DP, "pairs", "bad/p.jsonl", "--quiet", "--strict", *out], ("p.jsonl:2",),
             {"bad/p.jsonl": jsonl(PAIRS[0], PAIRS[0], *PAIRS[2:])}),
        Case(F, "--out is a file", DPP + ["--out", "notes.txt"], ("notes.txt",)),
        Case(F, "--out under a file", DPP + ["--out", "notes.txt/sub"], ("notes.txt",)),
        Case(F, "--out not writable (/proc)", DPP + ["--out", "/proc/bad-inputs-out"], ("/proc",)),
        Case(F, "--out holds user files", DPP + ["--out", "userdir"], ("userdir",), {"userdir/notes.md": "mine\n"}),
        Case(F, "--out holds its source", [DP, "pairs", "prev/train.jsonl", "--quiet", "--out", "prev"], ("prev",)),
        Case(F, "--out holds the source data file", DPP + ["--out", "data"], ("data",)),
        Case(F, "--out is the working directory", DPP + ["--out", "."], ("--out", "'.'")),
        Case(F, "--out ''", DPP + ["--out", ""], ("--out",)),
        Case(F, "--out is the source file", DPP + ["--out", "data/pairs.jsonl"], ("pairs.jsonl",)),
        Case(F, "--out a data_prep output holding a user file", DPP + ["--out", "bad/prev"], ("notes.md", "bad/prev"),
             {"bad/prev": copy_from("prev"), "bad/prev/notes.md": "mine\n"}, may_succeed=("bad/prev/notes.md",)),
        Case(F, "sft on preference pairs", [DP, "sft", "data/pairs.jsonl", "--quiet", *out], ("pairs.jsonl", "messages")),
        Case(F, "text on conversations", [DP, "text", "data/sft.jsonl", "--quiet", *out], ("sft.jsonl", "text")),
        Case(F, "pairs on conversations", [DP, "pairs", "data/sft.jsonl", "--quiet", *out], ("sft.jsonl", "shape")),
        Case(F, "pairs on a text corpus", [DP, "pairs", "data/text.jsonl", "--quiet", *out], ("text.jsonl", "shape")),
        Case(F, "--split on a file", P + ["--split", "test"], ("--split", "split")),
        Case(F, "hub id not reachable", [DP, "pairs", "nobody-here/no-such-dataset", "--quiet", *out], ("nobody-here/no-such-dataset",)),
        Case(F, "demo --out holds user files", [DP, "demo", "--out", "userdir", "--pretrain", "10", "--sft", "10", "--pairs", "10",
                                                "--eval", "10"], ("userdir",), {"userdir/sft.jsonl": "my own data\n"}),
        Case(F, "demo --out is a file", [DP, "demo", "--out", "notes.txt"], ("notes.txt",)),
        Case(F, "demo without --out", [DP, "demo"], ("--out",)),
        Case(F, "onpolicy without --model", [DP, "onpolicy", "--prompts", "demo", "--oracle", *out], ("--model",)),
        Case(F, "onpolicy --model missing", ONP[:2] + ["--model", "models/missing"] + ONP[4:] + ["--oracle", *out], ("missing",)),
        Case(F, "onpolicy --model a reward model", ONP[:2] + ["--model", "models/rm"] + ONP[4:] + ["--oracle", *out], ("rm",)),
        Case(F, "onpolicy --reward-model a causal LM", ONP + ["--reward-model", BASE, *out], ("--reward-model",)),
        Case(F, "onpolicy --reward-model missing", ONP + ["--reward-model", "models/missing", *out], ("missing",)),
        Case(F, "onpolicy --reward-model two labels", ONP + ["--reward-model", "models/rm2", *out], ("rm2", "--reward-model")),
        Case(F, "onpolicy without a scorer", ONP + out, ("--oracle", "--reward-model")),
        Case(F, "onpolicy --oracle and --reward-model", ONP + ["--oracle", "--reward-model", "models/rm", *out],
             ("--oracle", "--reward-model")),
        Case(F, "onpolicy --prompts missing", ONP[:4] + ["--prompts", "data/nope.jsonl"] + ONP[6:] + ["--oracle", *out],
             ("nope.jsonl",)),
        Case(F, "onpolicy --prompts without a prompt column", ONP[:4] + ["--prompts", "data/sft.jsonl"] + ONP[6:] + ["--oracle", *out],
             ("prompt", "sft.jsonl")),
        Case(F, "onpolicy --prompt-column typo", ONP[:4] + ["--prompts", "data/prompts.jsonl", "--prompt-column", "promt"] + ONP[6:]
             + ["--oracle", *out], ("promt",)),
        Case(F, "onpolicy --oracle on prompts that are not demo", ONP[:4] + ["--prompts", "bad/p.jsonl"] + ONP[6:]
             + ["--oracle", *out], ("oracle", "gold", "demo"), {"bad/p.jsonl": jsonl({"prompt": "hello"}, {"prompt": "how are you"})}),
        Case(F, "onpolicy --out is a file", ONP + ["--oracle", "--out", "notes.txt"], ("notes.txt",)),
        Case(F, "onpolicy --reward-fn file missing", ONP + ["--reward-fn", "nope.py:score", *out], ("--reward-fn", "nope.py")),
        Case(F, "onpolicy --reward-fn not a function ref", ONP + ["--reward-fn", "score", *out], ("--reward-fn", "score")),
        Case(F, "onpolicy --reward-fn no such function", ONP + ["--reward-fn", "rf.py:nope", *out], ("--reward-fn", "nope"),
             {"rf.py": b"def score(completions, **kw):\n    return [1.0] * len(completions)\n"}),
        Case(F, "onpolicy --oracle and --reward-fn", ONP + ["--oracle", "--reward-fn", "gold", *out], ("--oracle", "--reward-fn")),
        Case(F, "onpolicy --reward-weights without --reward-fn", ONP + ["--reward-model", "models/rm", "--reward-weights", "1",
             *out], ("--reward-weights",)),
        Case(F, "onpolicy --reward-weights too many", ONP + ["--reward-fn", "gold", "--reward-weights", "1", "2", *out],
             ("--reward-weights",)),
    ]
    for cmd, flag, value in [
        ("pairs", "--weights", "0"), ("pairs", "--weights", "-1"), ("pairs", "--weights", "inf"), ("pairs", "--weights", "nan"),
        ("pairs", "--weights", "abc"), ("pairs", "--num-examples", "0"), ("pairs", "--num-examples", "-3"),
        ("pairs", "--num-examples", "1.5"), ("pairs", "--test-fraction", "1"), ("pairs", "--test-fraction", "-0.1"),
        ("pairs", "--test-fraction", "nan"), ("pairs", "--min-margin", "-1"), ("pairs", "--min-margin", "inf"),
        ("pairs", "--min-ratio", "0.5"), ("pairs", "--min-ratio", "nan"), ("pairs", "--max-turns", "0"), ("pairs", "--max-length", "0"),
        ("pairs", "--max-prompt-tokens", "-1"), ("pairs", "--num-proc", "0"), ("pairs", "--seed", "abc"),
        ("pairs", "--dedup", "fuzzy"), ("pairs", "--rejected-choice", "best"), ("pairs", "--ranked-pairs", "top"),
        ("pairs", "--split-seed", "1.5"), ("sft", "--max-turns", "-2"), ("sft", "--test-fraction", "2"),
        ("demo", "--pretrain", "0"), ("demo", "--sft", "-1"), ("demo", "--seed", "x"), ("demo", "--eval", "inf"),
        ("onpolicy", "--k", "1"), ("onpolicy", "--k", "0"), ("onpolicy", "--temperature", "-1"), ("onpolicy", "--temperature", "inf"),
        ("onpolicy", "--temperature", "nan"), ("onpolicy", "--top-p", "0"), ("onpolicy", "--top-p", "2"),
        ("onpolicy", "--max-new-tokens", "0"), ("onpolicy", "--batch-size", "0"), ("onpolicy", "--num-prompts", "0"),
        ("onpolicy", "--min-margin", "-1"),
    ]:
        if cmd == "pairs":
            argv = P + [flag, value]
        elif cmd == "sft":
            argv = [DP, "sft", "data/sft.jsonl", "--quiet", *out, flag, value]
        elif cmd == "demo":
            argv = [DP, "demo", *out, flag, value]
        else:
            argv = ONP + ["--oracle", *out, flag, value]
        cases.append(Case(F, f"{cmd} {flag} {value}", argv, (flag,)))
    # Bad files through data_prep, with --strict (without it, a bad row is dropped and counted, by design).
    for what, path, content, names in data_files():
        if content == "HUB" or what in ("missing file",):
            continue
        made = render(content, PAIRS[0], ["prompt", "chosen", "rejected"])
        setup = {f"{path}/{k}": v for k, v in made.items()} if isinstance(made, dict) else {path: made}
        cases.append(Case(F, f"pairs --strict: {what}", strict + [path, "--quiet", "--strict", *out], names, setup))
    return cases


def compare_family() -> list[Case]:
    F = "compare"
    out = ["--out", "cmp"]
    C = CMP + out

    def models(*ms):
        return [A, "compare", *ms] + CMP[4:] + out

    cases = [
        Case(F, "one model", models(f"a={BASE}"), ("MODEL", "two", "models")),
        Case(F, "the same label twice", models(f"a={BASE}", "a=models/rm"), ("'a'", "label")),
        Case(F, "empty label", models(f"={BASE}", f"b={BASE}"), ("label", "=models/base")),
        Case(F, "model missing", models(f"a={BASE}", "b=models/missing"), ("missing",)),
        Case(F, "model a data file", models(f"a={BASE}", "b=data/pairs.jsonl"), ("pairs.jsonl",)),
        Case(F, "model a reward model", models(f"a={BASE}", "b=models/rm"), ("rm",)),
        Case(F, "model an empty directory", models(f"a={BASE}", "b=bad/empty"), ("empty",), {"bad/empty": None}),
        Case(F, "model a hub id not reachable", models(f"a={BASE}", "b=nobody-here/no-such-model"), ("nobody-here/no-such-model",)),
        Case(F, "model a recipe with a typo", models(f"a={BASE}", "b=bad/r.yaml"), ("r.yaml",),
             rec("stage: sft\nmodel: models/base\ntrainng: {}\n")),
        Case(F, "model a recipe that does not exist", models(f"a={BASE}", "b=bad/none.yaml"), ("none.yaml",)),
        Case(F, "--baseline not a label", C + ["--baseline", "zz"], ("zz", "--baseline")),
        Case(F, "--baseline a path", C + ["--baseline", BASE], ("--baseline",)),
        Case(F, "--prompts missing", CMP[:5] + ["bad/nope.txt"] + CMP[6:] + out, ("nope.txt",)),
        Case(F, "--prompts a directory", CMP[:5] + ["bad/dir"] + CMP[6:] + out, ("dir",), {"bad/dir": None}),
        Case(F, "--prompts .txt empty", CMP[:5] + ["bad/p.txt"] + CMP[6:] + out, ("p.txt",), {"bad/p.txt": ""}),
        Case(F, "--prompts .txt blank lines only", CMP[:5] + ["bad/p.txt"] + CMP[6:] + out, ("p.txt",), {"bad/p.txt": "\n \n\n"}),
        Case(F, "--prompts .txt not UTF-8", CMP[:5] + ["bad/p.txt"] + CMP[6:] + out, ("p.txt:2",),
             {"bad/p.txt": "first\nsecond \xe9\n".encode("latin-1")}),
        Case(F, "--prompts .txt binary", CMP[:5] + ["bad/p.txt"] + CMP[6:] + out, ("p.txt",),
             {"bad/p.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}),
        Case(F, "--prompts .jsonl without a prompt column", CMP[:5] + ["data/sft.jsonl"] + CMP[6:] + out, ("prompt", "sft.jsonl")),
        Case(F, "--prompts .jsonl with a bad line", CMP[:5] + ["bad/p.jsonl"] + CMP[6:] + out, ("p.jsonl:2",),
             {"bad/p.jsonl": '{"prompt": "first: a b"}\n{"prompt": oops}\n'}),
        Case(F, "--prompts .jsonl with a prompt that is a number", CMP[:5] + ["bad/p.jsonl"] + CMP[6:] + out, ("p.jsonl:2",),
             {"bad/p.jsonl": '{"prompt": "first: a b"}\n{"prompt": 5}\n'}),
        Case(F, "--prompts .jsonl empty", CMP[:5] + ["bad/p.jsonl"] + CMP[6:] + out, ("p.jsonl",), {"bad/p.jsonl": ""}),
        Case(F, "--prompts .csv ragged", CMP[:5] + ["bad/p.csv"] + CMP[6:] + out, ("p.csv:3",),
             {"bad/p.csv": "prompt\nfirst: a b\n\"x\",\"y\",\"z\"\n"}),
        Case(F, "--prompts .json invalid", CMP[:5] + ["bad/p.json"] + CMP[6:] + out, ("p.json",), {"bad/p.json": "[{\"prompt\": "}),
        Case(F, "--prompts .parquet corrupt", CMP[:5] + ["bad/p.parquet"] + CMP[6:] + out, ("p.parquet",),
             {"bad/p.parquet": b"PAR1 not really"}),
        Case(F, "--prompts .tsv", CMP[:5] + ["bad/p.tsv"] + CMP[6:] + out, ("p.tsv",), {"bad/p.tsv": "prompt\nhi\n"}),
        Case(F, "--prompts hub id not reachable", CMP[:5] + ["nobody-here/no-such-dataset"] + CMP[6:] + out,
             ("nobody-here/no-such-dataset",)),
        Case(F, "--prompt-field typo", C + ["--prompt-field", "promt"], ("promt",)),
        Case(F, "--split on a file", C + ["--split", "test"], ("--split", "split")),
        Case(F, "--reward-model a causal LM", C + ["--reward-model", BASE], ("--reward-model",)),
        Case(F, "--reward-model missing", C + ["--reward-model", "models/missing"], ("missing",)),
        Case(F, "--reward-model two labels", C + ["--reward-model", "models/rm2"], ("rm2", "--reward-model")),
        Case(F, "--reward-model weights truncated", C + ["--reward-model", "bad/rmhalf"], ("model.safetensors",),
             {"bad/rmhalf": model_variant("models/rm", _truncate("model.safetensors"))}),
        Case(F, "--samples-per-prompt 2 with --greedy", C + ["--samples-per-prompt", "2", "--greedy"],
             ("--samples-per-prompt", "--greedy", "temperature")),
        Case(F, "--out is a file", CMP + ["--out", "notes.txt"], ("notes.txt",)),
        Case(F, "--out under a file", CMP + ["--out", "notes.txt/sub"], ("notes.txt",)),
        Case(F, "--out not writable (/proc)", CMP + ["--out", "/proc/bad-inputs-out"], ("/proc",)),
        Case(F, "--out holds user files", CMP + ["--out", "userdir"], ("userdir",), {"userdir/notes.md": "mine\n"}),
        Case(F, "--out is an input model", CMP + ["--out", BASE], ("base",)),
        Case(F, "--out holds the prompts file", CMP + ["--out", "data"], ("data",)),
        Case(F, "--out is the working directory", CMP + ["--out", "."], ("--out", "'.'")),
        Case(F, "--out ''", CMP + ["--out", ""], ("--out",)),
        Case(F, "--out /dev/null", CMP + ["--out", "/dev/null"], ("/dev/null",)),
        Case(F, "--out a compare output holding a user file", CMP + ["--out", "bad/cmp"], ("notes.md", "bad/cmp"),
             {"bad/cmp": copy_from("cmp_prev"), "bad/cmp/notes.md": "mine\n"}, may_succeed=("bad/cmp/notes.md",)),
        Case(F, "misspelt flag --temprature", C + ["--temprature", "0.5"], ("--temprature",)),
    ]
    for flag, value in [("--num-prompts", "-1"), ("--temperature", "-1"), ("--temperature", "inf"), ("--temperature", "nan"),
                        ("--top-p", "0"), ("--top-p", "1.5"), ("--max-new-tokens", "0"), ("--samples-per-prompt", "0"),
                        ("--batch-size", "0"), ("--seed", "abc"), ("--num-prompts", "many"), ("--max-new-tokens", "1e9")]:
        cases.append(Case(F, f"{flag} {value}", C + [flag, value], (flag,)))
    return cases


REWARD_FILES = {
    "syntax": "def score(prompts, completions, **kw)\n    return [1.0] * len(prompts)\n",
    "import_raises": "import nonexistent_package_xyz\ndef score(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n",
    "raises": "def score(prompts, completions, **kw):\n    return [{'a': 1}[c[:1]] for c in completions]\n",
    "wrong_length": "def score(prompts, completions, **kw):\n    return [1.0] * (len(completions) - 1)\n",
    "nan": "def score(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n",
    "inf": "def score(prompts, completions, **kw):\n    return [float('inf')] * len(completions)\n",
    "none": "def score(prompts, completions, **kw):\n    pass\n",
    "string": "def score(prompts, completions, **kw):\n    return 'good'\n",
    "strings": "def score(prompts, completions, **kw):\n    return ['1.0'] * len(completions)\n",
    "needs_column": "def score(prompts, completions, answer):\n    return [float(c == a) for c, a in zip(completions, answer)]\n",
    "not_callable": "score = 3\n",
    "ok": "def score(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n",
}


def rl_family() -> list[Case]:
    F = "rl (grpo/rloo/ppo)"

    def fn(kind):
        return {"bad/rw.py": REWARD_FILES[kind]}

    cases = [
        Case(F, "grpo reward_fn: missing file", rl("grpo", "reward_fn=bad/missing.py:score"), ("missing.py",)),
        Case(F, "grpo reward_fn: no such function", rl("grpo", "reward_fn=bad/rw.py:nope"), ("nope",), fn("ok")),
        Case(F, "grpo reward_fn: not callable", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py",), fn("not_callable")),
        Case(F, "grpo reward_fn: syntax error", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py",), fn("syntax")),
        Case(F, "grpo reward_fn: import fails", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py",), fn("import_raises")),
        Case(F, "grpo reward_fn: no such module", rl("grpo", "reward_fn=nosuchmod_xyz:score"), ("nosuchmod_xyz",)),
        Case(F, "grpo reward_fn: no :name", rl("grpo", "reward_fn=bad/rw.py"), ("rw.py",), fn("ok")),
        Case(F, "grpo reward_fn: empty name", rl("grpo", "reward_fn=bad/rw.py:"), ("rw.py",), fn("ok")),
        Case(F, "grpo reward_fn: a directory", rl("grpo", "reward_fn=bad/d.py:score"), ("d.py",), {"bad/d.py": None}),
        Case(F, "grpo reward_fn: gold on prompts that are not demo", rl("grpo", "reward_fn=gold", "data.source=bad/p.jsonl"),
             ("gold",), {"bad/p.jsonl": jsonl(*[{"prompt": f"hello {i}"} for i in range(8)])}),
        Case(F, "grpo reward_fn: raises", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("raises")),
        Case(F, "grpo reward_fn: wrong length", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("wrong_length")),
        Case(F, "grpo reward_fn: NaN", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("nan")),
        Case(F, "grpo reward_fn: inf", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("inf")),
        Case(F, "grpo reward_fn: returns None", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("none")),
        Case(F, "grpo reward_fn: returns a string", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("string")),
        Case(F, "grpo reward_fn: returns strings", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("strings")),
        Case(F, "grpo reward_fn: needs a column the data lacks", rl("grpo", "reward_fn=bad/rw.py:score"), ("rw.py:score", "answer"),
             fn("needs_column")),
        Case(F, "grpo reward_weights: two for one source", rl("grpo", "reward_weights=[1, 2]"), ("reward_weights",)),
        Case(F, "grpo reward_weights: NaN", rl("grpo", "reward_weights=[.nan]"), ("reward_weights",)),
        Case(F, "grpo reward_weights: inf", rl("grpo", "reward_weights=[.inf]"), ("reward_weights",)),
        Case(F, "grpo reward_weights: []", rl("grpo", "reward_weights=[]"), ("reward_weights",)),
        Case(F, "grpo reward_weights: a string", rl("grpo", "reward_weights=[high]"), ("reward_weights",)),
        Case(F, "grpo: num_generations 3 does not divide batch_size 4", rl("grpo", "grpo.num_generations=3"),
             ("num_generations", "batch_size")),
        Case(F, "grpo: num_generations 1", rl("grpo", "grpo.num_generations=1"), ("num_generations",)),
        Case(F, "grpo: num_generations larger than batch_size", rl("grpo", "grpo.num_generations=8"), ("num_generations", "batch_size")),
        Case(F, "grpo: total_episodes below batch_size", rl("grpo", "grpo.total_episodes=2"), ("total_episodes", "batch_size")),
        Case(F, "grpo: num_minibatches does not divide the batch", rl("grpo", "grpo.num_minibatches=3"), ("num_minibatches",)),
        Case(F, "grpo: no reward source", rl("grpo", "reward_fn=[]"), ("reward_fn", "reward_model", "reward")),
        Case(F, "grpo reward_model: a causal LM", rl("grpo", f"reward_model={BASE}"), ("reward_model",)),
        Case(F, "grpo reward_model: missing", rl("grpo", "reward_model=models/missing"), ("missing",)),
        Case(F, "grpo reward_model: two labels", rl("grpo", "reward_model=models/rm2"), ("rm2", "reward_model")),
        Case(F, "grpo: reward_model and reward_fn, one weight", rl("grpo", "reward_model=models/rm", "reward_weights=[1]"),
             ("reward_weights",)),
        Case(F, "grpo: prompts file without a prompt column", rl("grpo", "reward_fn=bad/rw.py:score", "data.source=data/sft.jsonl"),
             ("prompt", "sft.jsonl"), fn("ok")),
        Case(F, "grpo: every prompt longer than max_prompt_length", rl("grpo", "data.max_prompt_length=1"), ("max_prompt_length",)),
        Case(F, "grpo: prompts file empty", rl("grpo", "reward_fn=bad/rw.py:score", "data.source=bad/p.jsonl"), ("p.jsonl",),
             {**fn("ok"), "bad/p.jsonl": ""}),
        Case(F, "grpo section in an rloo recipe", rl("rloo", "grpo.beta=0.1"), ("grpo",)),
        Case(F, "ppo section in a grpo recipe", rl("grpo", "ppo.kl_coef=0.1"), ("ppo",)),
        Case(F, "grpo: lora target_modules name no module", rl("grpo", "lora={target_modules: [qproj]}"), ("qproj",)),
        Case(F, "rloo: num_generations 3 does not divide batch_size 4", rl("rloo", "rloo.num_generations=3"),
             ("num_generations", "batch_size")),
        Case(F, "rloo reward_model: a causal LM", rl("rloo", f"reward_model={BASE}"), ("reward_model",)),
        Case(F, "rloo: no reward source", rl("rloo", "reward_model=null"), ("reward_fn", "reward_model", "reward")),
        Case(F, "rloo reward_fn: raises", rl("rloo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("raises")),
        Case(F, "rloo reward_fn: wrong length", rl("rloo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("wrong_length")),
        Case(F, "rloo reward_weights: one for two sources", rl("rloo", "reward_fn=bad/rw.py:score", "reward_weights=[1]"),
             ("reward_weights",), fn("ok")),
        Case(F, "ppo: num_minibatches does not divide the batch", rl("ppo", "ppo.num_minibatches=3"), ("num_minibatches",)),
        Case(F, "ppo: no reward source", rl("ppo", "reward_model=null"), ("reward_model",)),
        Case(F, "ppo reward_fn: NaN", rl("ppo", "reward_fn=bad/rw.py:score"), ("rw.py:score",), fn("nan")),
        Case(F, "ppo reward_fn: missing file", rl("ppo", "reward_fn=bad/missing.py:score"), ("missing.py",)),
        Case(F, "grpo reward_fn: missing file, in a chain (a tiny sft first)",
             [A, "run", "recipes/grpo.yaml", *SFT_IN_CHAIN, *RL_FAST["grpo"], "report.models={}", "reward_fn=bad/missing.py:score"],
             ("missing.py",)),
        Case(F, "rloo reward_model: a causal LM, in a chain (a tiny sft first)",
             [A, "run", "recipes/rloo.yaml", *SFT_IN_CHAIN, *RL_FAST["rloo"], "report.models={}", f"reward_model={BASE}"],
             ("reward_model",)),
        Case(F, "ppo.forward_batch_size: 0", rl("ppo", "ppo.forward_batch_size=0"), ("forward_batch_size",)),
    ]
    for stage, key, value in [
        ("grpo", "temperature", "0"), ("grpo", "top_p", "0"), ("grpo", "epsilon", "0"), ("grpo", "beta", "-1"), ("grpo", "beta", ".nan"),
        ("grpo", "kl_estimator", "mse"), ("grpo", "loss_aggregation", "mean"), ("grpo", "advantage_estimator", "gae"),
        ("grpo", "kl_in", "both"), ("grpo", "missing_eos_penalty", "-1"), ("grpo", "response_length", "0"),
        ("grpo", "kl_target", "0"), ("grpo", "num_iterations", "0"), ("grpo", "forward_batch_size", "0"),
        ("grpo", "scale_rewards", "maybe"), ("rloo", "beta", ".inf"), ("rloo", "kl_in", "both"), ("rloo", "top_p", "1.5"),
        ("ppo", "kl_coef", "-1"), ("ppo", "vf_coef", ".nan"), ("ppo", "lam", "2"), ("ppo", "ppo_epochs", "0"),
    ]:
        cases.append(Case(F, f"{stage}.{key}: {value}", rl(stage, f"{stage}.{key}={value}"), (key,)))
    return cases


def launch_family() -> list[Case]:
    F = "launch"
    acc = ["accelerate", "launch"]

    def launcher_recipe(body: str) -> dict:
        return {"bad/l.yaml": LAUNCHER + body + '# """\n'}

    return [
        Case(F, "recipe with an unknown key", acc + ["bad/l.yaml"], ("learnin_rate",),
             launcher_recipe("stage: sft\nmodel: models/base\ntraining:\n  learnin_rate: 1.0e-4\n")),
        Case(F, "recipe with a missing model", acc + ["bad/l.yaml"], ("missing",), launcher_recipe("stage: sft\nmodel: models/missing\n")),
        Case(F, "recipe with output_dir a file", acc + ["bad/l.yaml"], ("notes.txt",),
             launcher_recipe("stage: sft\nmodel: models/base\noutput_dir: notes.txt\n")),
        Case(F, "recipe with a missing data file", acc + ["bad/l.yaml"], ("nope.jsonl",),
             launcher_recipe("stage: sft\nmodel: models/base\ndata:\n  source: data/nope.jsonl\n")),
        Case(F, "recipe with a bad YAML value", acc + ["bad/l.yaml"], ("max_steps",),
             launcher_recipe("stage: sft\nmodel: models/base\ntraining:\n  max_steps: ten\n")),
        Case(F, "shipped recipe, bad override", acc + ["recipes/sft.yaml", "training.max_steps=abc"], ("max_steps",)),
        Case(F, "shipped recipe, missing model", acc + ["recipes/sft.yaml", "model=models/missing"], ("missing",)),
        Case(F, "shipped recipe, unknown key", acc + ["recipes/sft.yaml", "nope=1"], ("nope",)),
        Case(F, "dpo, a reward model as ref_model", acc + ["recipes/dpo.yaml", "ref_model=models/rm"], ("rm",)),
        Case(F, "grpo, reward_fn file missing (chain: a tiny sft first)", acc + ["recipes/grpo.yaml", *SFT_IN_CHAIN, "report.models={}",
                                                                                 "reward_fn=bad/missing.py:score"], ("missing.py",)),
        Case(F, "compare recipe, baseline not a label", acc + ["recipes/compare.yaml", "baseline=zz"], ("zz",)),
        Case(F, "-m alignment with a bad recipe", acc + ["-m", "alignment", "bad/l.yaml"], ("learnin_rate",),
             launcher_recipe("stage: sft\nmodel: models/base\ntraining:\n  learnin_rate: 1.0e-4\n")),
    ]


FAMILIES = {
    "recipes": recipes_family,
    "overrides": overrides_family,
    "data files": data_family,
    "models": models_family,
    "output directories": outputs_family,
    "data_prep": data_prep_family,
    "compare": compare_family,
    "rl (grpo/rloo/ppo)": rl_family,
    "launch": launch_family,
}

# ---------------------------------------------------------------------------- the world


HELPER = r"""
import json, shutil, sys
from pathlib import Path
import torch
from alignment.models import load_classifier, load_tokenizer
from transformers import AutoModelForSequenceClassification

ws = Path(sys.argv[1])
base = ws / "models/base"
torch.manual_seed(0)
tok = load_tokenizer(str(base))
rm = load_classifier(str(base), tok)
with torch.no_grad():
    rm.score.weight.mul_(30)
rm.save_pretrained(ws / "models/rm")
tok.save_pretrained(ws / "models/rm")
rm2 = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
rm2.config.pad_token_id = tok.pad_token_id
rm2.save_pretrained(ws / "models/rm2")
tok.save_pretrained(ws / "models/rm2")

import pyarrow as pa, pyarrow.parquet as pq
rows = [json.loads(l) for l in (ws / "data/pairs.jsonl").read_text().splitlines()]
pq.write_table(pa.Table.from_pylist(rows), ws / "data/pairs.parquet")
"""


def sh(argv: list[str], cwd: Path, env: dict, timeout: float = 600) -> None:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"setup failed: {shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def build_world(root: Path, env: dict) -> Path:
    """The template working directory every case starts from."""
    t0 = time.time()
    tpl = root / "template"
    tpl.mkdir()
    shutil.copytree(REPO / "recipes", tpl / "recipes")
    sh([str(BIN / "alignment"), "run", "recipes/init.yaml", *TINY_INIT, "output_dir=models/base"], tpl, env)
    sh([PY, "-m", "data_prep", "demo", "--out", "demo", "--pretrain", "40", "--sft", "40", "--pairs", "40", "--eval", "20"], tpl, env)
    data = tpl / "data"
    data.mkdir()
    shutil.move(tpl / "demo/preferences.jsonl", data / "pairs.jsonl")
    shutil.move(tpl / "demo/sft.jsonl", data / "sft.jsonl")
    shutil.move(tpl / "demo/pretrain.jsonl", data / "text.jsonl")
    shutil.move(tpl / "demo/eval_prompts.jsonl", data / "prompts.jsonl")
    shutil.rmtree(tpl / "demo")
    prompts = [json.loads(line)["prompt"] for line in (data / "prompts.jsonl").read_text().splitlines()]
    (data / "prompts.txt").write_text("\n".join(prompts) + "\n")
    pairs = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    (data / "pairs.json").write_text(json.dumps(pairs))
    with (data / "pairs.jsonl.gz").open("wb") as fh:
        fh.write(gzip.compress((data / "pairs.jsonl").read_bytes()))
    import csv

    with (data / "pairs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(pairs)
    (data / "README.md").write_text("where this data came from\n")
    (tpl / "notes.txt").write_text("the user's notes\n")
    sh([PY, "-c", HELPER, str(tpl)], tpl, env)
    sh([PY, "-m", "data_prep", "pairs", "data/pairs.jsonl", "--quiet", "--out", "prev"], tpl, env)
    sh([str(BIN / "alignment"), "compare", f"a={BASE}", "b=models/base", "--prompts", "data/prompts.jsonl", "--num-prompts", "4",
        "--max-new-tokens", "4", "--no-progress", "--out", "cmp_prev"], tpl, env)
    home = root / "home_template"
    home.mkdir()
    (home / ".bashrc").write_text("# the user's shell settings\n")
    print(f"world built in {time.time() - t0:.0f} s: {sum(f.stat().st_size for f in tpl.rglob('*') if f.is_file()) / 1e6:.1f} MB",
          flush=True)
    return tpl


def make_setup(ws: Path, setup: dict) -> None:
    for rel, content in setup.items():
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif callable(content):
            content(ws, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def snapshot(*roots: Path) -> dict[str, str]:
    found = {}
    for root in roots:
        for directory, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in dirs:
                found[os.path.join(directory, name)] = "dir"
            for name in files:
                path = os.path.join(directory, name)
                try:
                    with open(path, "rb") as fh:
                        found[path] = hashlib.sha1(fh.read()).hexdigest()
                except OSError:
                    found[path] = "unreadable"
    return found


# ---------------------------------------------------------------------------- running a case


def preload() -> dict:
    """Import what the commands import, once, in the parent (fork mode)."""
    import importlib

    for name in ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "pyarrow.parquet", "pyarrow.json",
                 "plotly.graph_objects", "alignment.cli", "alignment.pipeline", "alignment.evaluation", "alignment.report",
                 "alignment.report_html", "alignment.rewards", "alignment.models", "alignment.generation",
                 "transformers.integrations", "transformers.trainer_utils", "data_prep.cli", "data_prep.prepare",
                 "data_prep.onpolicy", "data_prep.read", "data_prep.write", "safetensors.torch"]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module renamed by a concurrent change: the child imports what it needs
            print(f"(preload: {name}: {type(exc).__name__})", file=sys.stderr)
    import alignment.stages as stages_pkg
    import pkgutil

    for info in pkgutil.iter_modules(stages_pkg.__path__):
        try:
            importlib.import_module(f"alignment.stages.{info.name}")
        except Exception:
            pass
    import torch

    torch.set_num_threads(1)
    from alignment.cli import main as alignment_main
    from data_prep.cli import main as data_prep_main

    return {"alignment": alignment_main, "data_prep": data_prep_main}


def run_forked(entries: dict, argv: list[str], cwd: Path, timeout: float, out_dir: Path) -> tuple[int, str, float]:
    stdout, stderr = out_dir / "stdout", out_dir / "stderr"
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: what `alignment ARGS` / `python -m data_prep ARGS` does
        rc = 1
        try:
            os.setpgid(0, 0)
            os.chdir(cwd)
            fd1 = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fd2 = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(fd1, 1), os.dup2(fd2, 2)
            # Python's streams onto those descriptors: under pytest, sys.stdout/stderr are its capture objects
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            entry = entries[argv[0]]
            sys.argv = ["alignment" if argv[0] == "alignment" else str(REPO / "data_prep" / "__main__.py"), *argv[1:]]
            try:
                code = entry(argv[1:])
            except SystemExit as exc:
                code = exc.code
            if code is None:
                rc = 0
            elif isinstance(code, int):
                rc = code
            else:
                print(code, file=sys.stderr)
                rc = 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc & 0xFF)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.time() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            rc = -9
            with open(stderr, "a") as fh:
                fh.write(f"\n[bad_inputs: killed after {timeout:.0f} s]\n")
            break
        time.sleep(0.02)
    return rc, stderr.read_text(errors="replace"), stdout.read_text(errors="replace"), time.time() - t0


def run_exec(argv: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, float]:
    head = {"alignment": [str(BIN / "alignment")], "data_prep": [PY, "-m", "data_prep"], "accelerate": [str(BIN / "accelerate")]}
    t0 = time.time()
    try:
        done = subprocess.run(head[argv[0]] + argv[1:], cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                              timeout=timeout, start_new_session=True)
        return done.returncode, done.stderr, done.stdout, time.time() - t0
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -9, err + f"\n[bad_inputs: killed after {timeout:.0f} s]\n", out, time.time() - t0


def lines_of(err: str) -> list[str]:
    """Non-empty stderr lines, each as a terminal shows it (the text after its last carriage return)."""
    return [s for s in (line.split("\r")[-1].rstrip() for line in err.split("\n")) if s.strip()]


def judge(case: Case, rc: int, err: str, before: dict, after: dict, roots: list[Path]) -> tuple[bool, list[str], str]:
    problems = []
    lines = lines_of(err)
    launch = case.argv[0] == "accelerate"

    def rel(p: str) -> str:
        for root in roots:
            if p.startswith(str(root) + os.sep) or p == str(root):
                return ("~/" if root.name == "home" else "") + os.path.relpath(p, root)
        return p

    new = sorted(rel(p) for p in after.keys() - before.keys())
    removed = sorted(rel(p) for p in before.keys() - after.keys())
    changed = sorted(rel(p) for p in before.keys() & after.keys() if before[p] != after[p])
    protected = set(case.may_succeed)
    if launch:
        ours = [i for i, line in enumerate(lines) if line.startswith("error:")]
        line = lines[ours[0]] if ours else (lines[-1] if lines else "")
        if not ours:
            problems.append("no `error:` line")
        elif any("Traceback (most recent call last)" in x for x in lines[: ours[0]]):
            problems.append("a traceback before our line")
        if rc not in (1, 2):
            problems.append(f"exit status {rc}")
    else:
        line = lines[-1] if lines else ""
        if "Traceback (most recent call last)" in err:
            problems.append("traceback")
        if any(x.startswith("usage:") for x in lines):
            problems.append("usage block")
        if len([x for x in lines if x.startswith("error:")]) > 1:
            problems.append("several error lines")
    succeeded_ok = False
    if case.may_succeed and rc == 0:
        lost = [p for p in protected if p in removed or p in changed]
        leftovers = [p for p in new if ".partial" in p or ".old-" in p]
        if lost:
            problems.append("user file lost or changed: " + ", ".join(lost))
        if leftovers:
            problems.append("left behind: " + ", ".join(leftovers[:3]))
        succeeded_ok = not lost and not leftovers and not problems
        return succeeded_ok, problems, line
    if not launch and rc != 2:
        problems.append(f"exit status {rc}")
    if not line.startswith("error:"):
        problems.append("last line is not `error: ...`")
    elif case.names and not any(n in line for n in case.names):
        problems.append(f"the line does not name {case.names[0]!r}")
    if new:
        problems.append(f"wrote {len(new)} path(s): " + ", ".join(new[:4]) + (" ..." if len(new) > 4 else ""))
    if removed:
        problems.append("removed: " + ", ".join(removed[:4]))
    if changed:
        problems.append("changed: " + ", ".join(changed[:4]))
    return not problems, problems, line


def run_case(case: Case, root: Path, tpl: Path, env: dict, entries: dict | None, mode: str) -> dict:
    ws, home = root / "ws", root / "home"
    for d in (ws, home):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            if d.exists():
                subprocess.run(["chmod", "-R", "u+rwx", str(d)], check=False)
                shutil.rmtree(d)
    shutil.copytree(tpl, ws, symlinks=True)
    shutil.copytree(root / "home_template", home, symlinks=True)
    make_setup(ws, case.setup)
    before = snapshot(ws, home)
    if mode == "fork" and case.argv[0] != "accelerate":
        rc, err, out, secs = run_forked(entries, case.argv, ws, case.timeout, root)
    else:
        rc, err, out, secs = run_exec(case.argv, ws, env, case.timeout)
    after = snapshot(ws, home)
    clean, problems, line = judge(case, rc, err, before, after, [ws, home])
    return {"family": case.family, "name": case.name, "command": case.command(), "mode": mode if case.argv[0] != "accelerate" else "exec",
            "rc": rc, "clean": clean, "problems": problems, "line": line, "tail": lines_of(err)[-4:], "stdout_tail": lines_of(out)[-4:],
            "seconds": round(secs, 2)}


def environment(root: Path) -> dict:
    """The environment every case runs in: HOME and HF_HOME inside `root`, the hub offline."""
    env = dict(os.environ)
    env.update(HOME=str(root / "home"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore::DeprecationWarning")
    (root / "home").mkdir(exist_ok=True)
    return env


def all_cases() -> list[Case]:
    return [c for make in FAMILIES.values() for c in make()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", help="run only this family (repeatable)")
    parser.add_argument("-k", help="run only cases whose name contains this")
    parser.add_argument("--exec", action="store_true", help="run every case as a real command (slow)")
    parser.add_argument("--no-crosscheck", action="store_true", help="skip re-running a sample as real commands")
    parser.add_argument("--crosscheck-every", type=int, default=25, help="re-run every Nth forked case as a real command")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", help="write every verdict to this file")
    args = parser.parse_args()

    cases = [c for fam, make in FAMILIES.items() if not args.family or fam in args.family for c in make()]
    if args.k:
        cases = [c for c in cases if args.k in c.name]
    seen = set()
    for c in cases:
        assert (c.family, c.name) not in seen, f"duplicate case name: {c.family}: {c.name}"
        seen.add((c.family, c.name))

    t_start = time.time()
    root = Path(tempfile.mkdtemp(prefix="bad_inputs."))
    env = environment(root)
    os.environ.clear()
    os.environ.update(env)
    print(f"{len(cases)} cases; temporary directory {root}", flush=True)
    try:
        tpl = build_world(root, env)
        entries = None
        if not args.exec:
            t0 = time.time()
            entries = preload()
            print(f"toolkit imported once in {time.time() - t0:.0f} s; each case runs in a forked child", flush=True)
        results = []
        for i, case in enumerate(cases, 1):
            mode = "exec" if args.exec else "fork"
            r = run_case(case, root, tpl, env, entries, mode)
            results.append(r)
            mark = "clean  " if r["clean"] else "UNCLEAN"
            print(f"[{i:3d}/{len(cases)}] {mark} {r['seconds']:5.1f}s  {case.family}: {case.name}"
                  + ("" if r["clean"] else f"  ({'; '.join(r['problems'])})"), flush=True)
        crosschecks = []
        if not args.exec and not args.no_crosscheck:
            forked = [(c, r) for c, r in zip(cases, results) if r["mode"] == "fork"]
            sample = forked[:: max(1, args.crosscheck_every)]
            sample += [(c, r) for c, r in forked if not r["clean"] and (c, r) not in sample][:6]  # the verdicts that matter most
            print(f"\ncross-check: {len(sample)} forked cases again as real commands", flush=True)
            for case, r in sample:
                e = run_case(case, root, tpl, env, None, "exec")
                same = e["clean"] == r["clean"] and e["rc"] == r["rc"]
                crosschecks.append({"name": case.name, "family": case.family, "fork": r, "exec": e, "same": same})
                print(f"  {'same' if same else 'DIFFERENT'}  {e['seconds']:5.1f}s  {case.family}: {case.name}"
                      + ("" if same else f"  fork: rc {r['rc']} {r['line']!r}  exec: rc {e['rc']} {e['line']!r}"), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print("\n" + "=" * 100)
    print("UNCLEAN CASES\n")
    for r in results:
        if not r["clean"]:
            print(f"- [{r['family']}] {r['name']}\n    $ {r['command']}\n    exit {r['rc']}; {'; '.join(r['problems'])}")
            for line in r["tail"][-3:]:
                print(f"    | {line[:400]}")
            if r["rc"] == 0:  # what it did instead (data_prep's summary is on stdout)
                for line in r["stdout_tail"][-3:]:
                    print(f"    > {line[:400]}")
    print("\nPER FAMILY (clean / total)\n")
    for fam in FAMILIES:
        rs = [r for r in results if r["family"] == fam]
        if rs:
            print(f"  {fam:<22} {sum(r['clean'] for r in rs):4d} / {len(rs):<4d}")
    total_clean = sum(r["clean"] for r in results)
    print(f"  {'overall':<22} {total_clean:4d} / {len(results):<4d}")
    if crosschecks:
        agree = sum(c["same"] for c in crosschecks)
        print(f"\ncross-check, forked vs real command: {agree} / {len(crosschecks)} same verdict and exit status")
    print(f"wall time {time.time() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "crosschecks": crosschecks}, indent=1))
    return 0


# ---------------------------------------------------------------------------- under pytest


@pytest.fixture(scope="module")
def workplace(tmp_path_factory):
    """The template working directory (built once) and the toolkit imported once for the forked cases;
    the process's environment is the cases' while they run, and restored after."""
    root = tmp_path_factory.mktemp("bad_inputs")
    env, saved = environment(root), dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield root, build_world(root, env), env, preload()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.bad_inputs
@pytest.mark.parametrize("case", all_cases(), ids=lambda c: f"{c.family}: {c.name}")
def test_a_bad_input_ends_in_one_line_and_leaves_every_file(workplace, case):
    root, tpl, env, entries = workplace
    r = run_case(case, root, tpl, env, entries, "fork")
    assert r["clean"], f"$ {r['command']}: exit {r['rc']}; {'; '.join(r['problems'])}; stderr ends: {r['tail']}"


if __name__ == "__main__":
    sys.exit(main())
