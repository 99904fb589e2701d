"""Reports of a comparison: one summary (compare.Comparison) -> stdout table, report.md,
summary/report JSON, samples.jsonl and report.html (drawn in `report_html.py`).

`alignment compare`, the `compare` stage and the closing report of a pipeline all go
through `write_outputs` and `text_table`. The closing report: after the last stage, the
models the recipe's `report.models` names (label -> recipe name in the chain, or a model
directory) answer the same held-out demo prompts; the table shows each model's gold score
part by part with 95% bootstrap CIs, KL to the baseline (the SFT model, usually), win
rates against it, the paired difference between consecutive models, and the last stage's
own metrics. It is written to `<output_dir>/report.json`, `report.md` and `report.html`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .evaluation import CompareError, Comparison, compare_models, demo_prompt_source
from .config import GenerationOptions, ReportOptions
from .errors import RecipeError
from .formatting import KL_EXPLAINED, difference_lines, md_table, table_rows, title, win_rows
from .models import check_model_kind
from .demo import world
from .paths import keep_foreign, output_problem, replace_dir, write_atomic
from .report_html import render_html

MARKER = "alignment compare"  # summary.json's "generator": an output directory this toolkit wrote


# --------------------------------------------------------------------------- tables


def text_table(summary: dict, brief: bool = False) -> str:
    """The stdout table: fixed-width rows, then each model's paired difference to the one before it."""
    rows = table_rows(summary, brief)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if not brief:
        lines += difference_lines(summary)
        lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines)


def markdown(summary: dict, samples: list[dict], heading: str = "Comparison", examples: int = 5) -> str:
    s = summary["settings"]
    parts = [f"# {heading}", "", title(summary) + f", seed {s['seed']}.", ""]
    if "decoding" in s:
        used = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["decoding"].items())
        parts += [f"Decoding, the same for every model: {used}; nothing else from the models' generation_config.", ""]
    parts.append(md_table(table_rows(summary)))
    if summary["differences"]:
        parts += ["", "Paired differences (each model minus the one before it, same prompts):", ""]
        parts += [f"- {line}" for line in difference_lines(summary)]
    if summary["win_rates"]:
        parts += ["", "## Win rates (ties count half)", "", md_table(win_rows(summary))]
    for extra in summary.get("also", []):
        parts += ["", f"## {title(extra)}", "", md_table(table_rows(extra, brief=True))]
    if summary["notes"]:
        parts += ["", "## Notes", "", *(f"- {n}" for n in summary["notes"])]
    parts += ["", KL_EXPLAINED, "", "## Examples", ""]
    for row in samples[:examples]:
        parts.append(f"- `{row['prompt']}`")
        for label, reply in row["replies"].items():
            scores = ", ".join(f"{k} {reply[k]:.2f}" for k in summary["score_kinds"] if k in reply)
            cut = "" if reply["finished"] else " (no EOS)"
            parts.append(f"  - **{label}**: `{reply['text']}`{cut} {scores}")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- files


def write_outputs(comparison: Comparison, out_dir: Path, *, prefix: str = "", heading: str = "Comparison",
                  summary_name: str = "summary.json", extra: dict | None = None) -> list[Path]:
    """report.html, report.md, samples.jsonl and the summary JSON, in `out_dir` (which exists)."""
    summary = {"generator": MARKER, **comparison.summary, **(extra or {})}
    files = {
        summary_name: json.dumps(summary, indent=2),
        f"{prefix}samples.jsonl": "".join(json.dumps(row) + "\n" for row in comparison.samples),
        "report.md": markdown(summary, comparison.samples, heading),
        "report.html": render_html(summary, comparison.samples, heading),
    }
    for name, text in files.items():
        write_atomic(out_dir / name, text)
    return [out_dir / name for name in files]


def check_out_dir(out_dir: Path) -> None:
    """Before any generation: an existing output directory is replaced only if `alignment compare`
    wrote it, and the place can be written."""
    if out_dir.exists() and out_dir.is_dir() and not _ours(out_dir):
        raise CompareError("out", f"{out_dir} exists and was not written by alignment compare; choose another")
    problem = output_problem(out_dir)
    if problem:
        raise CompareError("out", f"{out_dir}: {problem}")


def _ours(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / "summary.json").read_text()).get("generator") == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def write_report_dir(comparison: Comparison, out_dir: Path, heading: str = "Comparison") -> None:
    """Write every output into a temporary directory beside `out_dir`, then move it into place."""
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = write_outputs(comparison, tmp, heading=heading)
        keep_foreign(out_dir, tmp, {p.name for p in written})  # files someone put in an earlier report stay
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the closing report of a run


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
        elif _is_path(target):  # a directory given that is not there: never left out silently
            what = "a file, not a model directory" if Path(target).exists() else "no such directory"
            raise RecipeError(f"report.models.{label}: '{target}': {what} (give a model directory, or the name of a "
                              f"recipe in this run: {', '.join(by_name)})")
        else:
            names = ", ".join(by_name)
            notes.append(f"report: '{label}' left out: '{target}' is neither a recipe in this run ({names}) nor a model directory")
    return models, notes


def _is_path(target: str) -> bool:
    """Whether a `report.models` entry is written as a path (a separator, or ., .., ~ or / in
    front) rather than as a recipe name."""
    return "/" in target or os.sep in target or target.startswith((".", "~"))


def report_baseline(options: ReportOptions, models: dict[str, str]) -> str:
    labels = list(models)
    if options.baseline in models:
        return options.baseline
    return labels[-2] if len(labels) > 1 else labels[0]


def build_report(options: ReportOptions, nodes: list, models: dict[str, str], world_name: str = "default") -> str:
    """Compare the report's models on held-out demo prompts of the world `world_name` (the top
    recipe's `world`); write report.json/md/html and report_samples.jsonl beside the last stage's
    model; return the text to print."""
    prompts = world.eval_prompts(options.num_prompts, options.seed, world=world_name)
    source = demo_prompt_source(world_name)
    baseline = report_baseline(options, models)

    def run(temperature: float) -> Comparison:
        generation = GenerationOptions(
            max_new_tokens=options.max_new_tokens, temperature=temperature, seed=options.seed,
            batch_size=options.batch_size,
        )
        return compare_models(models, prompts, generation, baseline=baseline, prompt_source=source)

    main = run(options.temperature)
    also = [run(0.0).summary] if options.also_greedy and options.temperature > 0 else []
    top = nodes[-1]
    stage_summary = json.loads((top.out_dir / "run_info.json").read_text()).get("summary", {})
    metrics = "\n".join(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in stage_summary.items())
    examples = []
    for row in main.samples[:3]:
        examples.append(f"  {row['prompt']}")
        for label, reply in row["replies"].items():
            cut = "" if reply["finished"] else " (no EOS)"
            examples.append(f"    {label:>8}: {reply['text']!r}{cut}  gold {reply['gold']:.2f}")
    text = f"{title(main.summary)}:\n{text_table(main.summary)}\n"
    for extra in also:
        text += f"\nGreedy replies to the same prompts (at most {options.max_new_tokens} new tokens):\n"
        text += text_table(extra, brief=True) + "\n"
    text += f"\n{top.name} ({top.recipe.stage}) metrics:\n{metrics}\n\nExamples:\n" + "\n".join(examples) + "\n"
    write_outputs(main, top.out_dir, prefix="report_", heading=f"What alignment changed: {top.name}",
                  summary_name="report.json", extra={"also": also, "stage_summary": stage_summary})
    return text
