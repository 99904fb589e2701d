"""DPO speed: our stage vs a plain TRL DPOTrainer script, and dpo.reference precompute vs copy.

    python benchmarks/bench_dpo.py [--steps 200] [--repeats 3] [--batch 32]

Builds the demo base checkpoint (init recipe) in a temporary directory, then:

1. ours vs plain TRL: sigmoid DPO (beta 0.1) with a frozen reference copy, same model, demo
   pairs, batch, max_length and learning rate; the two alternate `--repeats` times and the
   median training steps/s are compared (the trainer's own train_steps_per_second, which
   excludes model loading, tokenisation and saving on both sides). Target: ratio >= 0.95.
2. dpo.reference precompute vs copy, through our stage, each in a fresh subprocess: steps/s,
   the stage's wall time (precompute pass included), and the child's peak memory (RSS; and
   torch.cuda.max_memory_allocated on a GPU). Expect precompute faster per step and smaller;
   the demo model is ~1.5 MB, so at this size peak RSS is mostly the interpreter and libraries.
Run it on an otherwise idle machine (~3-4 min on 2 CPU cores): the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from alignment.demo import world
from alignment.pipeline import run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LR, BETA, WARMUP, LOG_STEPS = 5e-4, 0.1, 0.05, 10


def plain_trl(base: Path, out: Path, steps: int, batch: int, max_length: int, n: int) -> float:
    """What a user would write with TRL alone (the conversational format our stage feeds TRL)."""
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    ref_model = AutoModelForCausalLM.from_pretrained(base)
    pairs = world.preference_pairs(n, 0)
    data = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p["prompt"]}] for p in pairs],
        "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in pairs],
    })
    args = DPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR, beta=BETA,
        loss_type=["sigmoid"], max_length=max_length, use_cpu=not torch.cuda.is_available(), bf16=False,
        activation_checkpointing=False, report_to="none", save_strategy="no", logging_steps=LOG_STEPS,
        logging_first_step=True, lr_scheduler_type="cosine", warmup_steps=WARMUP, seed=42,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)
    return trainer.train().metrics["train_steps_per_second"]


def ours(base: Path, out: Path, steps: int, batch: int, max_length: int, n: int, reference: str = "copy") -> dict:
    """Our dpo stage; returns its run_info.json summary (steps_per_second, wall_seconds, ...)."""
    [node] = run(RECIPES / "dpo.yaml", [
        f"model={base}", f"output_dir={out}", "report.models={}", "dpo.loss_type=sigmoid", f"dpo.beta={BETA}",
        f"dpo.reference={reference}", f"training.max_steps={steps}", f"training.per_device_train_batch_size={batch}",
        f"training.max_length={max_length}", f"training.learning_rate={LR}", f"training.warmup_steps={WARMUP}",
        f"training.logging_steps={LOG_STEPS}", "training.mixed_precision='no'", f"data.num_examples={n}",
        "data.eval_examples=0",
    ])
    return json.loads((node.out_dir / "run_info.json").read_text())["summary"]


def one_reference(args) -> None:
    """Child mode: run our stage once with `args._one` as dpo.reference and print its figures as JSON."""
    summary = ours(Path(args._base), Path(args._out), args.steps, args.batch, args.max_length, args.examples, args._one)
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH_RESULT " + json.dumps({**{k: summary[k] for k in ("steps_per_second", "wall_seconds")}, **peak}))


def in_child(args, reference: str, base: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--_one", reference, "--_base", str(base), "--_out", str(out),
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--examples", str(args.examples)]
    stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("BENCH_RESULT "))[13:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--examples", type=int, default=None, help="pairs generated (default: steps x batch)")
    parser.add_argument("--repeats", type=int, default=3)
    for hidden in ("--_one", "--_base", "--_out"):  # child mode of part 2
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.examples = args.examples or args.steps * args.batch
    if args._one:
        return one_reference(args)

    shape = (args.steps, args.batch, args.max_length, args.examples)
    load_before = os.getloadavg()[0]  # other CPU jobs skew every figure below
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = run(RECIPES / "init.yaml", [f"output_dir={tmp / 'base'}"])[-1].out_dir
        ours_sps, trl_sps = [], []
        for i in range(args.repeats):  # alternate, and swap which goes first each round
            for side in (("trl", "ours") if i % 2 == 0 else ("ours", "trl")):
                if side == "trl":
                    trl_sps.append(plain_trl(base, tmp / f"trl{i}", *shape))
                else:
                    ours_sps.append(ours(base, tmp / f"ours{i}", *shape)["steps_per_second"])
        # Each reference mode in its own process, so that peak memory is its own.
        modes = {mode: in_child(args, mode, base, tmp / f"ref-{mode}") for mode in ("copy", "precompute")}

    a, b = statistics.median(ours_sps), statistics.median(trl_sps)
    print(f"\nDPO (sigmoid, copy reference) steps/s: batch {args.batch}, max_length {args.max_length}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads, median of {args.repeats}; "
          f"1-min load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"  ours:      {a:.3f}   runs {[round(x, 3) for x in ours_sps]}")
    print(f"  plain TRL: {b:.3f}   runs {[round(x, 3) for x in trl_sps]}")
    print(f"  ratio ours/TRL: {a / b:.3f}  (target >= 0.95)")
    print("\ndpo.reference, our stage, one fresh process each:")
    for mode, r in modes.items():
        cuda = f", peak CUDA {r['cuda_mib']:.0f} MiB" if "cuda_mib" in r else ""
        print(f"  {mode:<10}  {r['steps_per_second']:.3f} steps/s, stage wall {r['wall_seconds']:.1f} s, "
              f"peak RSS {r['rss_mib']:.0f} MiB{cuda}")
    pre, copy = modes["precompute"], modes["copy"]
    print(f"  precompute/copy: steps/s x{pre['steps_per_second'] / copy['steps_per_second']:.2f}, "
          f"wall x{pre['wall_seconds'] / copy['wall_seconds']:.2f}, peak RSS x{pre['rss_mib'] / copy['rss_mib']:.2f}")


if __name__ == "__main__":
    main()
