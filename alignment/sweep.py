"""`alignment sweep RECIPE`: run each method's recipe at every point of its grid, compare every
point with the baseline, and draw the frontier (score against KL to the baseline).

A sweep adds no second runner: every point is an ordinary recipe run (`pipeline.plan` with the
point's keys as overrides and its own output directory), so parents the points share (init,
pretrain, sft, reward) are one node, built once and cached by content hash; a killed sweep
resumes where it stopped (finished points are up to date, a partial one resumes from its
checkpoint). Then one `compare_models` call scores every point and the baseline on the same
prompts, and `frontier.py` draws the report from its summary.

Layout (default output_dir runs/<sweep name>):

    <out>/sweep.json              marks the directory as a sweep's; the points and their runs
    <out>/chain/<name>/           the points' parent stages (`chain_dir`)
    <out>/<method>/<point>/       one output directory per point (an ordinary run)
    <out>/compare/                the comparison: report.html with every reply side by side
    <out>/report.html|md|json     the frontier report
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pipeline
from .config import FromRecipe, SweepRecipe, resolved_dict
from .errors import RecipeError
from .paths import user_path, write_atomic
from .recipe_file import load_recipe, parse_override

MARKER = "alignment sweep"  # sweep.json's and report.json's "generator": a sweep's directory


@dataclass
class Point:
    """One run of a sweep: a method's recipe with `settings` (override key -> value)."""

    method: str
    recipe: Path
    settings: dict[str, Any]
    varying: dict[str, Any]  # the keys that tell this point from the method's others
    out_dir: Path
    nodes: list = field(default_factory=list)  # its plan, filled by `plan_points`

    @property
    def label(self) -> str:
        return " ".join([self.method, *(f"{_short(k, self.varying)}={_fmt(v)}" for k, v in self.varying.items())])

    def overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.settings.items()] + [
            f"output_dir={json.dumps(str(self.out_dir))}"
        ]


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _short(key: str, keys) -> str:
    """`dpo.beta` -> `beta`, unless another key of the point ends the same way."""
    last = key.rpartition(":")[2].rpartition(".")[2]
    same = [k for k in keys if k.rpartition(":")[2].rpartition(".")[2] == last]
    return last if len(same) == 1 else key


def _slug(varying: dict[str, Any]) -> str:
    text = "_".join(f"{_short(k, varying)}-{_fmt(v)}" for k, v in varying.items()) or "default"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def _combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(sweep: SweepRecipe, sweep_path: Path, out: Path) -> list[Point]:
    """Every point of the sweep, method by method: the method's `points` (or one empty point)
    crossed with its `grid`, crossed with the sweep's `grid`."""
    points = []
    for name, method in sweep.methods.items():
        recipe = _resolve(method.recipe, sweep_path, f"methods.{name}.recipe")
        for given in method.points or [{}]:
            for own in _combinations(method.grid):
                for shared in _combinations(sweep.grid):
                    varying = {**given, **own, **shared}
                    settings = {**sweep.set, **method.set, **varying}
                    points.append(Point(name, recipe, settings, varying, out / name / _slug(varying)))
    seen: dict[Path, Point] = {}
    for point in points:
        if point.out_dir in seen:
            raise RecipeError(f"{sweep_path}: methods.{point.method}: two points are both '{point.label}'; list each point once")
        seen[point.out_dir] = point
    return points


def _resolve(ref: str, sweep_path: Path, key: str) -> Path:
    for candidate in (sweep_path.parent / user_path(ref), Path(user_path(ref))):
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"{sweep_path}: {key}: no such recipe '{ref}' (looked beside the sweep and in the working directory)")


def _chain_overrides(settings: dict[str, Any]) -> list[str]:
    """The settings aimed at the chain (`NAME:key` or `*:key`) as override strings."""
    return [f"{k}={json.dumps(v)}" for k, v in settings.items() if ":" in k]


@dataclass
class Sweep:
    """A planned sweep: its points, every node they need (merged by output directory, parents
    first), and the baseline and reward model the comparison uses."""

    recipe: SweepRecipe
    path: Path
    out: Path
    points: list[Point]
    nodes: list  # pipeline.Node, in an order that builds parents first
    baseline: tuple[str, str, Any]  # (label, model directory, node or None)
    reward: tuple[str, Any] | None  # (model directory, node or None)
    chain_dir: Path
    chain: list[str]  # the command line's NAME:KEY=VALUE / *:KEY=VALUE overrides, for every point's chain


def plan_sweep(path: str | Path, overrides: list[str] = (), num_processes: int = 1) -> Sweep:
    path = Path(path)
    parsed = [(raw, *parse_override(raw)) for raw in overrides]
    # KEY=VALUE: the sweep's own keys; NAME:KEY / *:KEY: every point's chain (*:KEY the sweep too, e.g. *:world)
    own = [(key_path, value, raw) for raw, target, key_path, value in parsed if target in (None, "*")]
    chain = [raw for raw, target, _, _ in parsed if target is not None]
    recipe = load_recipe(path, own)
    if recipe.world != "default":  # the sweep's world is every chain's, and its prompts'
        chain.insert(0, f"*:world={recipe.world}")
    if recipe.stage != "sweep":
        raise RecipeError(f"{path}: stage: expected 'sweep' (a sweep recipe), got {recipe.stage!r}; run it with `alignment run {path}`")
    out = Path(user_path(recipe.output_dir or str(Path("runs") / path.stem)))
    chain_dir = Path(user_path(recipe.chain_dir)) if recipe.chain_dir else out / "chain"
    points = expand(recipe, path, out)

    merged: dict[Path, Any] = {}

    def add(nodes, who: str):
        for node in nodes:
            known = merged.setdefault(node.out_dir, node)
            if known.hash != node.hash:
                raise RecipeError(
                    f"{path}: {who} needs another version of '{node.name}' than an earlier point ({node.out_dir}): "
                    "points may differ in their own recipe only, or give that recipe an output_dir per point"
                )
        return [merged[n.out_dir] for n in nodes]

    for point in points:
        try:
            nodes = pipeline.plan(point.recipe, [*point.overrides(), *chain], num_processes, runs_dir=chain_dir)
        except RecipeError as exc:
            raise RecipeError(f"{path}: point '{point.label}': {exc}") from None
        point.nodes = add(nodes, f"point '{point.label}'")

    def model(key: str, value) -> tuple[str, Any]:
        """(directory or hub id, node or None) of the sweep's baseline or reward model."""
        if not isinstance(value, FromRecipe):
            return value, None
        target = pipeline._resolve_ref(value.from_, path)
        shared = [*_chain_overrides(recipe.set), *chain]
        try:
            nodes = pipeline.plan(target, shared, num_processes, runs_dir=chain_dir)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {key}: {exc}") from None
        return str(nodes[-1].out_dir), add(nodes, key)[-1]

    base_dir, base_node = model("baseline", recipe.baseline)
    base_label = base_node.name if base_node is not None else Path(base_dir).name
    if base_label in {p.label for p in points}:
        base_label = f"{base_label} (baseline)"
    reward = model("reward_model", recipe.reward_model) if recipe.reward_model is not None else None
    return Sweep(recipe, path, out, points, list(merged.values()), (base_label, base_dir, base_node), reward, chain_dir, chain)


def needed(sweep: Sweep, is_current) -> list:
    """The nodes to build, parents first: every point that is not up to date and the baseline and
    reward model, each with whatever it needs that is not up to date (a finished point's parents
    are not rebuilt, even when a later change made them stale)."""
    want: set[int] = set()

    def need(node) -> None:
        if id(node) in want or pipeline.is_current(node):
            return
        want.add(id(node))
        for ref in node.refs.values():
            need(ref)

    for point in sweep.points:
        need(point.nodes[-1])
    for node in (sweep.baseline[2], sweep.reward[1] if sweep.reward else None):
        if node is not None:
            need(node)
    return [n for n in sweep.nodes if id(n) in want]


def comparison_key(sweep: Sweep) -> str:
    """What the comparison depends on: every model's content hash and the comparison's settings.
    A baseline or reward model given as a path is keyed by its files' content (as the pipeline
    keys a stage's inputs given as paths), so a model retrained in place is compared again."""
    def ident(directory, node):
        return node.hash if node is not None else pipeline.fingerprint(directory, sweep.recipe.model_options.revision)

    models = {p.label: p.nodes[-1].hash for p in sweep.points}
    models[sweep.baseline[0]] = ident(sweep.baseline[1], sweep.baseline[2])
    reward = ident(*sweep.reward) if sweep.reward else None
    settings = {k: resolved_dict(sweep.recipe)[k] for k in ("world", "prompts", "generation", "model_options")}
    return pipeline.content_hash(models, reward, settings, pipeline.toolkit_fingerprint())


def _check_sweep_dir(sweep: Sweep) -> None:
    """The sweep's directory is new, empty or a sweep's (its sweep.json): never someone else's."""
    out = sweep.out
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{sweep.path}: output_dir '{out}' is a file, expected a directory")
    if out.is_dir() and any(out.iterdir()) and _read_json(out / "sweep.json").get("generator") != MARKER:
        raise RecipeError(
            f"{sweep.path}: output_dir '{out}' holds files the toolkit did not write (no sweep.json of a sweep); "
            "choose another output_dir or move them away"
        )


def is_sweep(path: str | Path) -> bool:
    """Whether the file is a sweep recipe (`stage: sweep`); any problem reading it is left to the loader."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("stage") == "sweep"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_sweep(path: str | Path, overrides: list[str] = (), dry_run: bool = False, jobs: int | None = None) -> Sweep:
    sweep = plan_sweep(path, overrides, num_processes=pipeline.launched_processes())  # a recipe's mistake: refused before accelerate starts
    from accelerate import PartialState

    from .models import check_local_inputs
    from .stages.common import use_cpu

    state = PartialState(cpu=use_cpu())
    if state.num_processes != pipeline.launched_processes():  # a launcher that sets no WORLD_SIZE (mpirun)
        sweep = plan_sweep(path, overrides, num_processes=state.num_processes)
    say = print if state.is_main_process else (lambda *a, **k: None)
    jobs = sweep.recipe.jobs if jobs is None else jobs
    if jobs < 1 or (jobs > 1 and state.num_processes > 1):
        raise RecipeError(f"{sweep.path}: jobs {jobs} (the recipe's `jobs` or --jobs): expected 1 or more, and 1 under a "
                          "multi-process launch (its processes share each point)")
    for node in sweep.nodes:
        check_local_inputs(node.recipe.stage, {r: p for r, p in node.inputs().items() if r not in node.refs})
    pipeline.check_precision(sweep.nodes, use_cpu(), say)
    _check_sweep_dir(sweep)
    to_run = needed(sweep, pipeline.is_current)
    pipeline.check_outputs(sweep.nodes, to_run, probe=not dry_run)
    key = comparison_key(sweep)
    compared = _read_json(sweep.out / "report.json").get("comparison_key") == key and all(
        (sweep.out / "compare" / name).is_file() for name in ("summary.json", "samples.jsonl"))
    if dry_run:
        say(f"sweep {sweep.path}: {len(sweep.points)} points, {len(to_run)} stages to run -> {sweep.out}")
        points, running = {id(p.nodes[-1]): p for p in sweep.points}, {id(n) for n in to_run}
        for node in sweep.nodes:
            what = f"point '{points[id(node)].label}'" if id(node) in points else "shared"
            status = "will run" if id(node) in running else "up to date" if pipeline.is_current(node) else "not needed"
            say(f"  {node.name:>10}  {node.recipe.stage:<8} {status:<10}  {what}  -> {node.out_dir}")
        say(f"  comparison and frontier report: {'up to date' if compared else 'will run'}  -> {sweep.out / 'report.html'}")
        return sweep
    if state.is_main_process:
        sweep.out.mkdir(parents=True, exist_ok=True)
        listing = {"generator": MARKER, "recipe": str(sweep.path),
                   "points": [{"label": p.label, "method": p.method, "settings": p.settings, "output_dir": str(p.out_dir)}
                              for p in sweep.points]}
        write_atomic(sweep.out / "sweep.json", json.dumps(listing, indent=2))
        for node in sweep.nodes:
            pipeline.complete_interrupted_swap(node)
    state.wait_for_everyone()
    points = {id(p.nodes[-1]): p for p in sweep.points}
    apart = [points[id(n)] for n in to_run if id(n) in points] if jobs > 1 else []  # points run in processes of their own
    in_here = [n for n in to_run if jobs == 1 or id(n) not in points]
    for i, node in enumerate(in_here, 1):
        what = f"point '{points[id(node)].label}'" if id(node) in points else f"shared stage '{node.name}'"
        say(f"[sweep {i}/{len(in_here)}] {what}: running stage '{node.recipe.stage}' -> {node.out_dir}")
        summary = pipeline.run_node(node, state)
        say(f"[sweep {i}/{len(in_here)}] done: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if apart and state.is_main_process:
        run_apart(sweep, apart, jobs, say)
    if state.is_main_process:
        compare_and_report(sweep, key, compared, say)
    state.wait_for_everyone()
    return sweep


def run_apart(sweep: Sweep, points: list[Point], jobs: int, say=print) -> None:
    """Train `points` (whose parents are built) `jobs` at a time, each as `alignment run` in a
    process of its own with its share of the cores; its output goes to <out>/logs/<method>/<point>.log."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // jobs))}

    def one(point: Point) -> tuple[Point, int, Path]:
        log = sweep.out / "logs" / point.method / f"{point.out_dir.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "alignment", "run", str(point.recipe), *point.overrides(), *sweep.chain,
                   "--runs-dir", str(sweep.chain_dir)]
        with log.open("w") as fh:
            code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        return point, code, log

    say(f"[sweep] training {len(points)} points, {jobs} at a time (logs in {sweep.out / 'logs'})")
    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for point, code, log in pool.map(one, points):
            say(f"[sweep] point '{point.label}': {'done' if code == 0 else f'failed (exit status {code})'} -> {point.out_dir}")
            if code:
                failed.append((point, log))
    if failed:
        point, log = failed[0]
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise RecipeError(f"{sweep.path}: point '{point.label}' failed ({len(failed)} of {len(points)}): {last} (log: {log})")


def compare_and_report(sweep: Sweep, key: str, compared: bool, say=print) -> None:
    """One comparison of every point and the baseline (skipped when its inputs are unchanged),
    then the frontier report from its summary."""
    # imported here for start-up time: compare loads torch and the reports plotly, which planning a sweep never needs
    from .evaluation import CompareError, compare_models, load_prompts
    from .frontier import per_reply_scores, write_frontier
    from .report import write_report_dir

    label, base_dir, _ = sweep.baseline
    models = {label: base_dir, **{p.label: str(p.nodes[-1].out_dir) for p in sweep.points}}
    compare_dir = sweep.out / "compare"
    if compared:
        say(f"[sweep] comparison up to date: {compare_dir}")
    else:
        say(f"[sweep] comparing {len(models)} models on the same prompts -> {compare_dir}")
        recipe = sweep.recipe
        try:
            prompts, source = load_prompts(recipe.prompts, recipe.world)
            comparison = compare_models(
                models, prompts, recipe.generation, baseline=label,
                reward_model=sweep.reward[0] if sweep.reward else None, prompt_source=source,
                model_options=recipe.model_options,
            )
        except CompareError as exc:
            raise RecipeError(f"{sweep.path}: {exc.arg}: {exc.message}") from None
        write_report_dir(comparison, compare_dir, heading=f"Sweep {sweep.path.stem}: every point side by side")
    summary = _read_json(compare_dir / "summary.json")
    samples = [json.loads(line) for line in (compare_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    methods = {p.label: (p.method, p.varying) for p in sweep.points}
    text = write_frontier(sweep.out, summary, methods, heading=f"Frontier: {sweep.path.stem}", generator=MARKER,
                          extra={"comparison_key": key}, replies=per_reply_scores(samples))
    say(text)
