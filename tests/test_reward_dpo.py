"""Preference data checking, and the reward and dpo stages on micro settings."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment.recipe_file import load_recipe
from alignment.errors import RecipeError
from alignment.demo import world
from alignment.models import load_causal_lm, load_tokenizer
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


@pytest.mark.dynamics
def test_reward_stage_learns_and_loads_as_a_classifier(in_tmp, tiny_base):
    overrides = [f"model={tiny_base}", "data.num_examples=400", "data.eval_examples=64", "training.max_steps=20",
                 "training.learning_rate=3e-3", "training.logging_steps=1", "output_dir=out/reward"]
    [node] = run(RECIPES / "reward.yaml", overrides)
    history = [r["loss"] for r in logged(node.out_dir)]
    assert len(history) >= 15 and min(history[-3:]) < history[0], history
    summary = summary_of(node)
    print(f"margin: reward eval accuracy {summary['eval_accuracy']:.3f} (> 0.75)")
    assert summary["eval_accuracy"] > 0.75 and summary["eval_margin"] > 0  # chance is 0.5
    assert summary["eval_pairs"] == 64

    # Loaded by transformers alone, the saved classifier ranks fresh pairs about as well as the
    # held-out accuracy says (so the logged metric is the model's, not an artefact).
    tok = AutoTokenizer.from_pretrained(node.out_dir)
    model = AutoModelForSequenceClassification.from_pretrained(node.out_dir).eval()
    assert model.config.num_labels == 1

    def score(prompt, reply):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                       tokenize=False)
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits.item()

    fresh = world.preference_pairs(100, 7)
    accuracy = sum(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in fresh) / len(fresh)
    assert abs(accuracy - summary["eval_accuracy"]) < 0.15, (accuracy, summary["eval_accuracy"])


@pytest.mark.parametrize(
    "mode, extra, reference",
    [
        ("copy", [], "copy: "),
        ("precompute", ["dpo.reference=precompute"], "precompute: starting model"),
        ("lora", ["lora={r: 4, alpha: 8}", "training.learning_rate=5e-2"], "copy: adapters disabled"),
    ],
)
def test_dpo_reference_stays_the_starting_policy_while_the_policy_moves(in_tmp, tiny_base, mode, extra, reference):
    """16 training pairs in one batch: every step sees the same pairs. The logged means give the
    reference's log-probs, logps - rewards / beta: they must stay put while the policy's move (a
    reference that follows the policy, or LoRA adapters left on, would move with it)."""
    beta = 0.1
    overrides = [f"model={tiny_base}", "data.num_examples=32", "data.eval_examples=16", "training.max_steps=4",
                 "training.per_device_train_batch_size=16", "training.learning_rate=1e-2", "training.logging_steps=1",
                 f"output_dir=out/{mode}", "dpo.loss_type=sigmoid", f"dpo.beta={beta}", *extra]
    [node] = run(RECIPES / "dpo.yaml", overrides)
    records = logged(node.out_dir)
    assert len(records) == 4
    # Step 1: policy == reference, so every log-ratio is 0 and -log sigma(0) = ln 2.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for side in ("chosen", "rejected"):
        policy = [r[f"logps/{side}"] for r in records]
        ref = [r[f"logps/{side}"] - r[f"rewards/{side}"] / beta for r in records]
        assert max(abs(p - policy[0]) for p in policy) > 0.05, policy  # the policy moved (25x the tolerance below)
        assert ref == pytest.approx([policy[0]] * 4, abs=2e-3), ref  # the reference did not
    summary = summary_of(node)
    assert summary["reference"].startswith(reference) and summary["steps"] == 4
    assert "eval_rewards/accuracies" in summary and "rewards/margins" in summary

    model = AutoModelForCausalLM.from_pretrained(node.out_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.fixture
def other_policy(tiny_base, tmp_path) -> Path:
    """tiny_base with every weight nudged: a reference that differs from the policy from step 0."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def reply_logp(model, tok, prompt: str, reply: str) -> tuple[float, int]:
    """Summed log-prob of the reply's tokens (EOS included) after the prompt, and their count."""
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                  return_dict=True)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    picked = logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(prompt_ids) - 1 :]
    return picked.sum().item(), len(picked)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_dpo_family_first_loss_computed_by_hand(in_tmp, tiny_base, other_policy, loss_type):
    """One pair whose replies differ in length, a reference that differs from the policy (none for
    SimPO): the first logged loss equals the formula on log-probs computed here.
    h = (Sc - Rc) - (Sr - Rr) on summed log-probs; IPO and SimPO use per-token averages."""
    beta, ratio = 0.5, 0.5
    pair = {"prompt": "repeat: cat dog", "chosen": "Sure! cat dog", "rejected": "Ugh. dog cat dog cat fish sun and so on"}
    data = in_tmp / "pair.jsonl"
    data.write_text((json.dumps(pair) + "\n") * 2)
    reference = [] if loss_type == "simpo" else [f"ref_model={other_policy}"]
    [node] = run(RECIPES / "dpo.yaml", [
        f"model={tiny_base}", f"data.source={data}", "data.eval_examples=0", "training.max_steps=1",
        "training.per_device_train_batch_size=2", f"dpo.loss_type={loss_type}", f"dpo.beta={beta}",
        f"dpo.simpo_gamma_beta_ratio={ratio}", "output_dir=out/d", *reference])

    tok = load_tokenizer(str(tiny_base))
    policy, ref = load_causal_lm(str(tiny_base), tok).eval(), load_causal_lm(str(other_policy), tok).eval()
    (sc, nc), (sr, nr) = (reply_logp(policy, tok, pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
    (rc, _), (rr, _) = (reply_logp(ref, tok, pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
    assert nc != nr
    h = (sc - rc) - (sr - rr)
    h_avg = (sc - rc) / nc - (sr - rr) / nr
    expected = {
        "sigmoid": -math.log(1 / (1 + math.exp(-beta * h))),
        "hinge": max(0.0, 1 - beta * h),
        "ipo": (h_avg - 1 / (2 * beta)) ** 2,
        "simpo": -math.log(1 / (1 + math.exp(-(beta * (sc / nc - sr / nr) - ratio * beta)))),
    }[loss_type]
    assert logged(node.out_dir)[0]["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    if loss_type == "ipo":  # the averaging matters for this pair
        assert abs((h - 1 / (2 * beta)) ** 2 - expected) > 0.1


def test_precompute_frees_an_explicit_reference_before_training(in_tmp, tiny_base, other_policy, monkeypatch):
    """With `dpo.reference: precompute` and a ref_model of its own, the reference model is gone
    (garbage, not just unreferenced by the trainer) once training starts."""
    from alignment import models
    from alignment.stages import common, dpo

    loaded, alive_in_training = {}, []
    load = dpo.load_causal_lm

    def tracked(path, tok, options=None, key="model"):
        model = load(path, tok, options, key=key)
        loaded[key] = weakref.ref(model)
        return model

    def on_log(self, args, state, control, logs=None, **kwargs):
        gc.collect()
        alive_in_training.append({key: ref() is not None for key, ref in loaded.items()})

    monkeypatch.setattr(dpo, "load_causal_lm", tracked)  # the policy
    monkeypatch.setattr(models, "load_causal_lm", tracked)  # the reference (common.reference_model)
    monkeypatch.setattr(common.MetricsFile, "on_log", on_log)
    [node] = run(RECIPES / "dpo.yaml", [
        f"model={tiny_base}", f"ref_model={other_policy}", "dpo.reference=precompute", "data.num_examples=32",
        "data.eval_examples=8", "training.max_steps=2", "training.per_device_train_batch_size=8",
        "training.logging_steps=1", "output_dir=out/d"])
    assert summary_of(node)["reference"] == f"precompute: {other_policy}"
    assert alive_in_training and all(seen == {"model": True, "ref_model": False} for seen in alive_in_training)
