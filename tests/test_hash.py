"""The content hash covers what changes a stage's result, and nothing else."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import data_prep
from alignment import pipeline
from alignment.config import ModelOptions
from alignment.models import load_causal_lm, load_tokenizer
from alignment.pipeline import is_current, plan, run
from alignment.stages import common
from alignment.stages.common import device_kind, distributed_type

from .conftest import MICRO, RECIPES

PACKAGE = Path(pipeline.__file__).parent
INIT_MICRO = [o.split(":", 1)[1] for o in MICRO if o.startswith("init:")]


def stage_hash(stage: str, *overrides: str, **kwargs) -> str:
    [*_, node] = plan(RECIPES / f"{stage}.yaml", list(overrides), **kwargs)
    return node.hash


def sft_hash(model, *overrides: str, **kwargs) -> str:
    return stage_hash("sft", f"model={model}", *overrides, **kwargs)


@pytest.fixture
def fresh_toolkit_fingerprint():
    """toolkit_fingerprint() is computed once per process: recompute it in this test, and after."""
    pipeline.toolkit_fingerprint.cache_clear()
    yield
    pipeline.toolkit_fingerprint.cache_clear()


def edit_keeping_size_and_mtime(path: Path, old: bytes, new: bytes) -> None:
    """Replace `old` by `new` (same length) in `path`, then restore its modification time, as
    `cp -p` or `rsync -t` of an edited file would leave it."""
    assert len(old) == len(new)
    stat = path.stat()
    data = path.read_bytes()
    assert data.count(old) >= 1
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


# ---------------------------------------------------------------- the toolkit's own source and libraries


def test_the_hash_reads_the_real_packages():
    assert pipeline.toolkit_roots() == [PACKAGE, Path(data_prep.__file__).parent]


@pytest.mark.parametrize("package, file", [("alignment", "stages/sft.py"), ("data_prep", "shapes.py")])
def test_an_edit_of_toolkit_source_reaches_the_hash(tmp_path, tiny_base, monkeypatch, fresh_toolkit_fingerprint,
                                                             package, file):
    """plan() hashes a copy of the packages; editing a real file of the copy changes the hash, a
    file that is not Python source does not."""
    copies = []
    for root in pipeline.toolkit_roots():
        copies.append(tmp_path / root.name)
        shutil.copytree(root, copies[-1], ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "toolkit_roots", lambda: copies)
    before = sft_hash(tiny_base)

    (tmp_path / package / "notes.txt").write_text("not code")
    pipeline.toolkit_fingerprint.cache_clear()
    assert sft_hash(tiny_base) == before

    edited = tmp_path / package / file
    edited.write_text(edited.read_text().replace("\n", "\n# an edit\n", 1))
    pipeline.toolkit_fingerprint.cache_clear()
    assert sft_hash(tiny_base) != before


@pytest.mark.parametrize("library", pipeline.RESULT_LIBRARIES)
def test_a_library_version_reaches_the_hash(tiny_base, monkeypatch, fresh_toolkit_fingerprint, library):
    before = sft_hash(tiny_base)
    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == library else installed(name))
    pipeline.toolkit_fingerprint.cache_clear()
    assert sft_hash(tiny_base) != before


# ---------------------------------------------------------------- local inputs, by content


def test_a_model_directory_edited_keeping_size_and_mtime_reruns(tmp_path, tiny_base):
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    before = sft_hash(model)

    os.utime(model / "config.json")  # touched, not changed: the same result
    assert sft_hash(model) == before

    edit_keeping_size_and_mtime(model / "config.json", b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 2e-06')
    after_config = sft_hash(model)
    assert after_config != before

    weights = model / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2  # same shape, same file size
    stat = weights.stat()
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert sft_hash(model) != after_config


def test_files_over_the_limit_count_by_name_size_and_mtime(tmp_path, tiny_base, monkeypatch):
    """What the docs say is not seen: an edit that keeps size and mtime of a file over
    CONTENT_HASH_MAX_BYTES. Its size or mtime changing is seen."""
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    monkeypatch.setattr(pipeline, "CONTENT_HASH_MAX_BYTES", (model / "config.json").stat().st_size - 1)
    before = sft_hash(model)
    edit_keeping_size_and_mtime(model / "config.json", b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 2e-06')
    assert sft_hash(model) == before
    os.utime(model / "config.json")
    assert sft_hash(model) != before


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert Path("~").expanduser() == home
    return home


def test_a_data_file_under_home_counts_by_content(home, tiny_base):
    data = home / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    first = sft_hash(tiny_base, "data.source=~/chats.jsonl")
    data.write_text(data.read_text() * 2)
    assert sft_hash(tiny_base, "data.source=~/chats.jsonl") != first


def test_a_prep_source_under_home_counts_by_content(home):
    data = home / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    first = stage_hash("prep", "prep.sources=[{path: ~/prefs.jsonl}]")
    data.write_text(json.dumps({"prompt": "hi", "chosen": "hello there", "rejected": "go away"}) + "\n")
    assert stage_hash("prep", "prep.sources=[{path: ~/prefs.jsonl}]") != first


def test_a_chat_template_and_a_model_under_home_count_by_content(home, tiny_base):
    template = home / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    shutil.copytree(tiny_base, home / "model")
    first = sft_hash("~/model", "model_options.chat_template=~/chat.jinja")
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    second = sft_hash("~/model", "model_options.chat_template=~/chat.jinja")
    assert second != first
    edit_keeping_size_and_mtime(home / "model" / "config.json", b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 2e-06')
    assert sft_hash("~/model", "model_options.chat_template=~/chat.jinja") != second


# ---------------------------------------------------------------- hub ids and their revision


HUB_ID = "hub-user/tiny"


@pytest.fixture
def hub(tmp_path, tiny_base, monkeypatch) -> dict[str, str]:
    """A local hub cache holding HUB_ID at two commits (the second with other weights);
    `main` points at the first. Returns commit by name."""
    repo = tmp_path / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    commits = {"first": "1" * 40, "second": "2" * 40}
    for name, commit in commits.items():
        shutil.copytree(tiny_base, repo / "snapshots" / commit)
    weights = repo / "snapshots" / commits["second"] / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 1 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits["first"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return commits


def test_a_hub_id_is_loaded_at_its_revision(hub, tiny_base):
    def norm(revision):
        options = ModelOptions(revision=revision)
        model = load_causal_lm(HUB_ID, load_tokenizer(HUB_ID, options), options)
        return model.model.norm.weight

    base = load_file(tiny_base / "model.safetensors")["model.norm.weight"]
    assert torch.equal(norm(None), base) and torch.equal(norm(hub["first"]), base)
    assert torch.equal(norm(hub["second"]), base + 1)


def test_a_revision_enters_the_hash_of_a_hub_id_only(tiny_base):
    first, second = (sft_hash(HUB_ID, f"model_options.revision='{c * 40}'") for c in "12")
    assert len({first, second, sft_hash(HUB_ID)}) == 3
    # A local directory ignores the revision: the same run.
    assert sft_hash(tiny_base, "model_options.revision=v2") == sft_hash(tiny_base)


# ---------------------------------------------------------------- how and where it runs


def test_chat_template_file_counts_by_contents(tmp_path, tiny_base):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    first = sft_hash(tiny_base, f"model_options.chat_template={template}")
    assert sft_hash(tiny_base, f"model_options.chat_template={template}") == first
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    assert sft_hash(tiny_base, f"model_options.chat_template={template}") != first


def test_number_of_processes_enters_the_hash_of_training_stages(tiny_base):
    assert sft_hash(tiny_base, num_processes=2) != sft_hash(tiny_base, num_processes=1)
    # init builds the same model whatever the process count (it runs on the main process only).
    assert stage_hash("init", num_processes=1) == stage_hash("init", num_processes=2)


def test_the_distributed_type_enters_the_hash_of_training_stages(tiny_base, monkeypatch):
    ddp, init = sft_hash(tiny_base, num_processes=2), stage_hash("init", num_processes=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    # accelerate applies FSDP on GPUs only: on this CPU the processes train as DDP, the same run.
    assert sft_hash(tiny_base, num_processes=2) == ddp
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sft_hash(tiny_base, num_processes=2) != ddp
    assert stage_hash("init", num_processes=2) == init  # init runs on the main process only


def test_the_distributed_type_is_what_accelerate_launch_set_up(monkeypatch):
    assert (distributed_type(1), distributed_type(2)) == ("single", "ddp")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed_type(2) == "ddp"  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (distributed_type(1), distributed_type(2)) == ("fsdp", "fsdp")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed_type(1) == "deepspeed"


def test_the_device_enters_the_hash_of_stages_that_compute_on_it(tiny_base, monkeypatch):
    assert device_kind() == f"cpu/{torch.backends.cpu.get_cpu_capability()}"
    overrides = {"sft": [f"model={tiny_base}"], "dpo": [f"model={tiny_base}"], "init": [], "prep": []}
    before = {stage: stage_hash(stage, *extra) for stage, extra in overrides.items()}
    monkeypatch.setattr(common, "device_kind", lambda: "cuda/NVIDIA H200")
    after = {stage: stage_hash(stage, *extra) for stage, extra in overrides.items()}
    assert after["sft"] != before["sft"] and after["dpo"] != before["dpo"]
    # init draws its weights on the CPU and prep runs no model: the device does not change them.
    assert after["init"] == before["init"] and after["prep"] == before["prep"]


def test_resolved_mixed_precision_enters_the_hash(tiny_base, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    auto = sft_hash(tiny_base, "training.mixed_precision=auto")
    # On this CPU machine auto resolves to full precision: the same run as 'no'.
    assert auto == sft_hash(tiny_base, "training.mixed_precision='no'")
    assert sft_hash(tiny_base, "training.mixed_precision=bf16") != auto
    # `accelerate launch --mixed_precision bf16` turns a full-precision recipe into a bf16 run.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert sft_hash(tiny_base, "training.mixed_precision=auto") != auto


def test_logging_and_output_keys_do_not_enter_the_hash(tmp_path, tiny_base):
    base = sft_hash(tiny_base)
    for override in ("training.logging_steps=3", "training.report_to=[tensorboard]", "training.save_steps=5",
                     f"output_dir={tmp_path / 'elsewhere'}", "report.num_prompts=7"):
        assert sft_hash(tiny_base, override) == base, override
    assert sft_hash(tiny_base, "training.learning_rate=1e-4") != base  # a key that changes results does


# ---------------------------------------------------------------- what counts as built


def test_a_finished_output_missing_a_file_is_built_again(in_tmp, capsys):
    recipe, overrides = RECIPES / "init.yaml", [*INIT_MICRO, "output_dir=runs/init"]
    [node] = run(recipe, overrides)
    weights = node.out_dir / "model.safetensors"
    built = weights.read_bytes()
    assert is_current(node)
    (node.out_dir / "notes.txt").write_text("a file of the user's does not matter")
    assert is_current(node)
    (node.out_dir / "notes.txt").unlink()

    weights.unlink()
    assert not is_current(node)
    capsys.readouterr()
    run(recipe, overrides)
    assert "[init] running stage 'init'" in capsys.readouterr().out
    assert weights.read_bytes() == built and is_current(node)

    weights.write_bytes(built[: len(built) // 2])  # cut short: not the file it wrote
    assert not is_current(node)
