"""Command line: `alignment run RECIPE [OVERRIDES...]` and friends.

The same entry serves `alignment ...`, `python -m alignment ...`,
`accelerate launch -m alignment RECIPE` and `accelerate launch RECIPE` (through the
recipe's first line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import RecipeError

# Each command's modules are imported when it runs, for start-up time: `alignment --help` and a
# usage error answer at once, and `run` refuses a recipe's mistake before torch loads.

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

SWEEP_HELP = """\
examples:
  alignment sweep recipes/frontier.yaml --dry-run     # the points, and what is built already
  alignment sweep recipes/frontier.yaml               # run what is missing, compare, draw the frontier
  alignment sweep recipes/frontier.yaml '*:seed=43' output_dir=runs/frontier-43   # another seed of every chain
  accelerate launch recipes/frontier.yaml             # the same as `alignment sweep`

Writes OUTPUT_DIR/report.html (score against KL per method, the Pareto front, reward beside gold),
report.md, report.json, compare/ (every reply side by side) and one directory per point.
"""


class Parser(argparse.ArgumentParser):
    """Errors are one line (no usage block) and exit with status 2; its subcommands' parsers too."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="alignment",
        description="Alignment pipeline toolkit: YAML recipes for pretraining, SFT, reward modelling, PPO/GRPO/RLOO, DPO and KTO.",
        epilog="examples:\n  accelerate launch recipes/dpo.yaml      # the main job, on the demo world\n"
        "  alignment run recipes/sft.yaml training.max_steps=50\n"
        "  alignment sweep recipes/frontier.yaml   # every method at several strengths: the reward-KL frontier\n"
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
    run.add_argument("--runs-dir", default="runs", metavar="DIR",
                     help="where recipes without output_dir write (DIR/<recipe name>; default: runs)")
    show = sub.add_parser(
        "show",
        help="print every key of every recipe the run would build, defaults and overrides applied (YAML)",
        description="Resolve a recipe and the recipes it refers to as `alignment run` would, and print each one's "
        "keys, every default included and output_dir where it writes, in the order they run. Nothing runs, no "
        "model is loaded and torch is not imported, so what the installed libraries accept (scheduler, tracker and "
        "attention names) is checked by `alignment run`.",
        epilog=OVERRIDE_HELP.split("\nexamples:")[0] + "\n\nexamples:\n  alignment show recipes/dpo.yaml\n"
        "  alignment show recipes/dpo.yaml dpo.beta=0.05 '*:seed=1'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("recipe", help="path of the recipe YAML file")
    show.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, as for `alignment run`")
    show.add_argument("--runs-dir", default="runs", metavar="DIR",
                      help="where recipes without output_dir write (DIR/<recipe name>; default: runs)")
    sweep = sub.add_parser(
        "sweep",
        help="run a sweep recipe: every method at every strength, one comparison, the frontier report",
        description="Run each method's recipe at every point of its grid (each point an ordinary run with its own "
        "output directory; shared parents built once; a rerun resumes), compare every point with the baseline on "
        "the same prompts and write the frontier report: score against KL, one curve per method, the Pareto front.",
        epilog=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("recipe", help="path of the sweep recipe (stage: sweep)")
    sweep.add_argument("overrides", nargs="*", help="KEY=VALUE: a key of the sweep recipe; NAME:KEY=VALUE or "
                       "*:KEY=VALUE: set in every point's chain")
    sweep.add_argument("--dry-run", action="store_true", help="list the points and what is up to date, and stop")
    sweep.add_argument("--jobs", type=int, default=None, metavar="N",
                       help="points trained at once, each in its own process with its share of the cores (default: the "
                       "recipe's `jobs`, 1); shared parents are built first, one at a time")
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


def launcher_thread_default(launcher_pid: int | None = None) -> int | None:
    """The CPU threads this process should use when `accelerate launch` (run with no config and
    no thread count) set OMP_NUM_THREADS=1 for it; None when the count is the user's choice.

    accelerate sets OMP_NUM_THREADS=1 in its children unless the variable is in its own
    environment or `--num_cpu_threads_per_process` is given. A child sees only the result, so
    it looks at the launcher's (its parent's) initial environment and command line to tell
    "accelerate's default" from "the user asked for 1". Where that cannot be read (no /proc),
    the count is left alone. The machine's cores are split among the local processes.
    """
    if os.environ.get("OMP_NUM_THREADS") != "1" or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return None  # not under accelerate launch, or a count other than its default
    launcher = Path(f"/proc/{launcher_pid or os.getppid()}")
    try:
        parent_env = (launcher / "environ").read_bytes().split(b"\0")
        parent_args = (launcher / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if any(v.startswith(b"OMP_NUM_THREADS=") for v in parent_env) or any(
        a.startswith(b"--num_cpu_threads_per_process") for a in parent_args
    ):
        return None  # the user's own setting, passed through by accelerate
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = next(
        (int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE") if k in os.environ),
        1,
    )
    return max(1, cores // max(1, local))


def use_launcher_cores() -> None:
    threads = launcher_thread_default()
    if threads is not None and threads > 1:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _tell_torchrun(message: str) -> None:
    """Under a multi-process launch (torchrun, which `accelerate launch --multi_gpu` uses), the
    launcher's failure summary shows the error file of each failed process: give it our line,
    so the summary names the error instead of pointing at torch's docs."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
        except OSError:
            pass


def _end_process_group() -> None:
    """Close the gloo/nccl group before exit: a process that leaves with the group open can
    abort in the group's C++ threads ("terminate called without an active exception") and turn
    a finished multi-process run into a failed one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def show_text(recipe: str, overrides: list[str], runs_dir: str) -> str:
    """`alignment show`: each recipe of the chain in the order it runs, every key after defaults and
    overrides (output_dir: where it writes), as YAML. Recipes are read, nothing else: torch is not imported,
    so what the installed libraries accept (scheduler, tracker and attention names) is left to `alignment run`."""
    import yaml

    from .config import resolved_dict
    from .pipeline import resolve

    parts = [f"# {recipe}: the recipes a run builds, in order, every key after defaults and overrides\n"]
    for node in resolve(recipe, overrides, runs_dir, check_software=False):
        keys = {**resolved_dict(node.recipe), "output_dir": str(node.out_dir)}
        parts.append(f"\n# {node.path}\n" + yaml.safe_dump({node.name: keys}, sort_keys=False, allow_unicode=True, width=100))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["run", *argv]  # `python -m alignment recipe.yaml` (what `accelerate launch -m alignment` runs)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("run", "sweep", "show") and not any(a.startswith("-") for a in rest):
        args.overrides += rest  # overrides written after an option, e.g. `run r.yaml --dry-run key=value`
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "show":
            print(show_text(args.recipe, args.overrides, args.runs_dir), end="")
        elif args.command in ("run", "sweep"):
            use_launcher_cores()
            from .pipeline import run
            from .sweep import is_sweep, run_sweep

            if args.command == "sweep" or is_sweep(args.recipe):  # `accelerate launch frontier.yaml` runs the sweep
                run_sweep(args.recipe, args.overrides, dry_run=args.dry_run, jobs=getattr(args, "jobs", None))
            else:
                run(args.recipe, args.overrides, dry_run=args.dry_run, runs_dir=args.runs_dir)
            _end_process_group()
        elif args.command == "compare":
            from .stages import compare

            return compare.command(args)
    except RecipeError as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        _tell_torchrun(f"error: {exc}")
        return 2
    return 0
