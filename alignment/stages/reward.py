"""Stage `reward`: a Bradley-Terry reward model trained on preference pairs.

A one-label sequence classifier, initialised from `model` (usually the SFT output), scores an
exchange (user prompt + assistant reply, in the form below) through its own pooling: a decoder
classifier at its last non-pad token, the last token of the template's turn-closing text. It learns s(chosen) > s(rejected) with
`losses.bradley_terry_loss`; a per-pair margin column in the data and `reward.center_coef`
enter that loss. About `data.eval_examples` pairs (whole prompts, chosen by a fixed hash) are
held out: their accuracy (how often s(chosen) > s(rejected)) and mean margin
s(chosen) - s(rejected) end the run.

Each reply is given to the model as `templates.reward_ids` renders it (the prompt with the
generation prompt, the reply's own text, the template's turn-closing text; the plain text-pair
form for a classifier without a chat template): the form the RL stages and `compare` score it in,
so the model is read where it was trained. TRL's RewardTrainer gets these ids pre-tokenised and
does the rest (padding chosen and rejected into one batch, margins, length filter), the loop,
checkpoints and logging; we subclass it at its loss hook, `compute_loss`, so that our pure loss
drives it rather than TRL's inline formula.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import RewardConfig, RewardTrainer

from ..config import RewardRecipe
from ..errors import RecipeError
from ..demo import world
from ..losses import bradley_terry_loss
from ..models import apply_lora, is_classifier, load_classifier, load_tokenizer
from ..templates import reward_pair_ids
from .common import MetricsFile, fit_and_save, pairs_after_filter, preference_datasets, require_rows, trainer_args


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


def tokenized_pairs(tok, dataset, which: str):
    """The pairs as RewardTrainer's pre-tokenised rows: chosen_ids, rejected_ids (`templates.reward_pair_ids`)
    and the margin when there is one. A pair the chat template cannot render is one line naming it."""
    if dataset is None:
        return None
    from datasets import Dataset
    from jinja2 import TemplateError

    columns = {"chosen_ids": [], "rejected_ids": [], **({"margin": []} if "margin" in dataset.column_names else {})}
    for i, row in enumerate(dataset):
        try:
            ids = reward_pair_ids(tok, row)
        except TemplateError as exc:
            raise RecipeError(f"data: {which} pair {i} (prompt {str(row['prompt'])[:60]!r}): the chat template refuses "
                              f"it ({exc})") from None
        for key in columns:
            columns[key].append(ids[key] if key in ids else row[key])
    return Dataset.from_dict(columns)


def run(recipe: RewardRecipe, inputs: dict, work_dir: Path) -> dict:
    # a causal LM without a chat template gets the toolkit's (saved with the model); a classifier keeps the
    # plain form it was trained on
    tok = load_tokenizer(inputs["model"], recipe.model_options,
                         fallback_template=not is_classifier(inputs["model"], recipe.model_options))
    train, held_out, counts = preference_datasets(
        recipe, inputs, world.preset(recipe.world).preference_pairs, with_margin=True, tok=tok
    )
    train, held_out = tokenized_pairs(tok, train, "training"), tokenized_pairs(tok, held_out, "held-out")
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
