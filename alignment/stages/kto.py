"""Stage `kto`: Kahneman-Tversky optimisation on unpaired feedback (Ethayarajh et al., 2024).

What people collect from a deployed assistant is mostly unpaired: one reply with a thumbs up or
down, a rating, an accepted or rejected suggestion. KTO learns from such rows directly: the policy
starts from `model` (usually the SFT output) and raises the log-ratio to a frozen reference
(`ref_model`, by default the starting model) of desirable replies and lowers it for undesirable
ones, each measured against a reference point, the batch's KL estimate (TRL pairs each prompt with
another row's reply to estimate it). Rows are `prompt` / `completion` / `label`
(`python -m data_prep binary` makes them from thumbs, ratings or accept/reject data), or preference
pairs, each of which becomes one desirable and one undesirable row.

The paper weights the two kinds so that desirable_weight * n_desirable / (undesirable_weight *
n_undesirable) lies in [1, 4/3]; when it does not, the stage says so in one line, with the numbers
and the weights that would bring it there (`balance_warning`); `desirable_weight: auto` sets the
weight from the training rows' counts (`balanced_desirable_weight`).

TRL's KTOTrainer does the data work (chat template, prompt/completion masks, the mismatched KL
rows), the reference bookkeeping (a frozen copy, precomputed log-probs, or with LoRA the policy
with its adapters disabled, as in dpo), the loop, checkpoints and logging. Its metrics
(`rewards/chosen|rejected|margins`, `logps/*`, `kl`) go to metrics.jsonl, and the held-out rows
(`data.eval_examples`) are scored at the end as `eval_*`.
"""

from __future__ import annotations

from pathlib import Path

from trl import KTOConfig, KTOTrainer

from ..config import KTORecipe
from ..errors import RecipeError
from ..demo import world
from ..generation import check_fused_head
from ..models import check_lora_targets, load_causal_lm, load_tokenizer, lora_config
from .common import (
    MetricsFile,
    feedback_datasets,
    fit_and_save,
    free_reference,
    last_logged,
    pairs_after_filter,
    reference_model,
    require_rows,
    trainer_args,
)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
# The KTO paper (Ethayarajh et al. 2024, eq. 8): weight the losses so that
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable) lies in this range.
RECOMMENDED_RATIO = (1.0, 4 / 3)


def weighted_ratio(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> float:
    """desirable_weight * n_desirable / (undesirable_weight * n_undesirable); inf with no undesirable row."""
    if n_undesirable == 0:
        return float("inf")
    return desirable_weight * n_desirable / (undesirable_weight * n_undesirable)


def balance_warning(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """One line when the weighted desirable:undesirable ratio is outside RECOMMENDED_RATIO, else None.

    It names the counts, the weights, the ratio, and the desirable_weight that would bring the ratio
    into the range with undesirable_weight kept: [lo, hi] * undesirable_weight * n_U / n_D.
    """
    lo, hi = RECOMMENDED_RATIO
    ratio = weighted_ratio(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    if lo <= ratio <= hi:
        return None
    counts = (f"kto: {n_desirable} desirable x desirable_weight {desirable_weight:g} : {n_undesirable} undesirable "
              f"x undesirable_weight {undesirable_weight:g}")
    if n_desirable == 0 or n_undesirable == 0:
        return f"{counts}: the data has only one kind of row; KTO needs both desirable and undesirable replies"
    base = undesirable_weight * n_undesirable / n_desirable
    return (f"{counts} = {ratio:.3g}, outside [1, 4/3] the KTO paper recommends; "
            f"set kto.desirable_weight in [{lo * base:.3g}, {hi * base:.3g}]")


def balanced_desirable_weight(n_desirable: int, n_undesirable: int, undesirable_weight: float) -> float:
    """desirable_weight 'auto': the weight that puts the weighted ratio in the middle of RECOMMENDED_RATIO,
    (lo + hi) / 2 * undesirable_weight * n_U / n_D."""
    if n_desirable == 0 or n_undesirable == 0:
        raise RecipeError(
            f"kto.desirable_weight: auto: the training rows are {n_desirable} desirable and {n_undesirable} undesirable; "
            "KTO needs both kinds"
        )
    return sum(RECOMMENDED_RATIO) / 2 * undesirable_weight * n_undesirable / n_desirable


def label_counts(dataset) -> tuple[int, int]:
    """(desirable, undesirable) rows of a dataset with a boolean `label` column."""
    desirable = sum(bool(x) for x in dataset["label"])
    return desirable, len(dataset) - desirable


def run(recipe: KTORecipe, inputs: dict, work_dir: Path) -> dict:
    o = recipe.kto
    # The demo's unpaired rows: its preference pairs, each one desirable and one undesirable row.
    tok = load_tokenizer(inputs["model"], recipe.model_options)
    train, held_out, counts = feedback_datasets(recipe, inputs, world.preset(recipe.world).preference_pairs, tok=tok)
    # TRL reads the training rows in order (the KL estimate pairs each row with its neighbour's reply):
    # shuffled once here, with the recipe's seed, so that a file sorted by prompt or by label mixes.
    train = train.shuffle(seed=recipe.seed)

    policy = load_causal_lm(inputs["model"], tok, recipe.model_options)
    check_fused_head(policy, "kto")  # TRL's KTOTrainer takes its log-probs from the fused LM head too
    if recipe.lora is not None:
        check_lora_targets(policy, recipe.lora)  # KTOTrainer adds the adapters itself
    ref_model, reference = reference_model(recipe, inputs, tok, o.reference)
    desirable_weight = o.desirable_weight
    if desirable_weight == "auto":
        desirable_weight = balanced_desirable_weight(*label_counts(train), o.undesirable_weight)

    args = trainer_args(
        recipe,
        work_dir,
        KTOConfig,
        beta=o.beta,
        loss_type=o.loss_type,
        desirable_weight=desirable_weight,
        undesirable_weight=o.undesirable_weight,
        precompute_ref_log_probs=o.reference == "precompute",
        precompute_ref_batch_size=o.precompute_batch_size,
    )
    trainer = KTOTrainer(
        model=policy,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tok,
        peft_config=lora_config(recipe.lora, "CAUSAL_LM") if recipe.lora is not None else None,
        callbacks=[MetricsFile(work_dir / "metrics.jsonl")],
    )
    ref_model = None  # the trainer holds it now (copy), or its log-probs only (precompute)
    if trainer.precompute_ref_logps:
        free_reference(trainer)
    max_length = recipe.training.max_length
    require_rows(len(train), trainer.train_dataset, "training rows", max_length)
    require_rows(len(held_out or ()), trainer.eval_dataset, "held-out rows", max_length)
    kept = pairs_after_filter(trainer, train, held_out, "prompt fills max_length", unit="rows")

    n_desirable, n_undesirable = label_counts(trainer.train_dataset)
    warning = balance_warning(n_desirable, n_undesirable, desirable_weight, o.undesirable_weight)
    if warning and trainer.is_world_process_zero():
        print(warning, flush=True)
    balance = {
        "desirable_rows": n_desirable,
        "undesirable_rows": n_undesirable,
        "desirable_weight": desirable_weight,
        "weighted_ratio": weighted_ratio(n_desirable, n_undesirable, desirable_weight, o.undesirable_weight),
    }
    summary = fit_and_save(trainer, tok, recipe, work_dir, evaluate=held_out is not None)
    return {**counts, **kept, **balance, "reference": reference, **summary, **last_logged(trainer, METRICS)}
