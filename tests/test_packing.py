"""sft.packing: whole conversations packed into rows of max_length tokens, trained padding-free; the
loss still covers assistant tokens only and no token attends to another conversation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.data import load_rows
from alignment.demo import world
from alignment.pipeline import run
from alignment.stages import common

from .conftest import RECIPES


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, tiny_base):
    """A micro packed sft run, and the trainer it used."""
    seen = {}
    real = common.fit_and_save

    def keep(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return real(trainer, *args, **kwargs)

    work = tmp_path_factory.mktemp("packed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "fit_and_save", keep)
        [node] = run(RECIPES / "sft.yaml", [f"model={tiny_base}", "sft.packing=true", "data.num_examples=64",
                                           "training.max_length=128", "training.per_device_train_batch_size=2",
                                           "training.max_steps=3", "training.logging_steps=1", f"output_dir={work / 'sft'}"])
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    conversations = load_rows(node.recipe.data, world.sft_conversations, 64).rows
    return summary, seen["trainer"], [row[node.recipe.data.messages_field] for row in conversations]


def test_packing_trains_and_is_counted(packed_run):
    summary, *_ = packed_run
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    assert summary["conversations_trained"] == 64
    assert summary["packed_rows"] < 64 / 2  # several conversations to a row
    assert 0.5 < summary["packed_fill"] <= 1.0
    assert summary["truncated/longer than max_length"] == 0


def test_packed_batch_learns_assistant_tokens_only_and_attends_within_each_conversation(packed_run):
    _, trainer, conversations = packed_run
    tok, model = trainer.processing_class, trainer.model.eval()
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
    assert len(starts) - 1 == sum(len(r["seq_lengths"]) for r in rows) > 2

    # Every conversation rendered alone: its token ids -> its assistant-token mask (the chat template's
    # {% generation %} block: what the assistant says, EOS included).
    assistant = {}
    for messages in conversations:
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assistant[tuple(out["input_ids"])] = torch.tensor(out["assistant_masks"]).bool()
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    for lo, hi in zip(starts, starts[1:]):
        segment = ids[lo:hi]
        mask = assistant[tuple(segment.tolist())]  # a whole conversation, not a piece
        assert mask.any() and not mask.all()
        assert torch.equal(labels[lo:hi] != -100, mask)  # the loss covers exactly the assistant's tokens
        assert torch.equal(labels[lo:hi][mask], segment[mask])
        with torch.no_grad():
            alone = model(input_ids=segment[None]).logits[0]
        assert torch.allclose(packed_logits[lo:hi], alone, atol=1e-5)  # no attention across conversations
