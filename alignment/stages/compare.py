"""Stage `compare` and the `alignment compare` command: models answer the same prompts under
the same seed; replies are scored (gold oracle on demo prompts, reward model if given), and
the report (report.html, report.md, samples.jsonl, summary.json) shows scores with CIs, win
rates, KL to the baseline and reply lengths.

As a stage, its models are recipe references (`models: {sft: {from: sft.yaml}, ...}`), built
first when needed; as a command, they are paths, hub ids or recipe files already run.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pydantic import ValidationError

from ..config import CompareRecipe, GenerationOptions, PromptOptions
from ..errors import RecipeError
from ..demo.world import PRESETS
from ..formatting import title
from ..paths import user_path

# evaluation (torch), report (plotly) and pipeline are imported inside the functions that run a
# comparison, for start-up time: `alignment --help` and a bad flag answer without loading them.

MAIN_PROCESS_ONLY = True  # generation runs once, on the main process
WRITES_MODEL = False  # the output is a report, not a model: no model card

# How each argument of compare_models is spelled on the command line and in a recipe.
FLAGS = {"models": "MODEL", "baseline": "--baseline", "prompts": "--prompts", "split": "--split",
         "reward_model": "--reward-model", "out": "--out"}
KEYS = {"prompts": "prompts.source", "split": "prompts.split"}


def _compare(models, prompts_options, generation, baseline, reward_model, model_options=None, world="default"):
    from ..evaluation import compare_models, load_prompts

    prompts, source = load_prompts(prompts_options, world)
    return compare_models(models, prompts, generation, baseline=baseline, reward_model=reward_model,
                          prompt_source=source, model_options=model_options)


def _flat(summary: dict) -> dict:
    """The numbers a run's summary (run_info.json, metrics.jsonl) keeps: label/metric."""
    keep = ("gold_mean", "reward_mean", "kl_mean", "eos_rate", "length_mean")
    return {f"{label}/{k}": m[k] for label, m in summary["models"].items() for k in keep if m.get(k) is not None}


def run(recipe: CompareRecipe, inputs: dict, work_dir: Path) -> dict:
    from ..evaluation import CompareError
    from ..report import text_table, write_outputs

    models = {label: inputs[f"models.{label}"] for label in recipe.models}
    try:
        comparison = _compare(
            models, recipe.prompts, recipe.generation, recipe.baseline or next(iter(models)),
            inputs.get("reward_model"), recipe.model_options, recipe.world,
        )
    except CompareError as exc:
        raise RecipeError(f"{recipe._path}: {KEYS.get(exc.arg, exc.arg)}: {exc.message}") from None
    write_outputs(comparison, work_dir, heading=f"Comparison: {work_dir.name.removesuffix('.partial')}")
    print(f"{title(comparison.summary)}:\n{text_table(comparison.summary)}")
    return _flat(comparison.summary)


# --------------------------------------------------------------------------- the command


EXAMPLES = """\
examples:
  alignment compare runs/sft runs/dpo                      # demo prompts, gold oracle; baseline: the first
  alignment compare base=runs/pretrain sft=runs/sft dpo=recipes/dpo.yaml --baseline sft
  alignment compare Qwen/Qwen2.5-0.5B-Instruct ./my-dpo --prompts prompts.jsonl \\
      --reward-model ./my-rm --samples-per-prompt 4 --max-new-tokens 256 --out runs/compare-qwen

MODEL is [LABEL=]PATH, a hub id, or a recipe file whose output is built (LABEL defaults to the
directory or recipe name). Writes OUT/report.html (plots, replies side by side), report.md,
samples.jsonl and summary.json, and prints the summary table. Bad input: a one-line error
naming the argument, exit status 2, nothing written.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gen, prompts = GenerationOptions.model_fields, PromptOptions.model_fields
    parser.add_argument("models", nargs="+", metavar="MODEL", help="[LABEL=]path, hub id or recipe.yaml; two or more")
    parser.add_argument("--baseline", metavar="LABEL", help="model KL and win rates are measured against (default: the first)")
    parser.add_argument("--prompts", default=prompts["source"].default, metavar="SOURCE", help=prompts["source"].description)
    parser.add_argument("--num-prompts", type=int, default=prompts["num_prompts"].default, metavar="N",
                        help="demo prompts to use, or the first N of a file; 0: all of a file (default: %(default)s)")
    parser.add_argument("--prompt-field", default=prompts["field"].default, help=prompts["field"].description)
    parser.add_argument("--split", default=prompts["split"].default, help=prompts["split"].description)
    parser.add_argument("--world", default="default", choices=tuple(PRESETS),
                        help="preset of the demo world the demo prompts come from (default: %(default)s)")
    parser.add_argument("--reward-model", metavar="PATH", help="a one-label sequence classifier that scores every reply")
    for name, metavar in (("temperature", "T"), ("top_p", "P"), ("max_new_tokens", "N"), ("samples_per_prompt", "N"),
                          ("seed", "S"), ("batch_size", "B")):
        field = gen[name]
        parser.add_argument(f"--{name.replace('_', '-')}", type=field.annotation, default=field.default,
                            metavar=metavar, help=f"{field.description} (default: %(default)s)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    parser.add_argument("--out", default="runs/compare", help="output directory (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parse_model(arg: str) -> tuple[str | None, str]:
    match = re.fullmatch(r"([\w.-]+)=(.+)", arg)
    return (match[1], match[2]) if match else (None, arg)


def _resolve(spec: str) -> tuple[str, str]:
    """(default label, model path or hub id) of a MODEL argument."""
    spec = user_path(spec)
    if spec.endswith((".yaml", ".yml")):
        from ..evaluation import CompareError
        from ..pipeline import is_current, plan

        if not Path(spec).is_file():
            raise CompareError("models", f"{spec}: no such recipe")
        node = plan(spec)[-1]
        if not is_current(node):
            raise CompareError("models", f"{spec}: its output {node.out_dir} is not built (or out of date); "
                               f"run `alignment run {spec}` first")
        return node.name, str(node.out_dir)
    return Path(spec.rstrip("/")).name or spec, spec


def command(args: argparse.Namespace) -> int:
    from ..evaluation import CompareError

    try:
        comparison, out = _command(args)
    except CompareError as exc:
        raise RecipeError(f"{FLAGS.get(exc.arg, exc.arg)}: {exc.message}") from None
    from ..report import text_table

    print(f"{title(comparison.summary)}:\n{text_table(comparison.summary)}\n\nreport: {out / 'report.html'}")
    return 0


def _command(args: argparse.Namespace):
    from ..evaluation import CompareError
    from ..report import check_out_dir, write_report_dir

    models: dict[str, str] = {}
    for arg in args.models:
        label, spec = _parse_model(arg)
        default_label, path = _resolve(spec)
        label = label or default_label
        if label in models:
            raise CompareError("models", f"two models are labelled {label!r}; name them LABEL=PATH")
        models[label] = path
    if len(models) < 2:
        raise CompareError("models", f"need at least two models to compare, got {len(models)}")
    baseline = args.baseline or next(iter(models))
    if baseline not in models:
        raise CompareError("baseline", f"{baseline!r} is not a model label ({', '.join(models)})")
    out = Path(user_path(args.out))
    check_out_dir(out)  # before any generation: a bad place found after hours of it would waste them
    try:
        generation = GenerationOptions(
            temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples_per_prompt, seed=args.seed,
            batch_size=args.batch_size,
        )
        prompts = PromptOptions(source=args.prompts, num_prompts=args.num_prompts or None, field=args.prompt_field,
                                split=args.split)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "samples_per_prompt"  # the one cross-field check
        message = err["msg"].removeprefix("Value error, ")
        raise CompareError(f"--{name.replace('_', '-')}", message) from None
    from ..evaluation import compare_models, load_prompts

    if args.no_progress:
        from transformers.utils import logging

        logging.disable_progress_bar()  # "Loading weights" bars too
    prompt_list, source = load_prompts(prompts, args.world)
    comparison = compare_models(models, prompt_list, generation, baseline=baseline, reward_model=args.reward_model and user_path(args.reward_model),
                                prompt_source=source, progress=not args.no_progress)
    write_report_dir(comparison, out, heading=f"Comparison: {', '.join(models)}")
    return comparison, out
