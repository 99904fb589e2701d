"""Stage `sft`: supervised fine-tuning on conversations, loss on assistant tokens only.

Each conversation is checked against the model's chat template first (a system turn the template
refuses is merged or dropped as `data.system_message` says, counted; a row that still cannot be
rendered is reported by file and row), then rendered and tokenised here, and its assistant tokens
located by rendering it turn by turn (`templates.assistant_mask`): what each assistant turn says
and the stop token that ends it are learned, in multi-turn chats too, with any template that renders
its prefixes consistently (no `{% generation %}` markers needed). TRL's SFTTrainer gets the token
ids and that mask. A template that rewrites earlier turns (Qwen3's drops earlier reasoning) or ends
an assistant turn with no stop token is refused before training, in one line.
With `sft.packing`, whole conversations share rows of max_length tokens (TRL's best-fit
decreasing packing) and train padding-free, each attending to itself only.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from ..config import SFTRecipe
from ..errors import RecipeError
from ..data import check_rows, fit_to_template, load_rows, messages_problem
from ..demo import world
from ..models import load_tokenizer
from ..templates import TemplateUnfit, assistant_mask, generation_stop_ids
from .common import require_rows, train_causal_lm


def run(recipe: SFTRecipe, inputs: dict, work_dir: Path) -> dict:
    d = recipe.data
    field = d.messages_field
    tok = load_tokenizer(inputs["model"], recipe.model_options)
    rows = check_rows(
        load_rows(d, world.preset(recipe.world).sft_conversations, source=inputs.get("data")),
        messages_problem(field),
        d.on_bad_row,
    )
    rows, changed = fit_to_template(rows, tok, d.system_message, d.on_bad_row, field)
    ids, masks = tokenised(tok, rows, field, generation_stop_ids(inputs["model"], tok, recipe.model_options),
                           inputs["model"])
    dataset = Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})
    max_length = recipe.training.max_length

    def count(trainer, tok) -> dict:
        require_rows(len(dataset), trainer.train_dataset, "conversations", max_length)
        if recipe.sft.packing:
            return packed_counts(trainer.train_dataset, ids, max_length)
        return length_counts(trainer.train_dataset, masks, max_length)

    # packing_strategy "bfd": whole conversations, and TRL then trains padding-free (position ids, no
    # attention across conversations); "wrapped" would cut conversations mid-way and let them attend across.
    packing = {"packing": True, "packing_strategy": "bfd"} if recipe.sft.packing else {}
    summary = train_causal_lm(recipe, inputs, work_dir, dataset, count=count, tok=tok, **packing)
    return {"conversations": len(rows), **{f"dropped/{k}": v for k, v in rows.dropped.items()},
            **{f"changed/{k}": v for k, v in changed.items()}, **summary}


def tokenised(tok, rows, field: str, stops: list[int], model: str) -> tuple[list[list[int]], list[list[int]]]:
    """Every conversation's token ids and assistant-token mask (`templates.assistant_mask`); a template
    that cannot be trained on this way stops the run in one line naming the model, why and the fix."""
    ids, masks = [], []
    for row, origin in zip(rows.rows, rows.origins):
        try:
            found, mask = assistant_mask(tok, row[field], stops)
        except TemplateUnfit as exc:
            raise RecipeError(
                f"model '{model}': its chat template cannot be trained on with an assistant-only loss: {exc} "
                f"(first seen at {origin}); give it a template that renders each turn the same whatever follows "
                "and ends assistant turns with a stop token: model_options.chat_template: FILE"
            ) from None
        ids.append(found)
        masks.append(mask)
    return ids, masks


def length_counts(prepared, masks: list[list[int]], max_length: int) -> dict:
    """What SFTTrainer's preparation did with max_length: it cuts every conversation to its first
    max_length tokens, then drops those left with no assistant token to learn from. Cut conversations
    are counted from the masks (longer than max_length with an assistant token within it)."""
    return {
        "conversations_trained": len(prepared),
        "truncated/longer than max_length": sum(len(m) > max_length and any(m[:max_length]) for m in masks),
        "dropped/no assistant token within max_length": len(masks) - len(prepared),
    }


def packed_counts(packed, ids: list[list[int]], max_length: int) -> dict:
    """What packing did: conversations in how many rows of max_length tokens, how full the rows are,
    and how many conversations were cut to max_length (TRL's best-fit decreasing packing cuts a longer
    one rather than dropping it)."""
    tokens = sum(sum(row) for row in packed["seq_lengths"])
    return {
        "conversations_trained": sum(len(row) for row in packed["seq_lengths"]),
        "packed_rows": len(packed),
        "packed_fill": round(tokens / (len(packed) * max_length), 4),
        "truncated/longer than max_length": sum(len(x) > max_length for x in ids),
    }
