"""Stage `prep`: prepare a recipe's own data with data_prep.

Reads `prep.sources` (files, hub ids or the demo world, in any shape data_prep knows), cleans,
deduplicates, mixes and splits them by prompt, and writes the canonical form into the output
directory: train/test JSONL and Parquet, and summary.json (every row read, kept or dropped by
reason). A reward or dpo recipe reads it with `data.source: {from: prep.yaml}` and uses its
test split as the held-out set. Like every stage it is skipped when its content hash (the
recipe, the source files' contents, the tokenizer's hash) matches a finished output.

A source with `samples` is on-policy data: its rows are prompts, the recipe's `model` answers each
`samples.k` times (seeded with prep.seed) and the gold oracle, `reward_model` or the `reward_fn`
functions (`samples.scorer`) score the replies, which become rated rows: best vs worst pairs (kind
pairs) or one row per reply labelled by prep.threshold (kind binary, for kto). Their rows are marked
`generated`, so an empty reply (the model stopped at once) is kept, and a reply sampled more than once
is kept as often as it was sampled (not deduplicated: how often the policy says it is part of the
data); the summary counts them as samples/<source>/empty_replies and samples/<source>/repeated_samples.
"""

from __future__ import annotations

from pathlib import Path

from ..config import PrepRecipe

MAIN_PROCESS_ONLY = True  # writing files is one process's job
USES_DEVICE = False  # no model computes here: the device does not enter the hash


def run(recipe: PrepRecipe, inputs: dict, work_dir: Path) -> dict:
    from data_prep.prepare import prepare, summary_text
    from data_prep.write import write_files

    tokenizer = None
    if "model" in inputs:
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(inputs["model"], recipe.model_options)
    stats: dict[str, dict] = {}
    prepared = prepare(recipe.prep, tokenizer, world=recipe.world, given=sampled_sources(recipe, inputs, stats))
    write_files(work_dir, prepared.kind, prepared.splits, prepared.summary)
    print(summary_text(prepared.summary))
    s = prepared.summary
    for name, found in stats.items():
        found["empty_replies"] = s["empty_replies"].get(name, 0)
        found["repeated_samples"] = s["repeated_samples"].get(name, 0)
    return {
        "rows_read": s["rows_read"],
        "kept": s["kept"],
        **{f"{split}_rows": n for split, n in s["splits"].items()},
        **{f"dropped/{k}": v for k, v in s["dropped"].items()},
        **{f"extra/{k}": v for k, v in s["extra"].items()},
        **{f"{split}_{label}": n for split, counts in s.get("labels", {}).items() for label, n in counts.items()},
        **{f"samples/{name}/{key}": value for name, found in stats.items() for key, value in found.items()},
    }


def sampled_sources(recipe: PrepRecipe, inputs: dict, stats: dict) -> dict:
    """Source name -> rated rows (origin, row or Bad) sampled from `model` for each source with `samples`;
    `stats[name]` receives how many replies, their mean score and (with `ref_model`) the KL to it. Scorer
    'reward_fn' sums the recipe's functions and, when it is set, its reward model (RL's reward sources)."""
    from data_prep.onpolicy import rated_rows, read_prompts
    from data_prep.prepare import source_name

    o = recipe.prep
    given = {}
    for source in o.sources:
        s = source.samples
        if s is None:
            continue
        columns: dict = {}
        prompts = read_prompts(source.path, source.columns.prompt, source.num_examples, o.seed, recipe.world, columns)
        name = source_name(source)
        stats[name] = {}
        functions = recipe.reward_fn if s.scorer == "reward_fn" else []
        given[name] = rated_rows(
            prompts, inputs["model"], k=s.k, reward_model=inputs.get("reward_model") if s.scorer != "oracle" else None,
            reward_fn=functions, reward_weights=recipe.reward_weights if functions else None, columns=columns,
            temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
            seed=o.seed, kl_model=inputs.get("ref_model"), stats=stats[name],
        )
    return given
