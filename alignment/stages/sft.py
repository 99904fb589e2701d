"""Stage `sft`: supervised fine-tuning on conversations, loss on assistant tokens only.

Conversations go through the tokenizer's chat template (the toolkit's default carries
`{% generation %}` markers), so only what the assistant says, EOS included, is learned.
With `sft.packing`, whole conversations share rows of max_length tokens (TRL's best-fit
decreasing packing) and train padding-free, each attending to itself only.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from ..config import SFTRecipe
from ..data import check_rows, load_rows, messages_problem
from ..demo import world
from .common import require_rows, train_causal_lm

DEFAULT_EXAMPLES = 4000


def run(recipe: SFTRecipe, inputs: dict, work_dir: Path) -> dict:
    field = recipe.data.messages_field
    rows = check_rows(
        load_rows(recipe.data, world.preset(recipe.world).sft_conversations, DEFAULT_EXAMPLES, source=inputs.get("data")),
        messages_problem(field),
        recipe.data.on_bad_row,
    )
    dataset = Dataset.from_dict({"messages": [r[field] for r in rows.rows]})
    max_length = recipe.training.max_length

    def count(trainer, tok) -> dict:
        require_rows(len(dataset), trainer.train_dataset, "conversations", max_length)
        if recipe.sft.packing:
            return packed_counts(trainer.train_dataset, tok, dataset, max_length)
        return length_counts(trainer.train_dataset, tok, len(dataset), max_length)

    # packing_strategy "bfd": whole conversations, and TRL then trains padding-free (position ids, no
    # attention across conversations); "wrapped" would cut conversations mid-way and let them attend across.
    packing = {"packing": True, "packing_strategy": "bfd"} if recipe.sft.packing else {}
    summary = train_causal_lm(recipe, inputs, work_dir, dataset, count=count, assistant_only_loss=True, **packing)
    return {"conversations": len(rows), **{f"dropped/{k}": v for k, v in rows.dropped.items()}, **summary}


def length_counts(prepared, tok, conversations: int, max_length: int) -> dict:
    """What SFTTrainer's preparation did with max_length, counted from its prepared dataset.

    It cuts every conversation to its first max_length tokens, then drops those left with no
    assistant token to learn from. A kept row of exactly max_length tokens was cut unless the
    conversation fits exactly, which re-rendering only those rows tells.
    """
    at_limit = [i for i, ids in enumerate(prepared["input_ids"]) if len(ids) >= max_length]
    full_lengths = (
        len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
        for m in prepared.select(at_limit)["messages"]
    )
    return {
        "conversations_trained": len(prepared),
        "truncated/longer than max_length": sum(n > max_length for n in full_lengths),
        "dropped/no assistant token within max_length": conversations - len(prepared),
    }


def packed_counts(packed, tok, conversations, max_length: int) -> dict:
    """What packing did: conversations in how many rows of max_length tokens, how full the rows are,
    and how many conversations were cut to max_length (TRL's best-fit decreasing packing cuts a longer
    one rather than dropping it)."""
    lengths = [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in conversations["messages"]]
    tokens = sum(sum(row) for row in packed["seq_lengths"])
    return {
        "conversations_trained": sum(len(row) for row in packed["seq_lengths"]),
        "packed_rows": len(packed),
        "packed_fill": round(tokens / (len(packed) * max_length), 4),
        "truncated/longer than max_length": sum(n > max_length for n in lengths),
    }
