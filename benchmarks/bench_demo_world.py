"""What each stage of the default chain changes in the demo world, per part of the gold score.

    python benchmarks/bench_demo_world.py                 # both parts, seeds 0 and 1 (~15 min on 1 core)
    python benchmarks/bench_demo_world.py --part table --seeds 0
    python benchmarks/bench_demo_world.py --part curves

`table`: runs the default chain (recipes/dpo.yaml without its closing report) once per seed in
a scratch directory, then has base (pretrain), sft and dpo answer the same held-out prompts,
greedy and at temperature 1, and prints the share of replies earning each part of the gold
score (polite / content / concise), the mean gold score, and content per task.

`curves`: greedy content accuracy against SFT steps, started from `init` and from the
pretrained checkpoint, with the default SFT recipe, once per seed: the checkpoints of one
default-length SFT run (with a decaying learning rate the checkpoint after N steps is not
exactly what an N-step run gives). The sft stage is called directly so that its
intermediate checkpoints survive.

These are the figures in docs/demo_world.md. Numbers vary a little with the machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import set_seed  # noqa: E402

from alignment import models as model_layer  # noqa: E402
from alignment.evaluation import generate  # noqa: E402
from alignment.recipe_file import load_recipe, parse_override  # noqa: E402
from alignment.demo import world  # noqa: E402
from alignment.pipeline import run  # noqa: E402
from alignment.stages import sft as sft_stage  # noqa: E402

PARTS = ("polite", "content", "concise")


def measure(path: str, prompts: list[str], temperature: float, seed: int = 0) -> dict:
    """Share of replies earning each gold part, mean gold score, and content rate per task."""
    tok = model_layer.load_tokenizer(path)
    model = model_layer.load_causal_lm(path, tok)
    gens = generate(model, tok, prompts, max_new_tokens=24, temperature=temperature, seed=seed, progress=False)
    earned = collections.Counter()
    by_task = collections.defaultdict(list)
    total = 0.0
    for g in gens:
        parts = world.score_parts(g.prompt, g.text, g.finished)
        total += sum(parts.values())
        earned.update(k for k, v in parts.items() if v > 0)
        by_task[world.parse_prompt(g.prompt).kind].append(parts["content"] > 0)
    n = len(gens)
    return {
        **{k: earned[k] / n for k in PARTS},
        "gold": total / n,
        **{f"content/{k}": sum(v) / len(v) for k, v in sorted(by_task.items())},
    }


@contextlib.contextmanager
def scratch(prefix: str):
    """A temporary directory holding a copy of recipes/, as the working directory."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(REPO / "recipes", work / "recipes")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        yield work
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


def table(seeds: list[int], num_prompts: int) -> None:
    prompts = world.eval_prompts(num_prompts, 0)
    rows = []
    for seed in seeds:
        with scratch(f"demo_world_{seed}_"):
            started = time.time()
            run("recipes/dpo.yaml", [f"*:seed={seed}", f"*:data.seed={seed}", "report.models={}"])
            print(f"seed {seed}: chain built in {time.time() - started:.0f} s (1 process)", flush=True)
            for label, name in (("base", "pretrain"), ("sft", "sft"), ("dpo", "dpo")):
                for temperature in (0.0, 1.0):
                    rows.append((seed, label, temperature, measure(f"runs/{name}", prompts, temperature, seed)))
                    print("row", rows[-1], flush=True)

    tasks = [k for k in rows[0][3] if k.startswith("content/")]
    head = ["seed", "model", "T", *PARTS, "gold", *(t.split("/")[1] for t in tasks)]
    print(f"\nShare of {num_prompts} held-out prompts earning each part of the gold score:")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for seed, label, temperature, m in sorted(rows, key=lambda r: (r[2], r[0])):
        cells = [str(seed), label, "greedy" if temperature == 0 else f"{temperature:g}"]
        cells += [f"{m[k]:.0%}" for k in PARTS] + [f"{m['gold']:.3f}"] + [f"{m[t]:.0%}" for t in tasks]
        print("| " + " | ".join(cells) + " |")


def curves(seeds: list[int], num_prompts: int, every: int) -> None:
    prompts = world.eval_prompts(num_prompts, 0)
    results = {}  # (seed, start) -> {step: measure}
    for seed in seeds:
        with scratch(f"demo_curves_{seed}_") as work:
            seeded = [f"*:seed={seed}", f"*:data.seed={seed}"]
            run("recipes/pretrain.yaml", seeded)
            raws = [o.split(":", 1)[1] for o in seeded] + [f"training.save_steps={every}"]
            recipe = load_recipe("recipes/sft.yaml", [(p, v, raw) for raw in raws for _, p, v in [parse_override(raw)]])
            for start in ("init", "pretrain"):
                out = work / f"sft_from_{start}"
                out.mkdir()
                set_seed(seed)  # as the pipeline does before each stage
                sft_stage.run(recipe, {"model": f"runs/{start}"}, out)
                curve = results[seed, start] = {}
                for step, c in sorted((int(c.name.split("-")[1]), c) for c in (out / "checkpoints").glob("checkpoint-*")):
                    curve[step] = measure(str(c), prompts, 0.0)
                    print("point", seed, start, c.name, curve[step], flush=True)
    print(f"\nGreedy content accuracy on {num_prompts} held-out prompts after N steps of the default SFT run:")
    for seed in seeds:
        a_run, b_run = results[seed, "init"], results[seed, "pretrain"]
        tasks = [k for k in a_run[min(a_run)] if k.startswith("content/")]
        print(f"\nseed {seed}")
        print("| SFT steps | from init | from pretrain | " + " | ".join(f"{t.split('/')[1]} (init / pretrain)" for t in tasks) + " |")
        print("|" + "---|" * (3 + len(tasks)))
        for s in sorted(a_run):
            a, b = a_run[s], b_run[s]
            cells = [str(s), f"{a['content']:.0%}", f"{b['content']:.0%}"] + [f"{a[t]:.0%} / {b[t]:.0%}" for t in tasks]
            print("| " + " | ".join(cells) + " |")
    summarise_curves(results, seeds)


def steps_to(curve: dict, level: float = 0.9) -> int | None:
    """The first checkpoint step whose greedy content reaches ``level``, or None."""
    return next((s for s in sorted(curve) if curve[s]["content"] >= level), None)


def summarise_curves(results: dict, seeds: list[int]) -> None:
    """Across seeds: mean content per step from each start, and per seed the final content and
    the steps to 90% and to 95%: single runs swing by tens of points, so only the aggregate
    means much."""
    steps = sorted(results[seeds[0], "init"])
    print(f"\nMean greedy content over seeds {seeds}:")
    print("| SFT steps | from init | from pretrain | pretrain ahead on |")
    print("|---|---|---|---|")
    for s in steps:
        a = [results[seed, "init"][s]["content"] for seed in seeds]
        b = [results[seed, "pretrain"][s]["content"] for seed in seeds]
        ahead = sum(y > x for x, y in zip(a, b))
        print(f"| {s} | {sum(a) / len(a):.1%} | {sum(b) / len(b):.1%} | {ahead} of {len(seeds)} seeds |")
    print("\n| seed | final, init / pretrain | steps to 90%, init / pretrain | steps to 95%, init / pretrain |")
    print("|---|---|---|---|")
    for seed in seeds:
        a, b = results[seed, "init"], results[seed, "pretrain"]
        cells = [str(seed), f"{a[steps[-1]]['content']:.1%} / {b[steps[-1]]['content']:.1%}"]
        cells += [" / ".join(str(steps_to(c, level) or "not reached") for c in (a, b)) for level in (0.9, 0.95)]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("table", "curves", "both"), default="both")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--num-prompts", type=int, default=400, help="held-out prompts per evaluation")
    ap.add_argument("--every", type=int, default=50, help="SFT steps between points of the curves")
    args = ap.parse_args()
    if args.part in ("table", "both"):
        table(args.seeds, args.num_prompts)
    if args.part in ("curves", "both"):
        curves(args.seeds, args.num_prompts, args.every)


if __name__ == "__main__":
    main()
