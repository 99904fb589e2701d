"""Iterative online DPO as a recipe of rounds (`stage: online_dpo`), built from stages that exist.

A recipe with `rounds: N` stands for 2N ordinary stages, which the pipeline plans, hashes, caches
and resumes like any other (no second runner):

    round r pairs   a `prep` stage: the model round r starts from answers `online.prompts_per_round`
                    prompts `online.k` times, the gold oracle, the reward model or the recipe's Python
                    reward functions (`reward_fn`, summed with the reward model when set) score the replies,
                    best vs worst become pairs (ties and margins under `online.min_margin` dropped and
                    counted); it also measures the sampling model's KL to the starting model.
                    Output: <output_dir>/round-r-pairs/
    round r         a `dpo` stage from the model round r starts from, on those pairs; its reference is
                    that model (online.reference: previous) or the starting model (start).
                    Output: <output_dir>/round-r/

Round 1 starts from `model` (e.g. {from: sft.yaml}); round r > 1 from round r-1's output. Each
stage's content hash covers its own recipe and the hashes of what it reads, never `rounds`, so a
run killed in round 3 keeps rounds 1-2 and resumes round 3 (from its checkpoint with
`training.save_steps`), and raising `rounds` trains only the new rounds.

Per round, the pairs stage's summary holds the samples' mean score (`samples/prompts/mean_score`),
the pairs kept (`train_rows`, `test_rows`), the drops by reason, and the sampling model's KL to
the starting model (`samples/prompts/kl`); `round_table` lays them out one line per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import DPORecipe, FromRecipe, OnlineDPORecipe, PrepRecipe

SOURCE = "prompts"  # the name of each pairs stage's one source (its summary keys say it)


@dataclass
class RoundStage:
    """One stage of a rounds recipe: its name, recipe, output, and what it reads. `refs` maps a model
    role of `recipe` to 'outer:<role>' (the rounds recipe's own input of that role) or the name of
    an earlier stage of the rounds."""

    name: str
    recipe: object
    out_dir: Path
    refs: dict[str, str] = field(default_factory=dict)


def stage_name(stem: str, round_: int, rounds: int, pairs: bool) -> str:
    """'online_dpo.round-2-pairs', 'online_dpo.round-2'; the last round's dpo stage carries the recipe's
    own name ('online_dpo'), so that `report.models` and `{from: online_dpo.yaml}` find the final model."""
    if not pairs and round_ == rounds:
        return stem
    return f"{stem}.round-{round_}{'-pairs' if pairs else ''}"


def expand(recipe: OnlineDPORecipe, stem: str, out_dir: Path) -> list[RoundStage]:
    """The 2 * rounds stages of `recipe`, in the order to run. `out_dir` holds round-r-pairs/ and round-r/."""
    o = recipe.online
    common = {"seed": recipe.seed, "world": recipe.world, "model_options": recipe.model_options.model_dump(by_alias=True)}
    outer_model = "outer:model" if isinstance(recipe.model, FromRecipe) else None
    start = recipe.model.model_dump(by_alias=True) if isinstance(recipe.model, FromRecipe) else recipe.model
    stages: list[RoundStage] = []
    previous, previous_ref = start, outer_model
    # 'reward_fn' sums the functions with the reward model when one is set, as the RL stages do
    uses_model = o.scorer == "reward_model" or (o.scorer == "reward_fn" and recipe.reward_model is not None)
    for r in range(1, recipe.rounds + 1):
        pairs_name = stage_name(stem, r, recipe.rounds, pairs=True)
        samples = {"k": o.k, "scorer": o.scorer, "temperature": o.temperature, "top_p": o.top_p,
                   "max_new_tokens": o.max_new_tokens, "batch_size": o.batch_size}
        pairs = PrepRecipe.model_validate({
            "stage": "prep", **common,
            "model": previous,
            "reward_model": _as_input(recipe.reward_model) if uses_model else None,
            **({"reward_fn": recipe.reward_fn, "reward_weights": recipe.reward_weights} if o.scorer == "reward_fn" else {}),
            "ref_model": start,
            "prep": {
                "kind": "pairs", "min_margin": o.min_margin, "test_fraction": o.test_fraction, "seed": recipe.seed + r,
                "sources": [{"path": recipe.data.source, "name": SOURCE, "num_examples": o.prompts_per_round,
                             "columns": {"prompt": recipe.data.prompt_field}, "samples": samples}],
            },
        })
        refs = {role: ref for role, ref in (("model", previous_ref), ("ref_model", outer_model)) if ref}
        if uses_model and isinstance(recipe.reward_model, FromRecipe):
            refs["reward_model"] = "outer:reward_model"
        stages.append(RoundStage(pairs_name, pairs, out_dir / f"round-{r}-pairs", refs))

        name = stage_name(stem, r, recipe.rounds, pairs=False)
        reference = None if (o.reference == "previous" or r == 1 or recipe.dpo.loss_type == "simpo") else start
        dpo = DPORecipe.model_validate({
            "stage": "dpo", **common,
            "model": previous,
            "ref_model": reference,
            "lora": recipe.lora.model_dump(by_alias=True) if recipe.lora is not None else None,
            "data": {"source": {"from": pairs_name}, "eval_examples": 0},  # held out: the pairs stage's test split
            "training": recipe.training.model_dump(by_alias=True),
            "dpo": recipe.dpo.model_dump(by_alias=True),
            "report": recipe.report.model_dump(by_alias=True) if r == recipe.rounds else {},
        })
        refs = {"data": pairs_name, **({"model": previous_ref} if previous_ref else {})}
        if reference is not None and outer_model:
            refs["ref_model"] = outer_model
        stages.append(RoundStage(name, dpo, out_dir / f"round-{r}", refs))
        previous, previous_ref = {"from": name}, name
    return stages


def _as_input(value):
    return value.model_dump(by_alias=True) if isinstance(value, FromRecipe) else value


def round_table(nodes) -> str:
    """One line per round of a rounds recipe's finished stages: the samples' mean score, pairs kept and
    dropped, the sampling model's KL to the starting model, and DPO's final training loss."""
    import json

    def summary(node) -> dict:
        try:
            return json.loads((node.out_dir / "run_info.json").read_text()).get("summary", {})
        except (OSError, ValueError):
            return {}

    lines = ["round  sampled  mean score  KL to start  pairs kept  pairs dropped  dpo loss"]
    pairs_nodes = [n for n in nodes if n.recipe.stage == "prep" and n.out_dir.name.endswith("-pairs")]
    by_dir = {n.out_dir: n for n in nodes}
    for node in pairs_nodes:
        r = node.out_dir.name.removeprefix("round-").removesuffix("-pairs")
        s = summary(node)
        dpo = summary(by_dir[node.out_dir.with_name(f"round-{r}")]) if node.out_dir.with_name(f"round-{r}") in by_dir else {}
        dropped = sum(v for k, v in s.items() if k.startswith("dropped/"))
        kept = s.get("kept", 0)
        lines.append(f"{r:>5}  {s.get(f'samples/{SOURCE}/samples', 0):>7}  {s.get(f'samples/{SOURCE}/mean_score', float('nan')):>10.3f}"
                     f"  {s.get(f'samples/{SOURCE}/kl', float('nan')):>11.3f}  {kept:>10}  {dropped:>13}"
                     f"  {dpo.get('train_loss', float('nan')):>8.4f}")
    return "\n".join(lines)
