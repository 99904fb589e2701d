"""Stage `dpo`: direct preference optimisation (DPO, IPO, SLiC hinge, SimPO).

The policy starts from `model` (usually the SFT output) and learns from prompt / chosen /
rejected pairs, rendered with the chat template, to raise the log-probability of chosen
replies relative to rejected ones, measured against a frozen reference policy (`ref_model`,
by default the starting model). The loss is `losses.dpo_loss` or, for the reference-free
SimPO, `losses.simpo_loss`. Where the reference log-probs come from (`dpo.reference`):

* copy       - a frozen copy of the reference (eval mode, no gradients) runs beside the policy;
* precompute - one pass computes them for every pair before training, then the reference is
               gone: no second model in memory and no reference forward per step;
* with LoRA (and the starting model as reference) the reference is the policy with its
  adapters disabled, in either mode: no second copy at all.

TRL's DPOTrainer does the data work (chat template, prompt/completion masks, padding),
the reference bookkeeping above, the loop, checkpoints and logging. We subclass it at its
loss hook, `compute_loss`, so that our pure losses drive it rather than TRL's 330-line
loss method. The metrics (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`, `logps/chosen`, `logps/rejected`) go to metrics.jsonl, and the held-out
pairs (`data.eval_examples`) are scored at the end as `eval_*`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer

from ..config import DPOOptions, DPORecipe
from ..demo import world
from ..generation import check_fused_head
from ..losses import dpo_loss, simpo_loss
from ..models import check_lora_targets, load_causal_lm, load_tokenizer, lora_config
from .common import (
    MetricsFile,
    fit_and_save,
    free_reference,
    last_logged,
    pairs_after_filter,
    preference_datasets,
    reference_model,
    require_rows,
    trainer_args,
)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class PreferenceTrainer(DPOTrainer):
    """DPOTrainer whose loss is `losses.dpo_loss` / `losses.simpo_loss`.

    Each batch holds the chosen sequences in its first half and the rejected ones in its
    second; `completion_mask` marks the reply tokens. With `precompute`, the batch also
    carries `ref_chosen_logps` / `ref_rejected_logps`. Metrics are kept per pair, so the
    logged values are exact means over the pairs seen.
    """

    def __init__(self, *args, options: DPOOptions, **kwargs):
        self.options = options  # read by _precompute_ref_logps, which runs inside __init__
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # SimPO has no reference. The stage asks TRL to "precompute" so that TRL loads no
        # reference model, and the pass itself is skipped here.
        if self.options.loss_type == "simpo":
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _reply_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of each reply under `model`, and each reply's token count."""
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        # TRL's fused LM head returns per-token log-probs of `labels` without building the logits.
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            use_cache=False,
            fused_lm_head=True,
        )
        reply_mask = mask[:, 1:]
        token_logps = out.log_probs[:, -reply_mask.size(1) :]
        return (token_logps * reply_mask).sum(1), reply_mask.sum(1).clamp_min(1)

    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        # TRL's reference pass: the frozen copy, or this model with its adapters disabled; no grad.
        return self.compute_ref_log_probs(self.ref_model or model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        o = self.options
        logps, n_tokens = self._reply_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = n_tokens.chunk(2)
        if o.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                chosen / n_chosen, rejected / n_rejected, o.beta, o.simpo_gamma_beta_ratio, o.label_smoothing
            )
        else:
            ref_chosen, ref_rejected = self._reference_logps(model, inputs)
            policy = (chosen, rejected)
            reference = (ref_chosen, ref_rejected)
            if o.loss_type == "ipo":  # IPO compares per-token averages (Azar et al. 2023)
                policy = (chosen / n_chosen, rejected / n_rejected)
                reference = (ref_chosen / n_chosen, ref_rejected / n_rejected)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                *policy, *reference, o.beta, o.loss_type, o.label_smoothing
            )
        self._record(chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())
        loss = losses.mean()
        return (loss, None) if return_outputs else loss

    def _record(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> None:
        mode = "train" if self.model.training else "eval"
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps,
        }
        for name, value in values.items():
            self._metrics[mode][name].extend(self.accelerator.gather_for_metrics(value.float()).tolist())


def truncated_pairs(dataset, max_length: int) -> int:
    """Pairs whose longer reply does not fit in max_length: the collator cuts it (and its EOS)."""
    columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
    return sum(len(p) + max(len(c), len(r)) > max_length for p, c, r in columns)


def run(recipe: DPORecipe, inputs: dict, work_dir: Path) -> dict:
    o = recipe.dpo
    pairs = world.preset(recipe.world).preference_pairs
    tok = load_tokenizer(inputs["model"], recipe.model_options)
    train, held_out, counts = preference_datasets(recipe, inputs, pairs, tok=tok)
    policy = load_causal_lm(inputs["model"], tok, recipe.model_options)
    check_fused_head(policy, "dpo")
    if recipe.lora is not None:
        check_lora_targets(policy, recipe.lora)  # DPOTrainer adds the adapters itself

    # The reference: nothing (SimPO), the policy minus its adapters (LoRA), the starting policy
    # itself before training (precompute), or a separately loaded frozen model.
    if o.loss_type == "simpo":
        ref_model, reference = None, "none (simpo)"
    else:
        ref_model, reference = reference_model(recipe, inputs, tok, o.reference)

    args = trainer_args(
        recipe,
        work_dir,
        DPOConfig,
        beta=o.beta,
        precompute_ref_log_probs=o.reference == "precompute" or o.loss_type == "simpo",
        precompute_ref_batch_size=o.precompute_batch_size,
    )
    trainer = PreferenceTrainer(
        model=policy,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tok,
        peft_config=lora_config(recipe.lora, "CAUSAL_LM") if recipe.lora is not None else None,
        callbacks=[MetricsFile(work_dir / "metrics.jsonl")],
        options=o,
    )
    ref_model = None  # the trainer holds it now (copy), or its log-probs only (precompute)
    if trainer.precompute_ref_logps:
        free_reference(trainer)
    max_length = recipe.training.max_length
    require_rows(len(train), trainer.train_dataset, "training pairs", max_length)
    require_rows(len(held_out or ()), trainer.eval_dataset, "held-out pairs", max_length)
    too_long = {
        **pairs_after_filter(trainer, train, held_out, "prompt fills max_length"),
        "truncated_pairs": truncated_pairs(trainer.train_dataset, recipe.training.max_length),
    }
    summary = fit_and_save(trainer, tok, recipe, work_dir, evaluate=held_out is not None)
    return {**counts, **too_long, "reference": reference, **summary, **last_logged(trainer, METRICS)}
