"""Stage `sft`: supervised fine-tuning on conversations, loss on assistant tokens only.

Conversations go through the tokenizer's chat template (the toolkit's default carries
`{% generation %}` markers), so only what the assistant says, EOS included, is learned.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from ..config import SFTRecipe
from ..data import check_rows, load_rows, messages_problem
from ..demo import world
from .common import train_causal_lm

DEFAULT_EXAMPLES = 4000


def run(recipe: SFTRecipe, inputs: dict, work_dir: Path) -> dict:
    field = recipe.data.messages_field
    rows = check_rows(
        load_rows(recipe.data, world.sft_conversations, DEFAULT_EXAMPLES, source=inputs.get("data")),
        messages_problem(field),
        recipe.data.on_bad_row,
    )
    dataset = Dataset.from_dict({"messages": [r[field] for r in rows.rows]})
    summary = train_causal_lm(recipe, inputs, work_dir, dataset, assistant_only_loss=True)
    return {"conversations": len(rows), **{f"dropped/{k}": v for k, v in rows.dropped.items()}, **summary}
