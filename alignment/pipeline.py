"""Run a recipe and everything it depends on, in order, skipping what is already built.

A recipe refers to another one's output with `{from: other.yaml}` (e.g. `model`). Running
a recipe first builds what it refers to. Each stage's output directory holds
`run_info.json` with a content hash of its resolved recipe, its inputs' hashes and its
data files; a stage whose hash matches a finished output is skipped, and any change
reruns it and every stage after it.

Run directory layout (default `runs/`, one directory per recipe, named after the file):

    runs/<name>/                 finished output: a Hugging Face model directory
        model.safetensors, config.json, tokenizer files
        recipe.resolved.yaml     every key after defaults and overrides, plus input paths
        metrics.jsonl            one JSON object per logged step, then the final summary
        README.md                model card
        run_info.json            stage, content hash, inputs, finish time
    runs/<name>.partial/         a run in progress (checkpoints/ inside, to resume from)

A stage writes into `<name>.partial/` and renames it to `<name>/` only when complete, so
an interrupted run is never mistaken for a finished one; rerunning resumes from its last
checkpoint when the hash still matches.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState

from . import __version__
from .config import (
    BaseRecipe,
    FromRecipe,
    RecipeError,
    content_hash,
    load_recipe,
    model_inputs,
    parse_override,
    resolved_dict,
)
from .stages.common import append_metrics, last_checkpoint, use_cpu, write_card, write_resolved

# Keys that change where or how a run reports, not what it computes.
NOT_HASHED = ("output_dir", "report", "training.logging_steps", "training.report_to", "training.save_steps")


@dataclass
class Node:
    """One recipe in a run: where it writes, what it reads, and its content hash."""

    recipe: BaseRecipe
    path: Path
    out_dir: Path
    refs: dict[str, "Node"] = field(default_factory=dict)
    hash: str = ""

    @property
    def name(self) -> str:
        return self.path.stem

    def inputs(self) -> dict[str, str]:
        """Role -> model path or hub id, with references replaced by their output directories."""
        return {
            role: str(self.refs[role].out_dir) if isinstance(value, FromRecipe) else value
            for role, value in model_inputs(self.recipe).items()
        }


def _resolve_ref(ref: str, from_recipe: Path) -> Path:
    for candidate in (from_recipe.parent / ref, Path(ref)):
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"{from_recipe}: from: {ref!r}: no such recipe (looked beside the recipe and in the working directory)")


def _fingerprint(path_or_id: str) -> str:
    """What a local input's content is, cheaply: file hashes, or name/size/mtime of a directory's files."""
    path = Path(path_or_id)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if path.is_dir():
        return content_hash(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()))
    return path_or_id


def _hashed_view(recipe: BaseRecipe) -> dict:
    data = resolved_dict(recipe)
    for dotted in NOT_HASHED:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return data


def plan(recipe_path: str | Path, overrides: list[str] = ()) -> list[Node]:
    """Load the recipe and everything it refers to; return them in the order to run."""
    top = Path(recipe_path)
    parsed = [(raw, *parse_override(raw)) for raw in overrides]
    used_targets: set[str] = set()

    def overrides_for(path: Path, is_top: bool):
        chosen = []
        for raw, target, key_path, value in parsed:
            if target == path.stem or target == "*" or (target is None and is_top):
                chosen.append((key_path, value, raw))
                used_targets.add(target)
        return chosen

    order: list[Node] = []
    by_path: dict[Path, Node] = {}

    def visit(path: Path, is_top: bool, stack: tuple) -> Node:
        key = path.resolve() if path.exists() else path
        if key in stack:
            raise RecipeError(f"{path}: recipes refer to each other in a cycle: {' -> '.join(p.name for p in (*stack, key))}")
        if key in by_path:
            return by_path[key]
        recipe = load_recipe(path, overrides_for(path, is_top))
        node = Node(recipe, path, Path(recipe.output_dir or Path("runs") / path.stem))
        for role, value in model_inputs(recipe).items():
            if isinstance(value, FromRecipe):
                node.refs[role] = visit(_resolve_ref(value.from_, path), False, (*stack, key))
        node.hash = content_hash(
            _hashed_view(recipe),
            {role: ref.hash for role, ref in node.refs.items()},
            {role: _fingerprint(p) for role, p in node.inputs().items() if role not in node.refs},
            _fingerprint(recipe.data.source) if recipe.data.source != "demo" else "demo",
            __version__,
        )
        by_path[key] = node
        order.append(node)
        return node

    visit(top, True, ())
    unknown = {t for _, t, _, _ in parsed if t not in (None, "*")} - used_targets
    if unknown:
        names = ", ".join(n.name for n in order)
        raise RecipeError(f"override for recipe '{sorted(unknown)[0]}': no such recipe in this run ({names})")
    return order


def _read_info(directory: Path) -> dict:
    try:
        return json.loads((directory / "run_info.json").read_text())
    except (OSError, ValueError):
        return {}


def is_current(node: Node) -> bool:
    info = _read_info(node.out_dir)
    return info.get("hash") == node.hash and info.get("status") == "finished"


def run_node(node: Node, state: PartialState) -> dict:
    """Run one stage into `<out>.partial/`, then move it into place."""
    work = node.out_dir.with_name(node.out_dir.name + ".partial")
    if state.is_main_process:
        if work.exists() and _read_info(work).get("hash") != node.hash:
            shutil.rmtree(work)  # a partial run of an older recipe: nothing to resume
        work.mkdir(parents=True, exist_ok=True)
        info = {"stage": node.recipe.stage, "hash": node.hash, "status": "running", "inputs": node.inputs()}
        (work / "run_info.json").write_text(json.dumps(info, indent=2))
    state.wait_for_everyone()

    stage = importlib.import_module(f"alignment.stages.{node.recipe.stage}")
    started = time.time()
    summary = {}
    try:
        if state.is_main_process or not getattr(stage, "MAIN_PROCESS_ONLY", False):
            summary = stage.run(node.recipe, node.inputs(), work)
    except RecipeError:
        # Bad input found before any training: leave nothing half-written behind.
        if state.is_main_process and last_checkpoint(work) is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    state.wait_for_everyone()

    if state.is_main_process:
        summary["wall_seconds"] = round(time.time() - started, 2)
        append_metrics(work / "metrics.jsonl", {"summary": summary})
        write_resolved(work, node.recipe, node.inputs())
        if getattr(stage, "WRITES_MODEL", True):
            write_card(work, node.recipe, node.inputs().get("model"), summary)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        info = {**_read_info(work), "status": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary}
        (work / "run_info.json").write_text(json.dumps(info, indent=2))
        if node.out_dir.exists():
            shutil.rmtree(node.out_dir)
        work.rename(node.out_dir)
    state.wait_for_everyone()
    return summary


def run(recipe_path: str | Path, overrides: list[str] = (), dry_run: bool = False) -> list[Node]:
    nodes = plan(recipe_path, overrides)
    state = PartialState(cpu=use_cpu())
    say = print if state.is_main_process else (lambda *a, **k: None)
    reported = {}
    if nodes[-1].recipe.report.models:
        from .report import resolve_models

        reported, notes = resolve_models(nodes[-1].recipe.report, nodes)  # said before training, not after
        for note in notes:
            say(note)
    for node in nodes:
        current = is_current(node)
        if dry_run:
            say(f"{node.name:>12}  {node.recipe.stage:<8} {'up to date' if current else 'will run'}  -> {node.out_dir}")
            continue
        if current:
            say(f"[{node.name}] up to date: {node.out_dir} (hash {node.hash})")
            continue
        say(f"[{node.name}] running stage '{node.recipe.stage}' -> {node.out_dir}")
        summary = run_node(node, state)
        say(f"[{node.name}] done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    report = nodes[-1].recipe.report
    if reported and not dry_run:
        if state.is_main_process:
            from .report import build_report

            say("\n" + build_report(report, nodes, reported))
        state.wait_for_everyone()
    return nodes

