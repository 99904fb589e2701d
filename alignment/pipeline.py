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
        run_info.json            stage, content hash, inputs, finish time, files written (name: size)
    runs/<name>.partial/         a run in progress (checkpoints/ inside, to resume from)

A stage writes into `<name>.partial/` and renames it to `<name>/` only when complete, so
an interrupted run is never mistaken for a finished one; rerunning resumes from its last
checkpoint when the hash still matches.

The toolkit never deletes or overwrites what it did not write. Before any stage runs, every
output location is checked (`check_outputs`): an existing directory without a run_info.json
of ours, an output inside (or holding) a model or data file the run reads, the working
directory, a file, or a place that cannot be written is a one-line error. A finished output
replaces the previous one by two renames (old aside, new in), so a crash at any moment
leaves at least one of them whole; the next run completes an interrupted swap.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import user_functions
from .config import STAGES, BaseRecipe, FromRecipe, RLRecipe, data_files, model_inputs, resolved_dict
from .errors import RecipeError
from .estimators import ADVANTAGE_ARGUMENTS
from .paths import keep_foreign, output_problem, replace_dir
from .recipe_file import load_recipe, parse_override
from .rounds import expand, round_table

# torch, transformers, peft and plotly are imported inside the functions that need them (the stages'
# helpers, models, sharding, rewards, the report), for start-up time: a recipe's mistake is refused
# in under a second, before they load (about 10 s of CPU).

if TYPE_CHECKING:
    from accelerate import PartialState

# torch, transformers and accelerate (seconds to import) are imported where a stage is hashed or
# run, so that a recipe with a mistake is refused at once.

# Keys that change where or how a run reports, not what it computes; mixed_precision, whose
# resolved value (auto -> bf16 or no) is hashed instead; and model_options.revision, hashed with
# each hub id it applies to (a local directory ignores it).
NOT_HASHED = (
    "output_dir", "report", "training.logging_steps", "training.report_to", "training.save_steps",
    "training.mixed_precision", "model_options.revision",
)


@dataclass
class Node:
    """One recipe in a run: where it writes, what it reads, and its content hash."""

    recipe: BaseRecipe
    path: Path
    out_dir: Path
    refs: dict[str, "Node"] = field(default_factory=dict)
    hash: str = ""
    rounds_of: str = ""  # the rounds recipe (online_dpo) this stage was expanded from, if any

    @property
    def name(self) -> str:
        return self.path.stem

    def inputs(self) -> dict[str, str]:
        """Role -> model path or hub id, with references replaced by their output directories."""
        return {
            role: str(self.refs[role].out_dir) if isinstance(value, FromRecipe) else value
            for role, value in model_inputs(self.recipe).items()
        }


# Stages whose output is not a model, and what they write instead: a model-valued key (`model`,
# `ref_model`, `reward_model`, compare's `models.LABEL`) cannot start from them.
NOT_A_MODEL = {"compare": "a report", "prep": "data (data.source: {from: ...} takes it)"}


def _check_model_ref(path: Path, role: str, ref: "Node") -> None:
    """Refuse, at plan time, a model-valued key whose {from: ...} names a stage that writes no model."""
    stage = ref.recipe.stage
    if role != "data" and stage in NOT_A_MODEL:
        raise RecipeError(f"{path}: {role}: from: {ref.path.name} is a '{stage}' recipe; a {stage} stage writes "
                          f"{NOT_A_MODEL[stage]}, not a model: name a recipe that trains one, or a model directory")


def _resolve_ref(ref: str, from_recipe: Path) -> Path:
    for candidate in (from_recipe.parent / ref, Path(ref)):
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"{from_recipe}: from: {ref!r}: no such recipe (looked beside the recipe and in the working directory)")


# The prep kinds (prep.kind) each stage reads when its data.source is {from: a prep recipe}.
PREP_KINDS = {"pretrain": ("text",), "sft": ("sft",), "reward": ("pairs",), "dpo": ("pairs",), "kto": ("binary", "pairs")}


# A directory's files up to this size are hashed by their bytes (configs, tokenizers, small
# weights and data files); larger ones by name, size and modification time, read without
# opening them (a multi-gigabyte weight shard would cost seconds per run).
CONTENT_HASH_MAX_BYTES = 64 << 20


def content_hash(*parts: Any) -> str:
    """16 hex digits of the SHA-256 of `parts` as sorted JSON: a stage's identity in the cache."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path_or_id: str, revision: str | None = None) -> str:
    """What an input's content is: a local file's bytes; a local directory's files (bytes up to
    CONTENT_HASH_MAX_BYTES, name/size/mtime above); a hub id with the revision it is loaded at.
    A leading `~` is expanded, as the loaders do."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        files = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                stat = p.stat()
                small = stat.st_size <= CONTENT_HASH_MAX_BYTES
                files.append((p.relative_to(path).as_posix(), _file_digest(p) if small else (stat.st_size, stat.st_mtime_ns)))
        return content_hash(files)
    return f"{path_or_id}@{revision}" if revision else path_or_id


# Libraries whose version changes what a stage computes.
RESULT_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers")


def source_fingerprint(roots: list[Path]) -> str:
    """Hash of every .py file under `roots` (relative path and bytes), in a fixed order."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def toolkit_roots() -> list[Path]:
    """The directories of the toolkit's packages, alignment/ and data_prep/."""
    roots = []
    for package in ("alignment", "data_prep"):
        spec = importlib.util.find_spec(package)
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return roots


@functools.cache
def toolkit_fingerprint() -> str:
    """The toolkit's own code (its packages' .py files) and the versions of the libraries that
    compute with it: any change to them invalidates every cached stage. Computed once per process."""
    roots = toolkit_roots()
    versions = {}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return content_hash(source_fingerprint(roots), versions)


def _chat_template_fingerprint(template: str | None) -> str | None:
    """A chat template given as a .jinja file counts by its contents, not its path
    (models.load_tokenizer reads such a file; any other value is the template text itself)."""
    if template and template.endswith(".jinja") and Path(template).expanduser().is_file():
        return fingerprint(template)
    return None


def _stage_flag(stage: str, name: str, default: bool) -> bool:
    """A stage module's declaration (MAIN_PROCESS_ONLY, USES_DEVICE, WRITES_MODEL)."""
    return getattr(importlib.import_module(f"alignment.stages.{stage}"), name, default)


def _runs_on_every_process(stage: str) -> bool:
    return not _stage_flag(stage, "MAIN_PROCESS_ONLY", False)


def _hashed_view(recipe: BaseRecipe) -> dict:
    data = resolved_dict(recipe)
    for dotted in NOT_HASHED:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return data


def launched_processes() -> int:
    """The number of processes the launcher started (torchrun's and `accelerate launch`'s WORLD_SIZE), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve(recipe_path: str | Path, overrides: list[str] = (), runs_dir: str | Path = "runs",
            check_software: bool = True) -> list[Node]:
    """Load the recipe and everything it refers to, overrides applied, and check how they chain;
    return them in the order to run, not yet hashed. Reads recipes only, no model files; without
    `check_software` (recipe_file.load_recipe) not even transformers or torch is imported. A recipe
    without `output_dir` writes to `runs_dir`/<recipe name>."""
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
        recipe = load_recipe(path, overrides_for(path, is_top), check_software)
        if recipe.stage == "sweep":
            raise RecipeError(f"{path}: is a sweep recipe: run it with `alignment sweep {path}`"
                              + ("" if is_top else "; a sweep has no output another recipe can start from"))
        if recipe.stage == "online_dpo":  # a recipe of rounds: ordinary prep and dpo stages, one pair per round
            node = _plan_rounds(recipe, path, Path(runs_dir), lambda ref: visit(_resolve_ref(ref, path), False, (*stack, key)), order)
            by_path[key] = node
            return node
        node = Node(recipe, path, Path(recipe.output_dir or Path(runs_dir) / path.stem))
        for role, value in model_inputs(recipe).items():
            if isinstance(value, FromRecipe):
                node.refs[role] = visit(_resolve_ref(value.from_, path), False, (*stack, key))
                _check_model_ref(path, role, node.refs[role])
        if "data" in node.refs and node.refs["data"].recipe.stage != "prep":
            ref = node.refs["data"]
            raise RecipeError(f"{path}: data.source: from: {ref.path.name} is a '{ref.recipe.stage}' recipe; "
                              "data.source takes the output of a 'prep' recipe (or a data file)")
        if "data" in node.refs and recipe.stage in PREP_KINDS:
            ref, kinds = node.refs["data"], PREP_KINDS[recipe.stage]
            if ref.recipe.prep.kind not in kinds:  # refused here, before the prep stage is built
                raise RecipeError(f"{path}: data.source: from: {ref.path.name} makes '{ref.recipe.prep.kind}' rows "
                                  f"(its prep.kind); a {recipe.stage} recipe reads {' or '.join(repr(k) for k in kinds)} "
                                  f"rows: set prep.kind: {kinds[0]} in {ref.path.name}, or use another prep recipe")
        by_path[key] = node
        order.append(node)
        return node

    visit(top, True, ())
    for node in order:
        check_reward_model_chain(node)
    unknown = {t for _, t, _, _ in parsed if t not in (None, "*")} - used_targets
    if unknown:
        names = ", ".join(n.name for n in order)
        target = sorted(unknown)[0]
        typed = next(raw for raw, t, _, _ in parsed if t == target)
        raise RecipeError(f"override {typed!r}: no recipe '{target}' in this run ({names})")
    return order


def plan(recipe_path: str | Path, overrides: list[str] = (), num_processes: int | None = None,
         runs_dir: str | Path = "runs") -> list[Node]:
    """The resolved chain (`resolve`) with each stage's content hash, in the order to run.

    `num_processes` (default: the launcher's WORLD_SIZE, else 1) enters the hash of every stage
    that trains on all processes: it sets the global batch and how the data is split; so does
    how they share the work (DDP, DeepSpeed, FSDP). The device (GPU model or CPU kernel family)
    enters the hash of every stage that computes on it.
    """
    order = resolve(recipe_path, overrides, runs_dir)
    if num_processes is None:
        num_processes = launched_processes()
    # Every recipe is valid: now what needs torch (the device) and the inputs' files, parents first.
    from .stages import common

    for node in order:
        path, recipe = node.path, node.recipe
        every_process = _runs_on_every_process(recipe.stage)
        check_rl_launcher(path, recipe, distributed(recipe, num_processes))
        check_functions(path.with_name(node.rounds_of + path.suffix) if node.rounds_of else path, recipe)
        node.hash = content_hash(
            _hashed_view(recipe),
            {role: ref.hash for role, ref in node.refs.items()},
            {role: fingerprint(p, recipe.model_options.revision) for role, p in node.inputs().items() if role not in node.refs},
            [fingerprint(source) for source in data_files(recipe)],
            {
                "chat_template_file": _chat_template_fingerprint(recipe.model_options.chat_template),
                "num_processes": num_processes if every_process else 1,
                "distributed": distributed(recipe, num_processes) if every_process else "single",
                "device": common.device_kind() if _stage_flag(recipe.stage, "USES_DEVICE", True) else None,
                "mixed_precision": common.resolved_precision(recipe),
                "toolkit": toolkit_fingerprint(),
            },
        )
    return order


def _chain_root(node: Node) -> tuple[Node, object]:
    """The recipe a node's `model` chain starts from, following {from: ...} references, and that
    recipe's own `model` (None for `init`, which builds the demo base from nothing)."""
    while "model" in node.refs:
        node = node.refs["model"]
    return node, getattr(node.recipe, "model", None)


def check_reward_model_chain(node: Node) -> None:
    """A recipe whose policy is the user's checkpoint never silently gets the demo chain's reward model:
    `reward_model: {from: reward.yaml}` trains one on the demo base (init.yaml) unless reward.yaml's own
    chain is pointed at another model, and such a reward model knows neither the policy's vocabulary nor
    its replies. Refused at plan time in one line that says what to set."""
    reward = node.refs.get("reward_model")
    if reward is None or getattr(node.recipe, "model", None) is None:
        return
    reward_root, _ = _chain_root(reward)
    policy_root, policy_model = _chain_root(node)
    if reward_root.recipe.stage == "init" and policy_root.recipe.stage != "init":
        raise RecipeError(
            f"{node.path}: reward_model: {{from: {reward.path.name}}} is the demo chain's reward model (trained from "
            f"the demo base, {reward_root.path.name}), but the policy starts from {policy_model!r}: set reward_model to "
            f"your reward model (a path or hub id), or train one for this policy ({reward.path.stem}:model=YOUR_SFT), "
            "or set reward_model=null and give reward_fn"
        )


def _plan_rounds(recipe, path: Path, runs_dir: Path, visit_ref, order: list[Node]) -> Node:
    """Append the stages of a rounds recipe (alignment/rounds.py) to `order`, each an ordinary node
    whose references are the rounds recipe's own inputs or earlier rounds; return the last round's."""
    outer = {role: visit_ref(value.from_) for role, value in model_inputs(recipe).items() if isinstance(value, FromRecipe)}
    for role, ref in outer.items():
        _check_model_ref(path, role, ref)
    made: dict[str, Node] = {}
    for stage in expand(recipe, path.stem, Path(recipe.output_dir or runs_dir / path.stem)):
        node = Node(stage.recipe, path.with_name(stage.name + path.suffix), stage.out_dir, rounds_of=path.stem)
        for role, target in stage.refs.items():
            node.refs[role] = outer[target.removeprefix("outer:")] if target.startswith("outer:") else made[target]
        made[stage.name] = node
        order.append(node)
    return node


def distributed(recipe: BaseRecipe, num_processes: int) -> str:
    """How a stage's processes share the work (part of its hash): the RL stages under an FSDP launch of
    several processes shard their models themselves with FSDP2 (alignment/sharding.py), on a CPU too;
    every other case as `common.distributed_type` says (accelerate's own FSDP runs on GPUs only)."""
    from . import sharding
    from .stages import common

    if isinstance(recipe, RLRecipe) and sharding.requested():
        return sharding.FSDP2 if num_processes > 1 else "single"
    return common.distributed_type(num_processes)


def check_rl_launcher(path: Path, recipe: BaseRecipe, distributed: str) -> None:
    """The RL stages (ppo, grpo, rloo) run on one process, as DDP, or sharded with FSDP2 by the toolkit
    (alignment/sharding.py). Under DeepSpeed they are refused before any stage trains, rather than as a
    traceback when the RL stage starts: they train the policy (and PPO's critic) beside frozen reference
    and reward models and generate in their own loop, and accelerate's DeepSpeed integration asserts on a
    second prepared model."""
    if isinstance(recipe, RLRecipe) and distributed == "deepspeed":
        raise RecipeError(
            f"{path}: stage '{recipe.stage}' does not run under DeepSpeed; to shard an RL stage use FSDP2 "
            "(accelerate launch --config_file recipes/accelerate/fsdp.yaml), or run it as DDP (multi_gpu.yaml, "
            "cpu_2proc.yaml; lora for large models)"
        )


def check_functions(path: Path, recipe: BaseRecipe) -> None:
    """Every Python function a recipe names (each `reward_fn` of an RL stage, online DPO's pairs stages or
    prep; an `advantage_estimator` given as 'file.py:name') is loaded (its file read, its module
    imported) before any stage of the chain trains: a missing file or function is refused at plan time."""
    refs = getattr(recipe, "reward_fn", [])
    estimator = recipe.rl.estimator if isinstance(recipe, RLRecipe) else None
    if refs or (estimator and user_functions.is_reference(estimator)):
        from .rewards import load_function  # imports torch: only once every recipe of the chain is valid

        try:
            for ref in refs:
                load_function(ref)
            if estimator and user_functions.is_reference(estimator):
                user_functions.load_function(estimator, f"{recipe.stage}.advantage_estimator", ADVANTAGE_ARGUMENTS)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None


def _read_info(directory: Path) -> dict:
    try:
        info = json.loads((directory / "run_info.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def is_ours(directory: Path) -> bool:
    """Whether `directory` holds a (finished or partial) run of this toolkit: its run_info.json."""
    info = _read_info(directory)
    return info.get("stage") in STAGES and isinstance(info.get("hash"), str)


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def written_files(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file in a finished output but run_info.json (which lists them)."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p != directory / "run_info.json"
    }


def _files_intact(directory: Path, files) -> bool:
    """Every file a finished output listed is still there, with its size."""
    if not isinstance(files, dict):
        return False
    for name, size in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def is_current(node: Node) -> bool:
    """A finished output of this exact hash, with every file it wrote still there (an output whose
    weights were deleted is built again)."""
    info = _read_info(node.out_dir)
    return info.get("hash") == node.hash and info.get("status") == "finished" and _files_intact(node.out_dir, info.get("files"))


# --------------------------------------------------------------------------- output safety


def _inside(path: Path, other: Path) -> bool:
    """`path` is `other` or lies under it (both absolute and resolved)."""
    return path == other or other in path.parents


def _local(value: str | None) -> Path | None:
    """`value` resolved, if it names an existing local path (not a hub id or template text)."""
    try:
        return Path(value).resolve() if value and "\n" not in value and Path(value).exists() else None
    except OSError:  # e.g. a long template text is no file name
        return None


def _read_paths(nodes: list[Node]) -> list[tuple[str, Path]]:
    """(what, resolved path) of every local model, data file, chat template and report model the run reads."""
    names = {node.name for node in nodes}
    found = []
    for node in nodes:
        pairs = [(role, value) for role, value in node.inputs().items() if role not in node.refs]
        pairs += [("data", source) for source in data_files(node.recipe)]
        pairs += [("model_options.chat_template", node.recipe.model_options.chat_template)]
        pairs += [(f"report.models.{k}", v) for k, v in node.recipe.report.models.items() if v not in names]
        for key, value in pairs:
            if (path := _local(value)) is not None:
                found.append((f"{node.path.name}'s {key} '{value}'", path))
    return found


def check_outputs(nodes: list[Node], to_run: list[Node], probe: bool = True) -> None:
    """Refuse, before anything is trained, every output location of `to_run` that would
    destroy or overwrite what the toolkit did not write, or that cannot be written.

    With `probe`, a scratch directory is created and removed where the output will go, so a
    read-only place is found now rather than after training.
    """
    cwd = Path.cwd().resolve()
    outs = {id(n): n.out_dir.resolve() for n in nodes}
    reads = _read_paths(nodes)
    for node in to_run:
        out = outs[id(node)]
        where = f"{node.path}: output_dir '{node.out_dir}'"
        if _inside(cwd, out):
            raise RecipeError(f"{where}: is the working directory or holds it; name a directory of its own, e.g. runs/{node.name}")
        for what, path in reads:
            if _inside(out, path):
                raise RecipeError(f"{where}: is {what} or inside it; writing there would overwrite an input: choose another output_dir")
            if _inside(path, out):
                raise RecipeError(f"{where}: holds {what}; replacing it would delete an input: choose another output_dir")
        for place in (out, partial_dir(out)):
            if place.exists() and not place.is_dir():
                raise RecipeError(f"{where}: '{place}' is a file, expected a directory (or a path that does not exist yet)")
            if place.is_dir() and any(place.iterdir()) and not is_ours(place):
                raise RecipeError(
                    f"{where}: '{place}' holds files the toolkit did not write (no run_info.json of a run); "
                    "choose another output_dir or move them away"
                )
        problem = output_problem(out, probe)
        if problem:
            raise RecipeError(f"{where}: {problem}")
    for how, overlaps in (("is the same as", lambda a, b: a == b), ("lies inside", _inside), ("holds", lambda a, b: _inside(b, a))):
        for node in to_run:
            for other in nodes:
                if other is not node and overlaps(outs[id(node)], outs[id(other)]):
                    raise RecipeError(
                        f"{node.path}: output_dir '{node.out_dir}': {how} the output of {other.path.name} "
                        f"('{other.out_dir}'); give each recipe its own output_dir"
                    )


def swap_into_place(work: Path, out: Path) -> None:
    """Move the finished `work` directory to `out`, replacing a previous output of ours.

    The old output is renamed aside first and removed only after the new one is in place: a
    crash between the two renames leaves both whole (`complete_interrupted_swap` finishes the
    job on the next run), never neither.
    """
    if out.exists():
        if not is_ours(out) and any(out.iterdir()):
            raise RecipeError(f"'{out}' received files the toolkit did not write during the run; the finished output is left in '{work}'")
        files = _read_info(out).get("files")
        if isinstance(files, dict):  # files someone put in the old output are kept (an output listing none: all ours)
            keep_foreign(out, work, {*files, "run_info.json"})
    replace_dir(work, out)


def complete_interrupted_swap(node: Node) -> None:
    """Finish what a crash inside `swap_into_place` left: a finished `.partial` of this exact
    recipe goes into place, and old outputs of ours set aside are removed."""
    work = partial_dir(node.out_dir)
    info = _read_info(work)
    if info.get("status") == "finished" and info.get("hash") == node.hash and is_ours(work):
        swap_into_place(work, node.out_dir)
    if node.out_dir.parent.is_dir():
        for aside in node.out_dir.parent.glob(f"{node.out_dir.name}.old-*"):
            if aside.is_dir() and is_ours(aside):
                shutil.rmtree(aside)


def run_node(node: Node, state: PartialState) -> dict:
    """Run one stage into `<out>.partial/`, then move it into place."""
    from accelerate.state import AcceleratorState
    from transformers import set_seed

    from .stages.common import append_metrics, last_checkpoint, write_card, write_resolved

    new_parents = [p for p in node.out_dir.parents if not p.exists()]  # removed again if the input is refused
    work = partial_dir(node.out_dir)
    if state.is_main_process:
        if work.exists() and _read_info(work).get("hash") != node.hash:
            if is_ours(work):
                shutil.rmtree(work)  # a partial run of an older recipe: nothing to resume
            else:
                work.rmdir()  # empty (check_outputs refused anything else): a run killed right after mkdir
        work.mkdir(parents=True, exist_ok=True)
        info = {"stage": node.recipe.stage, "hash": node.hash, "status": "running", "inputs": node.inputs()}
        (work / "run_info.json").write_text(json.dumps(info, indent=2))
    state.wait_for_everyone()

    stage = importlib.import_module(f"alignment.stages.{node.recipe.stage}")
    started = time.time()
    summary = {}
    try:
        if state.is_main_process or not getattr(stage, "MAIN_PROCESS_ONLY", False):
            # Seeded before the stage loads its model: a new head (reward) or new pad-token
            # embeddings are initialised the same way in every run of the recipe.
            set_seed(node.recipe.seed)
            # accelerate keeps one AcceleratorState per process and refuses an Accelerator with
            # another mixed precision than the first one's; stages of a chain may each ask for their
            # own (training.mixed_precision). Clear it, as transformers' TrainingArguments does for
            # every trainer, so each stage's Accelerator is built with its recipe's precision. The
            # PartialState (processes, device, process group) is kept.
            AcceleratorState._reset_state()
            summary = stage.run(node.recipe, node.inputs(), work)
    except RecipeError:
        # Bad input found before any training: leave nothing half-written behind.
        if state.is_main_process and last_checkpoint(work) is None:
            shutil.rmtree(work, ignore_errors=True)
            for parent in new_parents:  # deepest first
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
        raise
    state.wait_for_everyone()

    if state.is_main_process:
        summary["wall_seconds"] = round(time.time() - started, 2)
        append_metrics(work / "metrics.jsonl", {"summary": summary})
        write_resolved(work, node.recipe, node.inputs())
        if getattr(stage, "WRITES_MODEL", True):
            write_card(work, node.recipe, node.inputs().get("model"), summary)
        tensorboard = work / "checkpoints" / "runs"  # transformers' TensorBoard logs (training.report_to)
        if tensorboard.is_dir():
            shutil.move(str(tensorboard), str(work / "logs"))
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        info = {**_read_info(work), "status": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary,
                "files": written_files(work)}
        (work / "run_info.json").write_text(json.dumps(info, indent=2))
        swap_into_place(work, node.out_dir)
    state.wait_for_everyone()
    return summary


def check_precision(nodes: list[Node], on_cpu: bool, say=print) -> None:
    """fp16 on a CPU, before any stage trains: accelerate skips fp16 autocast on a CPU (there is
    no loss scaler there) and trains in full precision without a word. A recipe that asks for it
    is refused; the launcher's `--mixed_precision fp16` is said once."""
    if not on_cpu:
        return
    for node in nodes:
        if node.recipe.training.mixed_precision == "fp16":
            raise RecipeError(f"{node.path}: training.mixed_precision: fp16 needs a GPU (on a CPU accelerate trains in full "
                              "precision instead); use 'bf16' (autocast on the CPU), 'no' or 'auto'")
    if os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16":
        say("note: `--mixed_precision fp16` is not applied on a CPU: accelerate trains in full precision (bf16 is)")


def run(recipe_path: str | Path, overrides: list[str] = (), dry_run: bool = False, runs_dir: str | Path = "runs") -> list[Node]:
    nodes = plan(recipe_path, overrides, runs_dir=runs_dir)  # a mistake in a recipe is refused before accelerate starts
    from accelerate import PartialState

    from .models import check_local_inputs
    from .stages.common import use_cpu

    state = PartialState(cpu=use_cpu())
    if state.num_processes != launched_processes():  # a launcher that sets no WORLD_SIZE (mpirun)
        nodes = plan(recipe_path, overrides, num_processes=state.num_processes, runs_dir=runs_dir)
    for node in nodes:  # checkpoints given as paths are checked before any stage trains
        check_local_inputs(node.recipe.stage, {r: p for r, p in node.inputs().items() if r not in node.refs})
    say = print if state.is_main_process else (lambda *a, **k: None)
    check_precision(nodes, use_cpu(), say)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and use_cpu():
        trainers = [n.recipe.stage for n in nodes if not isinstance(n.recipe, RLRecipe) and _runs_on_every_process(n.recipe.stage)]
        if trainers:
            say(f"note: accelerate applies FSDP on GPUs only; on this CPU machine {', '.join(trainers)} train as plain "
                "data parallel (DDP over gloo)")
        if any(isinstance(n.recipe, RLRecipe) for n in nodes) and state.num_processes > 1:
            say("note: the RL stages shard their models with FSDP2 themselves (fully_shard over gloo), on this CPU "
                "machine as on GPUs")
    check_outputs(nodes, [n for n in nodes if not is_current(n)], probe=not dry_run)
    if state.is_main_process and not dry_run:
        for node in nodes:
            complete_interrupted_swap(node)
    state.wait_for_everyone()
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
    if nodes[-1].rounds_of and not dry_run:
        say(f"\n{nodes[-1].rounds_of}: per round\n" + round_table([n for n in nodes if n.rounds_of == nodes[-1].rounds_of]))
    report = nodes[-1].recipe.report
    if reported and not dry_run:
        if state.is_main_process:
            from .report import build_report

            say("\n" + build_report(report, nodes, reported, nodes[-1].recipe.world))
        state.wait_for_everyone()
    return nodes
