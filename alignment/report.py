"""The closing report of a run: what each stage changed, measured with the gold oracle.

After the last stage, the models the recipe's `report.models` names (label -> recipe name in
the chain, or a model path) answer the same held-out demo prompts; the report prints each
model's mean gold score with a 95% bootstrap CI, the paired difference between consecutive
models with its CI, and the last stage's own metrics. It is also written to
`<output_dir>/report.json` and `report.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .compare import evaluate, gold_table
from .config import RecipeError, ReportOptions
from .models import check_model_kind
from .demo import world


def resolve_models(options: ReportOptions, nodes: list) -> tuple[dict[str, str], list[str]]:
    """Label -> model directory for the report, and a note for each label that is left out
    (its recipe is not part of this run, e.g. after `model=...` replaced the chain)."""
    by_name = {node.name: node for node in nodes}
    models, notes = {}, []
    for label, target in options.models.items():
        if target in by_name and by_name[target].recipe.stage == "reward":
            raise RecipeError(f"report.models.{label}: '{target}' is a reward model; the report compares policies")
        if target in by_name:
            models[label] = str(by_name[target].out_dir)
        elif Path(target).is_dir():
            check_model_kind(target, "causal-lm", key=f"report.models.{label}")
            models[label] = target
        else:
            names = ", ".join(by_name)
            notes.append(f"report: '{label}' left out: '{target}' is neither a recipe in this run ({names}) nor a model directory")
    return models, notes


def build_report(options: ReportOptions, nodes: list, models: dict[str, str]) -> str:
    prompts = world.eval_prompts(options.num_prompts, options.seed)
    results = evaluate(
        models, prompts, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
        seed=options.seed, batch_size=options.batch_size,
    )
    top = nodes[-1]
    summary = json.loads((top.out_dir / "run_info.json").read_text()).get("summary", {})
    metrics = "\n".join(
        f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in summary.items()
    )
    examples = []
    for i, prompt in enumerate(prompts[:3]):
        examples.append(f"  {prompt}")
        for label in models:
            gen, score = results[label]["generations"][i], results[label]["scores"][i]
            cut = "" if gen.finished else " (no EOS)"
            examples.append(f"    {label:>8}: {gen.text!r}{cut}  gold {score:.2f}")
    text = (
        f"Gold score on {len(prompts)} held-out demo prompts "
        f"(temperature {options.temperature:g}, at most {options.max_new_tokens} new tokens):\n"
        f"{gold_table(results, list(models))}\n\n"
        f"{top.name} ({top.recipe.stage}) metrics:\n{metrics}\n\n"
        "Examples:\n" + "\n".join(examples) + "\n"
    )
    record = {
        label: {k: r[k] for k in ("gold_mean", "gold_lo", "gold_hi", "eos_rate")} | {"model": models[label]}
        for label, r in results.items()
    }
    (top.out_dir / "report.json").write_text(json.dumps({"models": record, "stage_summary": summary}, indent=2))
    (top.out_dir / "report.md").write_text("```\n" + text + "```\n")
    return text
