"""pretrain and sft stages on micro settings, the pipeline's caching and atomic outputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline as hf_pipeline

from alignment.errors import RecipeError
from alignment.data import pack_blocks
from alignment.models import load_causal_lm, load_tokenizer
from alignment.pipeline import plan, run
from alignment.stages.common import drop_metrics_after

from .conftest import MICRO, RECIPES, tensorboard_scalars


def test_pack_blocks_by_hand():
    """docs [1,2],[3],[4,5,6] with EOS 9 -> stream 1 2 9 3 9 4 5 6 9 (9 tokens);
    blocks of 4: [1,2,9,3], [9,4,5,6]; 1 token left over. A doc already ending in EOS gets no second one."""
    blocks, leftover = pack_blocks([[1, 2], [3], [4, 5, 6]], 4, eos_id=9)
    assert blocks == [[1, 2, 9, 3], [9, 4, 5, 6]] and leftover == 1
    assert pack_blocks([[1, 9]], 2, eos_id=9) == ([[1, 9]], 0)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_pretrain_then_sft_learn_and_load_in_transformers(in_tmp):
    overrides = [*MICRO, "pretrain:data.num_examples=600", "pretrain:training.max_steps=30",
                 "pretrain:training.learning_rate=3e-3", "data.num_examples=300", "training.max_steps=15",
                 "sft:training.report_to=[tensorboard]"]
    nodes = run(RECIPES / "sft.yaml", overrides)
    # The tracker the recipe names got every logged loss (TensorBoard files kept in <output>/logs).
    assert tensorboard_scalars(nodes[-1].out_dir / "logs")["train/loss"] == pytest.approx(losses(nodes[-1].out_dir), rel=1e-5)
    assert not list(nodes[1].out_dir.rglob("events.out.tfevents.*"))  # pretrain named no tracker
    assert [n.recipe.stage for n in nodes] == ["init", "pretrain", "sft"]
    for node in nodes[1:]:
        out = node.out_dir
        history = losses(out)
        assert len(history) >= 10 and min(history[-3:]) < history[0], (node.name, history)
        for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.resolved.yaml", "README.md", "run_info.json"):
            assert (out / name).is_file(), name
        assert not out.with_name(out.name + ".partial").exists()
        info = json.loads((out / "run_info.json").read_text())
        assert info["status"] == "finished" and info["hash"] == node.hash
    # transformers alone loads the output and answers a chat through the saved template, picking
    # the same tokens as the toolkit's model layer does one argmax at a time.
    out = nodes[-1].out_dir
    chat = [{"role": "user", "content": "repeat: cat dog"}]
    reply = hf_pipeline("text-generation", model=str(out))(chat, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    tok = load_tokenizer(str(out))
    model = load_causal_lm(str(out), tok).eval()
    ids, new = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"], []
    with torch.no_grad():
        while len(new) < 8 and (not new or new[-1] != tok.eos_token_id):
            new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
    assert reply == [*chat, {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)}]

    # Same recipe again: every stage is up to date and skipped (no new metrics lines).
    before = (nodes[-1].out_dir / "metrics.jsonl").read_text()
    again = run(RECIPES / "sft.yaml", overrides)
    assert [n.hash for n in again] == [n.hash for n in nodes]
    assert (nodes[-1].out_dir / "metrics.jsonl").read_text() == before

    # A change to sft reruns sft only; a change to pretrain reruns pretrain and sft.
    changed = plan(RECIPES / "sft.yaml", [*overrides, "training.learning_rate=1e-4"])
    assert [a.hash == b.hash for a, b in zip(changed, nodes)] == [True, True, False]
    changed = plan(RECIPES / "sft.yaml", [*overrides, "pretrain:seed=1"])
    assert [a.hash == b.hash for a, b in zip(changed, nodes)] == [True, False, False]
    # Keys that only change reporting do not invalidate outputs.
    same = plan(RECIPES / "sft.yaml", [*overrides, "*:training.logging_steps=7"])
    assert [n.hash for n in same] == [n.hash for n in nodes]


def test_bad_sft_rows_error_with_line_or_are_counted(in_tmp, tiny_base):
    rows = [
        {"messages": [{"role": "user", "content": "repeat: cat dog"}, {"role": "assistant", "content": "Sure! cat dog"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": "not a list"},
        {"text": "no messages"},
    ] + [{"messages": [{"role": "user", "content": "first: a b"}, {"role": "assistant", "content": "Sure! a"}]}] * 20
    data = in_tmp / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = [f"model={tiny_base}", f"data.source={data}", "training.max_steps=2", "output_dir=out/sft"]
    with pytest.raises(RecipeError, match=r"chats.jsonl:2: no non-empty assistant message"):
        run(RECIPES / "sft.yaml", base)
    assert not (in_tmp / "out").exists() or not any((in_tmp / "out").iterdir())  # nothing half-written
    [node] = run(RECIPES / "sft.yaml", [*base, "data.on_bad_row=drop"])
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    assert summary["conversations"] == 21
    assert summary["dropped/no non-empty assistant message"] == 1
    assert summary["dropped/'messages' is not a non-empty list"] == 1
    assert summary["dropped/missing 'messages'"] == 1


def test_sft_counts_conversations_cut_or_dropped_by_max_length(in_tmp, tiny_base):
    """SFTTrainer cuts conversations to max_length tokens and drops those left with no assistant
    token. max_length is set to the exact length of one conversation, which is neither."""
    def chat(user, assistant):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    exact = chat("repeat: cat dog sun", "Sure! cat dog sun")
    rows = [exact] * 3 + [chat("first: a b", "Sure! a")] * 4 + [chat("repeat: a b", "Sure! " + "a b " * 30)] * 5 \
        + [chat("reverse: " + "fish " * 60, "Sure!")] * 2
    data = in_tmp / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(tiny_base))
    max_length = len(tok.apply_chat_template(exact["messages"], return_dict=True)["input_ids"])
    [node] = run(RECIPES / "sft.yaml", [f"model={tiny_base}", f"data.source={data}", f"training.max_length={max_length}",
                                       "training.max_steps=1", "output_dir=out/sft"])
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    assert summary["conversations"] == 14 and summary["conversations_trained"] == 12
    assert summary["truncated/longer than max_length"] == 5
    assert summary["dropped/no assistant token within max_length"] == 2


def test_bad_json_line_is_named(in_tmp, tiny_base):
    data = in_tmp / "corpus.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(RecipeError, match=r"corpus.jsonl:2: not valid JSON"):
        run(RECIPES / "pretrain.yaml", [f"model={tiny_base}", f"data.source={data}", "output_dir=out/p"])


# A run that SIGKILLs itself (no exception, no cleanup) right after logging step 3, one step
# after its checkpoint at step 2.
KILLED_AT_STEP_3 = """
import os, signal, sys
from alignment.cli import main
from alignment.stages import common

log = common.MetricsFile.on_log

def on_log(self, args, state, control, logs=None, **kwargs):
    log(self, args, state, control, logs=logs, **kwargs)
    if state.global_step == 3:
        os.kill(os.getpid(), signal.SIGKILL)

common.MetricsFile.on_log = on_log
sys.exit(main(sys.argv[1:]))
"""

STAGE_DATA = {
    "pretrain": ["data.num_examples=300", "training.max_length=32"],
    "sft": ["data.num_examples=64"],
    "reward": ["data.num_examples=72", "data.eval_examples=8"],
    "dpo": ["data.num_examples=72", "data.eval_examples=8"],
    "kto": ["data.source=demo", "data.num_examples=36", "data.eval_examples=8"],  # demo pairs: two rows each
}


@pytest.mark.parametrize("stage", list(STAGE_DATA))
def test_killed_stage_resumes_to_the_same_weights(in_tmp, tiny_base, stage):
    """SIGKILL mid-run leaves only `<out>.partial/` (never `<out>/`); the rerun resumes from the
    last checkpoint and ends with exactly the weights of a run that was never interrupted."""
    recipe = str(RECIPES / f"{stage}.yaml")
    overrides = [f"model={tiny_base}", *STAGE_DATA[stage], "training.max_steps=4", "training.save_steps=2",
                 "training.logging_steps=1", "training.per_device_train_batch_size=8"]
    out = in_tmp / "out" / stage
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_3, "run", recipe, *overrides, f"output_dir={out}"],
                            cwd=in_tmp, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = out.with_name(stage + ".partial")
    assert (partial / "checkpoints" / "checkpoint-2").is_dir() and not out.exists()

    [node] = run(recipe, [*overrides, f"output_dir={out}"])
    summary = json.loads((out / "run_info.json").read_text())["summary"]
    assert summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 4
    # Step 3 was logged by the killed run and again by the resumed one: metrics.jsonl has it once.
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == [1, 2, 3, 4]
    assert not partial.exists() and not (out / "checkpoints").exists()

    whole = in_tmp / "out" / f"{stage}-whole"
    run(recipe, [*overrides, f"output_dir={whole}"])
    resumed, reference = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    assert not torch.equal(reference["model.embed_tokens.weight"], load_file(tiny_base / "model.safetensors")["model.embed_tokens.weight"])


def test_resuming_drops_the_metrics_logged_after_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # killed mid-line
    drop_metrics_after(metrics, 2)
    assert metrics.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    drop_metrics_after(tmp_path / "absent.jsonl", 2)  # a run killed before it logged anything
    assert not (tmp_path / "absent.jsonl").exists()


def test_report_leaves_out_models_not_in_the_run_and_says_so(tiny_base):
    from alignment.report import resolve_models

    nodes = plan(RECIPES / "dpo.yaml")
    models, notes = resolve_models(nodes[-1].recipe.report, nodes)
    assert list(models) == ["base", "sft", "dpo"] and models["sft"] == str(nodes[-2].out_dir) and not notes
    nodes = plan(RECIPES / "dpo.yaml", [f"model={tiny_base}"])  # the chain is replaced by a checkpoint
    models, notes = resolve_models(nodes[-1].recipe.report, nodes)
    assert list(models) == ["dpo"]
    assert len(notes) == 2 and "'base' left out: 'pretrain' is neither a recipe in this run (dpo)" in notes[0]
