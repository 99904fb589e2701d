"""Stage `reward`: a Bradley-Terry reward model trained on preference pairs.

A one-label sequence classifier, initialised from `model` (usually the SFT output), scores a
conversation (user prompt + assistant reply, rendered with the chat template) at its last
non-pad token, the EOS that closes the reply. It learns s(chosen) > s(rejected) with
`losses.bradley_terry_loss`; a per-pair margin column in the data and `reward.center_coef`
enter that loss. About `data.eval_examples` pairs (whole prompts, chosen by a fixed hash) are
held out: their accuracy (how often s(chosen) > s(rejected)) and mean margin
s(chosen) - s(rejected) end the run.

TRL's RewardTrainer does the data work (chat template, padding chosen and rejected into one
batch, margins), the loop, checkpoints and logging; we subclass it at its loss hook,
`compute_loss`, so that our pure loss drives it rather than TRL's inline formula.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import RewardConfig, RewardTrainer

from ..config import RewardRecipe
from ..demo import world
from ..losses import bradley_terry_loss
from ..models import apply_lora, load_classifier, load_tokenizer
from .common import MetricsFile, fit_and_save, pairs_after_filter, preference_datasets, require_rows, trainer_args

DEFAULT_EXAMPLES = 4000


class BradleyTerryTrainer(RewardTrainer):
    """RewardTrainer whose loss is `losses.bradley_terry_loss`.

    Each batch holds the chosen conversations in its first half and the rejected ones in its
    second (plus `margin` when the data has one). Metrics are kept per pair, so the logged
    accuracy and margin are exact means over the pairs seen, not means of batch means.
    """

    def __init__(self, *args, center_coef: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.center_coef = center_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_coef).mean()

        with torch.no_grad():
            gap = self.accelerator.gather_for_metrics(chosen - rejected).float()
            scores = self.accelerator.gather_for_metrics(torch.cat([chosen, rejected])).float()
            self._metrics[mode]["accuracy"].extend((gap > 0).float().tolist())
            self._metrics[mode]["margin"].extend(gap.tolist())
            self._metrics[mode]["mean_reward"].extend(scores.tolist())
        return (loss, outputs) if return_outputs else loss


def run(recipe: RewardRecipe, inputs: dict, work_dir: Path) -> dict:
    train, held_out, counts = preference_datasets(
        recipe, inputs, world.preset(recipe.world).preference_pairs, DEFAULT_EXAMPLES, with_margin=True
    )

    tok = load_tokenizer(inputs["model"], recipe.model_options)
    model = load_classifier(inputs["model"], tok, recipe.model_options)
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora, task_type="SEQ_CLS")

    args = trainer_args(
        recipe,
        work_dir,
        RewardConfig,
    )
    trainer = BradleyTerryTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tok,
        callbacks=[MetricsFile(work_dir / "metrics.jsonl")],
        center_coef=recipe.reward.center_coef,
    )
    max_length = recipe.training.max_length
    require_rows(len(train), trainer.train_dataset, "training pairs", max_length)
    require_rows(len(held_out or ()), trainer.eval_dataset, "held-out pairs", max_length)
    too_long = pairs_after_filter(trainer, train, held_out, "longer than max_length")
    summary = fit_and_save(trainer, tok, recipe, work_dir, evaluate=held_out is not None)
    return {**counts, **too_long, **summary}
