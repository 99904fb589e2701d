"""Pieces every training stage shares: trainer arguments, metric logging, the output card."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

from ..config import BaseRecipe, resolved_dict
from ..errors import RecipeError
from ..paths import replace_dir  # noqa: F401  (re-exported: the pipeline and the report use it)

# models (peft) and data (datasets) are imported inside the functions that use them, for start-up time:
# pipeline.plan imports this module before any stage runs.


def use_cpu() -> bool:
    return not torch.cuda.is_available()


def resolved_precision(recipe: BaseRecipe) -> str:
    """The precision a stage really trains in: the recipe's `training.mixed_precision` with
    'auto' resolved (bf16 on a GPU that supports it), and where that leaves full precision,
    the launcher's (`accelerate launch --mixed_precision`), which transformers applies then."""
    mode = recipe.training.mixed_precision
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mode == "no":
        mode = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return mode


def device_kind() -> str:
    """The hardware a stage computes on, as far as it changes the arithmetic: the GPU model, or
    on a CPU the kernel family torch dispatches to (AVX-512 and AVX2 kernels round differently;
    ATEN_CPU_CAPABILITY chooses one)."""
    if use_cpu():
        return f"cpu/{torch.backends.cpu.get_cpu_capability()}"
    return f"cuda/{torch.cuda.get_device_name()}"


def distributed_type(num_processes: int) -> str:
    """How the processes of a training stage share the work, as `accelerate launch` set it up
    (its environment): 'deepspeed', 'fsdp' (GPUs only: on a CPU accelerate trains as DDP),
    'ddp' for several processes, else 'single'."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not use_cpu():
        return "fsdp"
    return "ddp" if num_processes > 1 else "single"


def precision_flags(recipe: BaseRecipe) -> dict:
    """TrainingArguments' bf16/fp16 flags from the recipe's `training.mixed_precision`."""
    mode = resolved_precision(recipe)
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
        max_length=t.max_length,
        per_device_eval_batch_size=t.per_device_train_batch_size,
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


def checkpoint_step(checkpoint: str | Path) -> int:
    """N of `checkpoint-N`: the step (PPO: the iteration) it was saved at."""
    return int(Path(checkpoint).name.split("-")[-1])


def last_checkpoint(work_dir: Path) -> str | None:
    """Newest `checkpoint-N` of an interrupted run in `work_dir`, to resume from."""
    found = sorted((work_dir / "checkpoints").glob("checkpoint-*"), key=checkpoint_step)
    return str(found[-1]) if found else None


def drop_metrics_after(path: Path, step: int) -> None:
    """Before a resumed run logs again: remove the rows of `metrics.jsonl` past the checkpoint's
    `step` (the killed run logged them, the resumed one logs them anew) and a line cut off by the
    kill, so each step is there once. Main process only."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def write_card(out_dir: Path, recipe: BaseRecipe, base: str | None, summary: dict) -> None:
    """Model card (README.md with Hub metadata), so the directory explains itself; a dataset
    card for the `prep` stage."""
    if recipe.stage == "prep":
        _write_data_card(out_dir, summary)
        return
    task = "text-classification" if recipe.stage == "reward" else "text-generation"
    final_dir = out_dir.with_name(out_dir.name.removesuffix(".partial"))  # written before the rename
    meta = {"library_name": "transformers", "tags": ["alignment", recipe.stage], "pipeline_tag": task}
    if base and not Path(base).exists():
        meta["base_model"] = base
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {final_dir.name}",
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
        f'{"score" if recipe.stage == "reward" else "generate"} = pipeline("{task}", model="{final_dir}")',
        "```",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def _write_data_card(out_dir: Path, summary: dict) -> None:
    final_dir = out_dir.with_name(out_dir.name.removesuffix(".partial"))
    lines = [
        "---", "tags: [alignment, prep]", "---", "", f"# {final_dir.name}", "",
        "Data prepared by the `prep` stage of the alignment toolkit (data_prep): train/test JSONL and Parquet "
        "in the canonical conversational form; `summary.json` accounts for every row read.", "",
        "| count | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in summary.items()), "",
        "```python", "from datasets import load_dataset",
        f'ds = load_dataset("json", data_files={{"train": "{final_dir}/train.jsonl"}})', "```", "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def write_resolved(out_dir: Path, recipe: BaseRecipe, upstream: dict) -> None:
    data = resolved_dict(recipe)
    data["resolved_inputs"] = upstream
    (out_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def train_causal_lm(recipe: BaseRecipe, inputs: dict, work_dir: Path, dataset, count=None, tok=None,
                    **sft_options) -> dict:
    """Fine-tune a causal LM on `dataset` with TRL's SFTTrainer and save it to `work_dir`.

    Shared by `pretrain` and `sft`, both of which hand it pre-tokenised rows (`input_ids`, and for
    sft the `assistant_masks` TRL builds the labels from); `tok` is the tokenizer they used (loaded
    here when not given). Returns the final training metrics, after `count(trainer, tok)`'s counts
    of what the trainer's data preparation did (it runs before training).
    """
    from trl import SFTConfig, SFTTrainer

    from ..models import apply_lora, load_causal_lm, load_tokenizer

    tok = tok if tok is not None else load_tokenizer(inputs["model"], recipe.model_options)
    model = load_causal_lm(inputs["model"], tok, recipe.model_options)
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora)
    args = trainer_args(recipe, work_dir, SFTConfig, **sft_options)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[MetricsFile(work_dir / "metrics.jsonl")],
    )
    counts = count(trainer, tok) if count else {}
    return {**counts, **fit_and_save(trainer, tok, recipe, work_dir)}


def fit_and_save(trainer, tok, recipe: BaseRecipe, work_dir: Path, evaluate: bool = False) -> dict:
    """Train (resuming from the last checkpoint in `work_dir`), evaluate on the held-out set
    if asked, save the model on the main process; return the summary every stage reports."""
    from ..models import save_model

    # Under accelerate's FSDP (GPUs) each process holds a shard of the weights: Trainer.save_model gathers
    # the full state dict (every process takes part) and the main process writes it. Merging LoRA adapters
    # into the base would need the whole model on one process, so that case is refused before training.
    sharded = getattr(trainer, "is_fsdp_enabled", False)
    if sharded and recipe.lora is not None and recipe.lora.merge_on_save:
        raise RecipeError(
            "lora.merge_on_save: under FSDP the trainer stages save the adapter only (merging needs the whole "
            "model on one process); set lora.merge_on_save: false, or train without FSDP"
        )
    resume = last_checkpoint(work_dir)
    if resume and trainer.is_world_process_zero():
        drop_metrics_after(work_dir / "metrics.jsonl", checkpoint_step(resume))
    result = trainer.train(resume_from_checkpoint=resume)
    held_out = trainer.evaluate() if evaluate else {}
    if sharded:
        trainer.save_model(str(work_dir))
        if trainer.is_world_process_zero():
            tok.save_pretrained(work_dir)
    elif trainer.is_world_process_zero():
        save_model(trainer.model, tok, work_dir, recipe.lora)
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": result.training_loss,
        "first_logged_loss": history[0] if history else float("nan"),
        "last_logged_loss": history[-1] if history else float("nan"),
        "steps": result.global_step,
        "steps_per_second": result.metrics.get("train_steps_per_second", float("nan")),
        "resumed_from": Path(resume).name if resume else "",
        **{k: v for k, v in held_out.items() if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))},
    }


def require_rows(before: int, dataset, what: str, max_length: int) -> None:
    """Stop before training when the trainer's length filter left none of `before` rows."""
    if before and dataset is not None and len(dataset) == 0:
        raise RecipeError(
            f"training.max_length: {max_length}: all {before} {what} were dropped (the trainer drops those that "
            "do not fit in max_length tokens); raise training.max_length"
        )


def last_logged(trainer, keys: tuple[str, ...]) -> dict:
    """The last logged training value of each key (e.g. the final rewards/margins)."""
    found = {}
    for record in trainer.state.log_history:
        found.update({k: record[k] for k in keys if k in record})
    return found


# --------------------------------------------------------------------------- preference data


def split_rows(recipe, inputs: dict, demo, parse):
    """Load the recipe's rows, parse them with `parse(found) -> Rows` (data_prep's parser for the
    stage's shape), check them, and split them: a prep stage's output (`data.source: {from: prep.yaml}`,
    or its directory) brings its own held-out split; otherwise about `data.eval_examples` rows are held
    out by prompt hash. Returns (train Rows, held-out Rows or None)."""
    from data_prep.read import looks_like_path

    from ..data import check_rows, hold_out, load_rows

    d = recipe.data
    source = inputs.get("data", d.source)
    rows = check_rows(parse(load_rows(d, demo, source=source)), lambda row: None, d.on_bad_row)
    prep_dir = source != "demo" and looks_like_path(source) and (Path(source) / "summary.json").is_file()
    if prep_dir and (Path(source) / "test.jsonl").is_file():
        held = check_rows(parse(load_rows(d, demo, source=source, split="test")), lambda row: None,
                          d.on_bad_row) if (Path(source) / "test.jsonl").stat().st_size else None
        return rows, held
    return hold_out(rows, d.eval_examples)


def preference_datasets(recipe, inputs: dict, demo, with_margin: bool = False, tok=None):
    """Load, parse, check and split the recipe's preference rows (reward and dpo stages).

    Rows are read by data_prep's reader and parsed by its shape parser: explicit pairs (text or
    chat messages), implicit-prompt transcripts, or data_prep's canonical output; split as
    `split_rows` says.

    Returns (train, held_out or None, counts): datasets in TRL's conversational preference
    format, and the row counts (dropped rows by reason included). With `with_margin`, a margin
    column the data carries (`data.margin_field`) is checked and kept as `margin`. With `tok`, every
    pair is checked against its chat template (`data.fit_to_template`: a refused system turn merged or
    dropped as `data.system_message` says and counted under changed/..., a pair it still cannot render
    reported by file and row or dropped and counted).
    """
    from datasets import Dataset

    from ..data import has_column, preference_rows

    d = recipe.data
    margin = None

    def parse(found):
        nonlocal margin
        if with_margin and margin is None and has_column(found, d.margin_field):
            margin = d.margin_field
        return preference_rows(found, d, margin)

    train, held = split_rows(recipe, inputs, demo, parse)
    changed: Counter = Counter()
    if tok is not None:
        from ..data import fit_to_template

        train, changed = fit_to_template(train, tok, d.system_message, d.on_bad_row, "prompt", ("chosen", "rejected"))
        if held is not None and len(held):
            held, held_changed = fit_to_template(held, tok, d.system_message, d.on_bad_row, "prompt",
                                                 ("chosen", "rejected"))
            changed.update(held_changed)

    def to_dataset(found):
        columns = {k: [r[k] for r in found.rows] for k in ("prompt", "chosen", "rejected")}
        if margin:
            columns["margin"] = [float(r["margin"]) for r in found.rows]
        return Dataset.from_dict(columns)

    counts = {
        "train_pairs": len(train),
        **({"margin_column": margin} if margin else {}),
        **{f"dropped/{k}": v for k, v in train.dropped.items()},
        **{f"changed/{k}": v for k, v in changed.items()},
    }
    return to_dataset(train), (to_dataset(held) if held is not None and len(held) else None), counts


def feedback_datasets(recipe, inputs: dict, demo, tok=None):
    """Load, parse, check and split the recipe's unpaired feedback rows (kto stage): prompt / completion
    / label rows, or pairs split into a desirable and an undesirable row (data.unpaired_rows), split as
    `split_rows` says. Returns (train, held_out or None, counts), datasets in TRL's conversational
    unpaired preference format (prompt, completion, label). With `tok`, roles are fitted to its chat
    template as for preference pairs (`data.fit_to_template`, counted under changed/...)."""
    from datasets import Dataset

    from ..data import fit_to_template, unpaired_rows

    d = recipe.data
    train, held = split_rows(recipe, inputs, demo, lambda found: unpaired_rows(found, recipe.data))
    changed: Counter = Counter()
    if tok is not None:
        train, changed = fit_to_template(train, tok, d.system_message, d.on_bad_row, "prompt", ("completion",))
        if held is not None and len(held):
            held, held_changed = fit_to_template(held, tok, d.system_message, d.on_bad_row, "prompt", ("completion",))
            changed.update(held_changed)

    def to_dataset(found):
        return Dataset.from_dict({k: [r[k] for r in found.rows] for k in ("prompt", "completion", "label")})

    counts = {"train_rows": len(train), **{f"dropped/{k}": v for k, v in train.dropped.items()},
              **{f"changed/{k}": v for k, v in changed.items()}}
    return to_dataset(train), (to_dataset(held) if held is not None and len(held) else None), counts


def reference_path(recipe, inputs: dict) -> str:
    """The reference policy's path (dpo, kto): `ref_model` if set (a path, or a recipe's output), else `model`."""
    from ..config import FromRecipe

    if isinstance(recipe.ref_model, FromRecipe):
        return inputs["ref_model"]
    return recipe.ref_model or inputs["model"]


def reference_model(recipe, inputs: dict, tok, mode: str):
    """The frozen reference of a preference stage (dpo, kto) and how it is described in the summary:
    with LoRA and the starting model as reference, none (the policy with its adapters disabled); with
    'precompute' and the starting model, none (the trainer computes the log-probs before training);
    else a separately loaded frozen copy (eval mode, no gradients)."""
    from ..models import load_causal_lm

    ref_path = reference_path(recipe, inputs)
    if recipe.lora is not None and ref_path == inputs["model"]:
        return None, f"{mode}: adapters disabled"
    if mode == "precompute" and ref_path == inputs["model"]:
        return None, "precompute: starting model"
    model = load_causal_lm(ref_path, tok, recipe.model_options, key="ref_model").eval().requires_grad_(False)
    return model, f"{mode}: {ref_path}"


def free_reference(trainer) -> None:
    """After a precompute pass the reference's log-probs are in the datasets: free the model.

    Accelerate keeps every model it prepared (the reference, here) in its list of models;
    `free_memory` empties that list. It runs before training, when nothing else is prepared yet.
    """
    trainer.ref_model = None
    trainer.accelerator.free_memory()


def pairs_after_filter(trainer, train, held_out, reason: str, unit: str = "pairs") -> dict:
    """Pairs (kto: rows, `unit`) the trainer kept after its own length filter, train and held-out, and
    the drops by reason.

    Counted from the trainer's datasets, so `eval_pairs` is what is really scored (call
    `require_rows` first: no pair left is a one-line error rather than a sampler traceback).
    """
    kept = len(trainer.train_dataset)
    held = len(trainer.eval_dataset) if held_out is not None else 0
    return {
        f"train_{unit}": kept,
        f"eval_{unit}": held,
        f"dropped/{reason}": len(train) - kept,
        f"dropped/held-out, {reason}": (len(held_out) - held) if held_out is not None else 0,
    }
