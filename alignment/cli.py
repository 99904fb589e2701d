"""Command line: `alignment run RECIPE [OVERRIDES...]` and friends.

The same entry serves `alignment ...`, `python -m alignment ...`,
`accelerate launch -m alignment RECIPE` and `accelerate launch RECIPE` (through the
recipe's first line).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import RecipeError

OVERRIDE_HELP = """\
overrides:
  KEY=VALUE            set a key of the recipe given, e.g. training.learning_rate=1e-4
  NAME:KEY=VALUE       set it in the recipe NAME.yaml of the chain, e.g. pretrain:training.max_steps=50
  *:KEY=VALUE          set it in every recipe of the chain
  Values are YAML: 3, 1e-4, true, null, [a, b].

examples:
  accelerate launch recipes/sft.yaml
  accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/dpo.yaml
  alignment run recipes/sft.yaml training.max_steps=20 '*:training.logging_steps=1'
  alignment run recipes/dpo.yaml --dry-run
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignment",
        description="Alignment pipeline toolkit: YAML recipes for pretraining, SFT, reward modelling and DPO.",
        epilog="examples:\n  accelerate launch recipes/dpo.yaml      # the main job, on the demo world\n"
        "  alignment run recipes/sft.yaml training.max_steps=50\n"
        "  alignment run --help                    # overrides and more examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a recipe and the recipes it depends on",
        description="Run a recipe, first building every recipe it refers to ({from: ...}); stages whose "
        "output is up to date are skipped.",
        epilog=OVERRIDE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="path of the recipe YAML file")
    run.add_argument("overrides", nargs="*", help="KEY=VALUE overrides (see below)")
    run.add_argument("--dry-run", action="store_true", help="print which stages would run or be skipped, and stop")
    from .stages import compare

    compare.add_arguments(sub.add_parser(
        "compare",
        help="compare models side by side: scores, win rates, KL, report.html",
        description="Models answer the same prompts under the same seed; replies are scored (gold oracle on demo "
        "prompts, a reward model if given); the report shows scores with 95% CIs, win rates, KL to the baseline "
        "and reply lengths.",
        epilog=compare.EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["run", *argv]  # `python -m alignment recipe.yaml` (what `accelerate launch -m alignment` runs)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            from .pipeline import run

            run(args.recipe, args.overrides, dry_run=args.dry_run)
        elif args.command == "compare":
            from .stages import compare

            return compare.command(args)
    except RecipeError as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
