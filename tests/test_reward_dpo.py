"""Preference data checking, and the reward and dpo stages on micro settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment.config import RecipeError, load_recipe
from alignment.pipeline import run

from .conftest import RECIPES

GOOD = {"prompt": "repeat: cat dog", "chosen": "Sure! cat dog", "rejected": "Ugh. dog cat"}
BAD = [
    ({"prompt": "first: a b", "chosen": "Sure! a"}, "missing 'rejected'"),
    ({"prompt": ["first: a b"], "chosen": "Sure! a", "rejected": "Ugh. b"},
     "'prompt' has a message without a role in ('system', 'user', 'assistant')"),
    ({"prompt": "first: a b", "chosen": "Sure! a", "rejected": "Sure! a"}, "'chosen' identical to 'rejected'"),
    ({"prompt": "first: a b", "chosen": "  ", "rejected": "Ugh. b"}, "empty 'chosen'"),
]


def summary_of(node) -> dict:
    return json.loads((node.out_dir / "run_info.json").read_text())["summary"]


def logged(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "summary" not in r]


@pytest.fixture
def pairs_file(in_tmp) -> Path:
    """24 good rows (each its own prompt) with the four bad ones at lines 3, 5, 7 and 9."""
    lines = []
    bad = iter(BAD)
    for i in range(28):
        lines.append(next(bad)[0] if i in (2, 4, 6, 8) else {**GOOD, "prompt": f"{GOOD['prompt']} {i}"})
    path = in_tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_bad_preference_rows_error_with_file_and_line(pairs_file, tiny_base):
    base = [f"model={tiny_base}", f"data.source={pairs_file}", "training.max_steps=1", "output_dir=out/r"]
    with pytest.raises(RecipeError, match=r"pairs\.jsonl:3: missing 'rejected' \(set data.on_bad_row: drop"):
        run(RECIPES / "reward.yaml", base)
    assert not (pairs_file.parent / "out" / "r").exists()


def test_bad_preference_rows_dropped_and_counted_by_reason(pairs_file, tiny_base):
    overrides = [f"model={tiny_base}", f"data.source={pairs_file}", "data.on_bad_row=drop", "data.eval_examples=4",
                 "training.max_steps=1", "training.per_device_train_batch_size=4", "output_dir=out/dpo"]
    [node] = run(RECIPES / "dpo.yaml", overrides)
    summary = summary_of(node)
    assert summary["train_pairs"] == 20 and summary["eval_pairs"] == 4
    for _, reason in BAD:
        assert summary[f"dropped/{reason}"] == 1, reason


def test_margin_column_is_checked(in_tmp, tiny_base):
    path = in_tmp / "margins.jsonl"
    path.write_text(json.dumps({**GOOD, "margin": 1.0}) + "\n" + json.dumps({**GOOD, "margin": "big"}) + "\n")
    with pytest.raises(RecipeError, match=r"margins\.jsonl:2: 'margin' is not a finite number"):
        run(RECIPES / "reward.yaml", [f"model={tiny_base}", f"data.source={path}", "output_dir=out/r"])


def test_held_out_split_must_leave_rows_to_train_on(in_tmp, tiny_base):
    with pytest.raises(RecipeError, match="data.eval_examples: 40 held-out rows leave none"):
        run(RECIPES / "dpo.yaml", [f"model={tiny_base}", "data.num_examples=40", "data.eval_examples=40", "output_dir=out/d"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("dpo.loss_type=simpo ref_model=x", "ref_model is set but loss_type 'simpo' is reference-free"),
        ("dpo.loss_type=ipo dpo.label_smoothing=0.1", "label_smoothing applies to loss_type sigmoid or simpo"),
        ("dpo.reference=frozen", "dpo.reference: expected 'copy' or 'precompute'"),
    ],
)
def test_dpo_section_cross_checks(override, message):
    overrides = [(key.split("."), value, f"{key}={value}") for key, value in (o.split("=") for o in override.split())]
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "dpo.yaml", overrides)


def test_reward_stage_learns_and_loads_as_a_classifier(in_tmp, tiny_base):
    overrides = [f"model={tiny_base}", "data.num_examples=400", "data.eval_examples=64", "training.max_steps=20",
                 "training.learning_rate=3e-3", "training.logging_steps=1", "output_dir=out/reward"]
    [node] = run(RECIPES / "reward.yaml", overrides)
    history = [r["loss"] for r in logged(node.out_dir)]
    assert len(history) >= 15 and min(history[-3:]) < history[0], history
    summary = summary_of(node)
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and "eval_margin" in summary and summary["eval_pairs"] == 64

    tok = AutoTokenizer.from_pretrained(node.out_dir)
    model = AutoModelForSequenceClassification.from_pretrained(node.out_dir).eval()
    assert model.config.num_labels == 1
    batch = tok(["<|user|>\nrepeat: cat dog\n<|assistant|>\nSure! cat dog</s>"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, 1)


@pytest.mark.parametrize(
    "mode, extra, reference",
    [
        ("copy", [], "copy: "),
        ("precompute", ["dpo.reference=precompute"], "precompute: starting model"),
        ("lora", ["lora={r: 4, alpha: 8}"], "copy: adapters disabled"),
    ],
)
def test_dpo_reference_modes_start_at_ln2_log_rewards_and_save(in_tmp, tiny_base, mode, extra, reference):
    overrides = [f"model={tiny_base}", "data.num_examples=112", "data.eval_examples=16", "training.max_steps=3",
                 "training.per_device_train_batch_size=16", "training.logging_steps=1", f"output_dir=out/{mode}",
                 "dpo.loss_type=sigmoid", "dpo.beta=0.1", *extra]
    [node] = run(RECIPES / "dpo.yaml", overrides)
    records = logged(node.out_dir)
    # Step 0: policy == reference, so every log-ratio is 0 and -log sigma(0) = ln 2.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(key in r for r in records), key
    summary = summary_of(node)
    assert summary["reference"].startswith(reference) and summary["steps"] == 3
    assert "eval_rewards/accuracies" in summary and "rewards/margins" in summary

    model = AutoModelForCausalLM.from_pretrained(node.out_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("loss_type, at_start", [("ipo", 1 / (4 * 0.1**2)), ("hinge", 1.0)])
def test_other_dpo_losses_at_step_0(in_tmp, tiny_base, loss_type, at_start):
    """h = 0 at the start: IPO gives (0 - 1/(2 beta))^2 = 25 at beta 0.1; hinge gives relu(1 - 0) = 1."""
    overrides = [f"model={tiny_base}", "data.num_examples=48", "data.eval_examples=16", "training.max_steps=1",
                 "training.per_device_train_batch_size=16", f"dpo.loss_type={loss_type}", "dpo.beta=0.1",
                 "dpo.reference=precompute", f"output_dir=out/{loss_type}"]
    [node] = run(RECIPES / "dpo.yaml", overrides)
    assert logged(node.out_dir)[0]["loss"] == pytest.approx(at_start, rel=1e-5)


def test_simpo_runs_without_a_reference(in_tmp, tiny_base):
    overrides = [f"model={tiny_base}", "data.num_examples=80", "data.eval_examples=16", "training.max_steps=2",
                 "training.per_device_train_batch_size=16", "dpo.loss_type=simpo", "dpo.beta=2.0",
                 "output_dir=out/simpo"]
    [node] = run(RECIPES / "dpo.yaml", overrides)
    assert summary_of(node)["reference"] == "none (simpo)"
    assert AutoModelForCausalLM.from_pretrained(node.out_dir) is not None
