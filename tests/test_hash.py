"""The content hash covers what changes a stage's result, and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

from alignment import pipeline
from alignment.pipeline import plan, source_fingerprint

from .conftest import RECIPES

PACKAGE = Path(pipeline.__file__).parent


def sft_hash(model: Path, *overrides: str, **kwargs) -> str:
    [node] = plan(RECIPES / "sft.yaml", [f"model={model}", *overrides], **kwargs)
    return node.hash


def test_toolkit_source_enters_the_hash(tmp_path, tiny_base, monkeypatch):
    copy = tmp_path / "alignment"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_fingerprint([copy])
    assert source_fingerprint([copy]) == before  # stable
    (copy / "stages" / "sft.py").write_text((copy / "stages" / "sft.py").read_text() + "\n# a change\n")
    assert source_fingerprint([copy]) != before
    (copy / "notes.txt").write_text("not code")  # only Python source counts
    changed = source_fingerprint([copy])
    assert source_fingerprint([copy]) == changed

    # The package's real source is what plan() hashes, once per process.
    assert pipeline.toolkit_fingerprint() == pipeline.toolkit_fingerprint()
    assert pipeline.toolkit_fingerprint.cache_info().currsize == 1
    base = sft_hash(tiny_base)
    monkeypatch.setattr(pipeline, "toolkit_fingerprint", lambda: "edited-source")
    assert sft_hash(tiny_base) != base


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
    [one] = plan(RECIPES / "init.yaml", num_processes=1)
    [two] = plan(RECIPES / "init.yaml", num_processes=2)
    assert one.hash == two.hash


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
