"""KTO: the balance warning, binary data (data_prep's `binary` kind and its accounting), and the kto
stage end to end on micro settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.config import PrepOptions, PrepSource
from alignment.recipe_file import load_recipe
from alignment.errors import RecipeError
from alignment.pipeline import run
from alignment.stages.kto import balance_warning, balanced_desirable_weight, weighted_ratio
from data_prep.cli import main as data_prep
from data_prep.prepare import prepare
from data_prep.shapes import binary_label

from .conftest import RECIPES

THUMBS = [
    {"prompt": "repeat: cat dog", "completion": "Sure! cat dog", "label": "up"},
    {"prompt": "repeat: sun moon", "completion": "Ugh. moon", "label": "thumbs_down"},
    {"prompt": "first: a b c", "completion": "Ugh. b", "label": False},
    {"prompt": "last: d e f", "completion": "Sure! d e f and so on", "label": "reject"},
    {"prompt": "first: g h i", "completion": "Sure! g", "label": 1},
    {"prompt": "reverse: j k", "completion": "Sure! j k", "label": "down"},
    {"prompt": "repeat: l m", "completion": "Ugh l", "label": 0},
    {"prompt": "last: n o p", "completion": "Sure! o", "label": "bad"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def summary_of(node) -> dict:
    return json.loads((node.out_dir / "run_info.json").read_text())["summary"]


# --------------------------------------------------------------------------- the balance warning


def test_weighted_ratio_by_hand():
    assert weighted_ratio(10, 30, 1.0, 1.0) == pytest.approx(1 / 3)
    assert weighted_ratio(10, 30, 3.5, 1.0) == pytest.approx(35 / 30)
    assert weighted_ratio(10, 30, 1.0, 0.5) == pytest.approx(10 / 15)
    assert weighted_ratio(5, 0, 1.0, 1.0) == float("inf")


@pytest.mark.parametrize("n_d, n_u, w_d, w_u", [(30, 25, 1.0, 1.0), (3, 3, 1.0, 1.0), (4, 3, 1.0, 1.0), (10, 30, 3.5, 1.0),
                                                (10, 30, 1.0, 0.3)])
def test_no_warning_inside_the_recommended_range(n_d, n_u, w_d, w_u):
    """1.2, 1 and 4/3 exactly (both ends belong to the range), 35/30, 10/9."""
    assert balance_warning(n_d, n_u, w_d, w_u) is None


def test_warning_names_the_counts_weights_ratio_and_the_weight_to_set():
    # 10 desirable, 30 undesirable, unweighted: ratio 1/3; desirable_weight in [30/10, 4/3 * 30/10] = [3, 4] fixes it
    line = balance_warning(10, 30, 1.0, 1.0)
    assert "\n" not in line
    assert "10 desirable x desirable_weight 1" in line and "30 undesirable x undesirable_weight 1" in line
    assert "= 0.333" in line and "[1, 4/3]" in line and "kto.desirable_weight in [3, 4]" in line
    # too many desirable once weighted: 2 * 20 / (1 * 20) = 2 -> desirable_weight in [1, 1.33]
    line = balance_warning(20, 20, 2.0, 1.0)
    assert "= 2," in line and "kto.desirable_weight in [1, 1.33]" in line
    # the undesirable weight enters the advice: 0.5 * 30 / 10 = 1.5 -> [1.5, 2]
    assert "kto.desirable_weight in [1.5, 2]" in balance_warning(10, 30, 1.0, 0.5)


def test_auto_desirable_weight_is_the_middle_of_the_range_by_hand():
    # (1 + 4/3) / 2 = 7/6; 10 desirable, 30 undesirable at weight 1: 7/6 * 30 / 10 = 3.5
    assert balanced_desirable_weight(10, 30, 1.0) == pytest.approx(3.5)
    assert balanced_desirable_weight(30, 10, 0.5) == pytest.approx(7 / 6 * 0.5 * 10 / 30)
    assert weighted_ratio(10, 30, balanced_desirable_weight(10, 30, 1.0), 1.0) == pytest.approx(7 / 6)
    with pytest.raises(RecipeError, match="kto.desirable_weight: auto: the training rows are 0 desirable and 12"):
        balanced_desirable_weight(0, 12, 1.0)


def test_warning_when_one_kind_is_missing():
    assert "only one kind of row" in balance_warning(0, 12, 1.0, 1.0)
    assert "only one kind of row" in balance_warning(12, 0, 1.0, 1.0)


# --------------------------------------------------------------------------- labels and binary rows


@pytest.mark.parametrize("value, threshold, expected", [
    (True, None, (True, None)), (False, None, (False, None)),
    ("up", None, (True, None)), ("Thumbs_Down", None, (False, None)), (" accept ", None, (True, None)),
    ("rejected", None, (False, None)), (1, None, (True, None)), (0, None, (False, None)), (-1, None, (False, None)),
    ("1", None, (True, None)),
    (4, 4.0, (True, 4.0)), (3.5, 4.0, (False, 3.5)), ("5", 4.0, (True, 5.0)), ("1", 3.0, (False, 1.0)),
    (True, 3.0, (True, None)),
])
def test_binary_label(value, threshold, expected):
    assert binary_label(value, threshold) == expected


@pytest.mark.parametrize("value, reason", [
    ("maybe", "'label' is not a judgement"), (None, "missing 'label'"), ([1], "'label' is not a judgement"),
    (4, "'label' is a rating other than 1/0: set a threshold"), (float("nan"), "'label' is not a judgement"),
])
def test_binary_label_refusals(value, reason):
    assert binary_label(value, None).startswith(reason)


def binary_options(path: Path, **extra) -> PrepOptions:
    return PrepOptions(kind="binary", sources=[PrepSource(path=str(path))], test_fraction=0, **extra)


def test_pairs_become_one_desirable_and_one_undesirable_row_each_counted(tmp_path):
    pairs = [
        {"prompt": "repeat: cat dog", "chosen": "Sure! cat dog", "rejected": "Ugh. dog"},
        {"prompt": "repeat: sun moon", "chosen": "Sure! sun moon", "rejected": "sure!  sun moon"},
        {"prompt": "first: a b c", "chosen": "Sure! a", "rejected": "Sure! a"},   # identical: dropped whole
        {"prompt": "last: d e f", "chosen": "Sure! f", "rejected": ""},            # empty side: dropped whole
        {"prompt": "repeat: cat dog", "chosen": "Sure! cat dog", "rejected": "Ugh. dog"},  # duplicate of row 1
    ]
    prepared = prepare(binary_options(write_jsonl(tmp_path / "pairs.jsonl", pairs)), progress=False)
    s = prepared.summary
    # 5 rows read; rows 3 and 4 are dropped whole; rows 1, 2 and 5 make two rows each (+3 extra), and
    # row 5's two are duplicates of row 1's: kept 4 + dropped 4 = read 5 + extra 3
    assert s["rows_read"] == 5 and s["extra"] == {"pairs split into a desirable and an undesirable row": 3}
    assert s["dropped"] == {"'chosen' identical to 'rejected'": 1, "empty 'rejected'": 1, "exact duplicate": 2}
    assert s["kept"] == 4
    rows = prepared.splits["train"]
    assert [r["label"] for r in rows] == [True, False, True, False]
    assert [r["completion"][0]["content"] for r in rows] == ["Sure! cat dog", "Ugh. dog", "Sure! sun moon", "sure!  sun moon"]
    assert s["labels"] == {"train": {"desirable": 2, "undesirable": 2}}


def test_ratings_by_threshold_and_keep_desirable_are_counted(tmp_path):
    rated = [
        {"prompt": "repeat: cat dog", "completions": ["Sure! cat dog", "Ugh. dog", "Sure! cat"], "ratings": [9, 2, 6]},
        {"prompt": "first: a b c", "completions": ["Sure! a", "b"], "ratings": [7, "x"]},  # a rating not a number
    ]
    path = write_jsonl(tmp_path / "rated.jsonl", rated)
    s = prepare(binary_options(path, threshold=6.0), progress=False).summary
    assert s["extra"] == {"more rows from one rated list": 2} and s["dropped"] == {"a rating is not a number": 1}
    assert s["labels"]["train"] == {"desirable": 2, "undesirable": 1}  # 9 and 6 reach the threshold, 2 does not
    with pytest.raises(Exception, match="threshold"):
        prepare(binary_options(path), progress=False)

    many = [{"prompt": f"repeat: w{i} v{i}", "completion": f"Sure! w{i} v{i}", "label": True} for i in range(200)]
    many += [{"prompt": f"repeat: u{i} t{i}", "completion": f"Ugh. t{i}", "label": False} for i in range(50)]
    s = prepare(binary_options(write_jsonl(tmp_path / "many.jsonl", many), keep_desirable=0.25), progress=False).summary
    kept_up, dropped_up = s["labels"]["train"]["desirable"], s["dropped"]["desirable not kept (keep_desirable 0.25)"]
    assert kept_up + dropped_up == 200 and 30 <= kept_up <= 70  # a hash-chosen quarter
    assert s["labels"]["train"]["undesirable"] == 50 and s["kept"] == kept_up + 50


def test_binary_command_writes_trl_unpaired_format(tmp_path):
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    src = write_jsonl(tmp_path / "thumbs.jsonl", [*THUMBS, {"prompt": "x", "completion": "y", "label": "maybe"}])
    out = tmp_path / "out"
    assert data_prep(["binary", str(src), "--out", str(out), "--test-fraction", "0", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "binary" and summary["rows_read"] == 9 and summary["kept"] == 8
    assert summary["dropped"] == {"'label' is not a judgement (true/false, up/down, accept/reject, ...)": 1}
    for ext in ("json", "parquet"):
        ds = load_dataset(ext, data_files=str(out / f"train.{ext.replace('json', 'jsonl')}"), split="train")
        assert {"prompt", "completion", "label"} <= set(ds.column_names)
        assert ds["label"] == [True, False, False, False, True, False, False, False]
        assert is_conversational(ds[0]) and ds[0]["completion"] == [{"role": "assistant", "content": "Sure! cat dog"}]
        assert ds[0]["prompt"] == [{"role": "user", "content": "repeat: cat dog"}]


# --------------------------------------------------------------------------- the stage


def test_batch_of_one_is_refused_for_the_kto_loss():
    overrides = [(["training", "per_device_train_batch_size"], 1, "training.per_device_train_batch_size=1")]
    with pytest.raises(RecipeError, match="per_device_train_batch_size"):
        load_recipe(RECIPES / "kto.yaml", overrides)


def test_kto_stage_end_to_end_warns_trains_and_reloads(in_tmp, tiny_base, capsys):
    """8 thumbs rows (2 up, 6 down) in one batch of 8: at step 1 the policy is the reference, every
    log-ratio and the KL estimate are 0, each loss is 1 - sigmoid(0) = 0.5, and the weighted mean is
    0.5 * (w_D * 2 + w_U * 6) / 8."""
    src = write_jsonl(in_tmp / "thumbs.jsonl", THUMBS)
    assert data_prep(["binary", str(src), "--out", "fb", "--test-fraction", "0", "--quiet"]) == 0
    w_d = 2.0
    [node] = run(RECIPES / "kto.yaml", [
        f"model={tiny_base}", "data.source=fb", "data.eval_examples=0", "training.max_steps=3", "training.per_device_train_batch_size=8",
        "training.learning_rate=1e-2", "training.logging_steps=1", f"kto.desirable_weight={w_d}", "output_dir=out/kto"])
    out = capsys.readouterr().out
    # 2 x 2 : 6 x 1 = 0.667, outside [1, 4/3]; desirable_weight in [3, 4] would fix it
    assert "kto: 2 desirable x desirable_weight 2 : 6 undesirable x undesirable_weight 1 = 0.667" in out
    assert "kto.desirable_weight in [3, 4]" in out

    records = [json.loads(line) for line in (node.out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "summary" not in r]
    assert len(steps) == 3
    assert steps[0]["loss"] == pytest.approx(0.5 * (w_d * 2 + 1.0 * 6) / 8, abs=1e-5)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0  # the policy moved towards the desirable replies
    summary = summary_of(node)
    assert summary["train_rows"] == 8 and summary["desirable_rows"] == 2 and summary["undesirable_rows"] == 6
    assert summary["weighted_ratio"] == pytest.approx(4 / 6) and summary["steps"] == 3
    assert summary["reference"].startswith("copy: ")

    # The output is a Hugging Face model directory transformers loads alone.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(node.out_dir)
    model = AutoModelForCausalLM.from_pretrained(node.out_dir).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "repeat: cat dog"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    assert (node.out_dir / "recipe.resolved.yaml").is_file() and (node.out_dir / "README.md").is_file()


def test_kto_stage_with_auto_weight_trains_at_the_balanced_weight(in_tmp, tiny_base, capsys):
    """2 up, 6 down: 'auto' gives desirable_weight 7/6 * 6 / 2 = 3.5 (ratio 7/6, no warning), and step 1's
    loss is 0.5 * (3.5 * 2 + 1 * 6) / 8, as in the end-to-end test above."""
    src = write_jsonl(in_tmp / "thumbs.jsonl", THUMBS)
    assert data_prep(["binary", str(src), "--out", "fb", "--test-fraction", "0", "--quiet"]) == 0
    [node] = run(RECIPES / "kto.yaml", [
        f"model={tiny_base}", "data.source=fb", "data.eval_examples=0", "training.max_steps=1", "training.per_device_train_batch_size=8",
        "training.logging_steps=1", "kto.desirable_weight=auto", "output_dir=out/kto"])
    assert "recommends" not in capsys.readouterr().out
    summary = summary_of(node)
    assert summary["desirable_weight"] == pytest.approx(3.5) and summary["weighted_ratio"] == pytest.approx(7 / 6)
    [first] = [json.loads(line) for line in (node.out_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][:1]
    assert first["loss"] == pytest.approx(0.5 * (3.5 * 2 + 6) / 8, abs=1e-5)


def test_kto_stage_reads_pairs_as_two_rows_each_without_a_warning(in_tmp, tiny_base, capsys):
    pairs = [{"prompt": f"repeat: w{i} v{i}", "chosen": f"Sure! w{i} v{i}", "rejected": f"Ugh. v{i}"} for i in range(6)]
    src = write_jsonl(in_tmp / "pairs.jsonl", pairs)
    [node] = run(RECIPES / "kto.yaml", [f"model={tiny_base}", f"data.source={src}", "data.eval_examples=4",
                                        "kto.desirable_weight=1", "training.max_steps=1",
                                        "training.per_device_train_batch_size=4", "output_dir=out/kto"])
    summary = summary_of(node)
    # 6 pairs -> 12 rows; whole prompts held out (data.eval_examples counts rows): 2 prompts (4 rows) held
    # out, 4 pairs -> 8 training rows, half desirable
    assert summary["train_rows"] == 8 and summary["eval_rows"] == 4
    assert summary["desirable_rows"] == 4 and summary["undesirable_rows"] == 4
    assert "recommends" not in capsys.readouterr().out  # 4 : 4 unweighted is inside [1, 4/3]


def test_kto_bad_feedback_rows_error_with_file_and_line(in_tmp, tiny_base):
    rows = [*THUMBS[:3], {"prompt": "repeat: a b", "completion": "Sure! a b", "label": "meh"}]
    src = write_jsonl(in_tmp / "fb.jsonl", rows)
    with pytest.raises(RecipeError, match=r"fb\.jsonl:4: 'label' is not a judgement"):
        run(RECIPES / "kto.yaml", [f"model={tiny_base}", f"data.source={src}", "output_dir=out/kto"])
    assert not (in_tmp / "out" / "kto").exists()


def test_prep_samples_on_policy_feedback_labelled_by_threshold(in_tmp, tiny_base):
    """A prep source with samples: 5 demo prompts, 2 replies each from the model, graded by the gold
    oracle; kind binary makes one row per reply, labelled by the threshold, and accounts for all."""
    recipe = in_tmp / "feedback.yaml"
    recipe.write_text(
        f"stage: prep\nmodel: {tiny_base}\nprep:\n  kind: binary\n  threshold: 0.25\n  test_fraction: 0\n  dedup: none\n"
        "  sources:\n    - path: demo\n      num_examples: 5\n      samples: {k: 2, max_new_tokens: 4}\n")
    [node] = run(recipe, ["output_dir=out/fb"])
    summary = json.loads((node.out_dir / "summary.json").read_text())
    assert summary["rows_read"] == 5 and summary["extra"] == {"more rows from one rated list": 5}
    assert summary["kept"] + sum(summary["dropped"].values()) == 10
    rows = [json.loads(line) for line in (node.out_dir / "train.jsonl").read_text().splitlines()]
    assert len(rows) == summary["kept"] and all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert all(r["label"] == (r["score"] >= 0.25) for r in rows)
    assert summary["labels"]["train"]["desirable"] == sum(r["label"] for r in rows)


def test_kto_with_lora_uses_the_policy_without_adapters_as_reference(in_tmp, tiny_base):
    """With lora and no ref_model, no second model: TRL disables the adapters for the reference pass.
    At step 1 the adapters are zero-initialised (B = 0), so every log-ratio is 0 and the loss 0.5."""
    src = write_jsonl(in_tmp / "thumbs.jsonl", THUMBS)
    [node] = run(RECIPES / "kto.yaml", [
        f"model={tiny_base}", f"data.source={src}", "data.eval_examples=0", "lora={}", "training.max_steps=2",
        "training.per_device_train_batch_size=8", "training.logging_steps=1", "kto.desirable_weight=3",
        "output_dir=out/kto"])
    summary = summary_of(node)
    assert summary["reference"] == "copy: adapters disabled" and summary["steps"] == 2
    records = [json.loads(line) for line in (node.out_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    assert first["loss"] == pytest.approx(0.5 * (3 * 2 + 6) / 8, abs=1e-5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(node.out_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
