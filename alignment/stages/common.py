"""Pieces every training stage shares: trainer arguments, metric logging, the output card."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

from ..config import BaseRecipe, resolved_dict


def use_cpu() -> bool:
    return not torch.cuda.is_available()


def precision_flags(recipe: BaseRecipe) -> dict:
    """TrainingArguments' bf16/fp16 flags from the recipe's `training.mixed_precision`."""
    mode = recipe.training.mixed_precision
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


def trainer_args(recipe: BaseRecipe, work_dir: Path, config_cls, **stage_specific):
    """Build a TRL/transformers config from the recipe's `training` section.

    The recipe's training keys carry TrainingArguments' own names, so they pass through;
    the rest is what every stage wants: CPU fallback (gloo across processes), no
    checkpoint unless asked, metrics to the trackers the recipe names.
    """
    t = recipe.training
    passthrough = t.model_dump(exclude={"max_length", "mixed_precision", "save_steps", "report_to"})
    return config_cls(
        output_dir=str(work_dir / "checkpoints"),
        seed=recipe.seed,
        use_cpu=use_cpu(),
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        report_to=t.report_to or "none",
        **_checkpointing_flag(config_cls, recipe.model_options.gradient_checkpointing),
        disable_tqdm=False,
        logging_first_step=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        **precision_flags(recipe),
        **passthrough,
        **stage_specific,
    )


def _checkpointing_flag(config_cls, enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


class MetricsFile(TrainerCallback):
    """Append every logged metric dict to `metrics.jsonl` (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_metrics(self.path, {"step": state.global_step, **logs})


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def last_checkpoint(work_dir: Path) -> str | None:
    """Newest `checkpoint-N` of an interrupted run in `work_dir`, to resume from."""
    found = sorted((work_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def write_card(out_dir: Path, recipe: BaseRecipe, base: str | None, summary: dict) -> None:
    """Model card (README.md with Hub metadata), so the directory explains itself."""
    meta = {"library_name": "transformers", "tags": ["alignment", recipe.stage], "pipeline_tag": "text-generation"}
    if base and not Path(base).exists():
        meta["base_model"] = base
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {out_dir.name}",
        "",
        f"Stage `{recipe.stage}` of the alignment toolkit, started from `{base or 'scratch'}`.",
        "The exact recipe is in `recipe.resolved.yaml`; every logged metric in `metrics.jsonl`.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()),
        "",
        "Load it with `transformers` alone:",
        "",
        "```python",
        "from transformers import pipeline",
        f'generate = pipeline("text-generation", model="{out_dir}")',
        "```",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def write_resolved(out_dir: Path, recipe: BaseRecipe, upstream: dict) -> None:
    data = resolved_dict(recipe)
    data["resolved_inputs"] = upstream
    (out_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def train_causal_lm(recipe: BaseRecipe, inputs: dict, work_dir: Path, dataset, **sft_options) -> dict:
    """Fine-tune a causal LM on `dataset` with TRL's SFTTrainer and save it to `work_dir`.

    Shared by `pretrain` (pre-tokenised blocks) and `sft` (conversations); returns the
    final training metrics.
    """
    from trl import SFTConfig, SFTTrainer

    from ..models import apply_lora, load_causal_lm, load_tokenizer, save_model

    tok = load_tokenizer(inputs["model"], recipe.model_options)
    model = load_causal_lm(inputs["model"], tok, recipe.model_options)
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora)
    args = trainer_args(recipe, work_dir, SFTConfig, max_length=recipe.training.max_length, **sft_options)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[MetricsFile(work_dir / "metrics.jsonl")],
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    if trainer.is_world_process_zero():
        save_model(trainer.model, tok, work_dir, recipe.lora)
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": result.training_loss,
        "first_logged_loss": history[0] if history else float("nan"),
        "last_logged_loss": history[-1] if history else float("nan"),
        "steps": result.global_step,
    }
