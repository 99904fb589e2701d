"""Stage `pretrain`: continued pretraining on raw text packed into fixed blocks.

Each document is tokenised, followed by EOS, concatenated, and cut into blocks of
`training.max_length` tokens; the loss covers every token.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from ..config import PretrainRecipe
from ..data import check_rows, load_rows, pack_blocks, text_problem
from ..demo import world
from ..models import load_tokenizer
from .common import train_causal_lm


def demo_corpus(n: int, seed: int, preset: str = "default") -> list[dict]:
    return [{"text": t} for t in world.pretrain_corpus(n, seed, world=preset)]


def run(recipe: PretrainRecipe, inputs: dict, work_dir: Path) -> dict:
    field = recipe.data.text_field
    found = load_rows(recipe.data, lambda n, seed: demo_corpus(n, seed, recipe.world), source=inputs.get("data"))
    rows = check_rows(found, text_problem(field), recipe.data.on_bad_row)
    tok = load_tokenizer(inputs["model"], recipe.model_options)
    docs = tok([r[field] for r in rows.rows], add_special_tokens=False)["input_ids"]
    blocks, leftover = pack_blocks(docs, recipe.training.max_length, tok.eos_token_id)
    dataset = Dataset.from_dict({"input_ids": blocks})
    summary = train_causal_lm(recipe, inputs, work_dir, dataset)
    return {
        "documents": len(rows),
        "blocks": len(blocks),
        "leftover_tokens_dropped": leftover,
        **{f"dropped/{k}": v for k, v in rows.dropped.items()},
        **summary,
    }
