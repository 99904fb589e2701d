"""SFT steps/s through our stage vs a plain TRL SFTTrainer script, same model/data/batch.

    python benchmarks/bench_sft.py [--steps 150] [--repeats 3]

Builds the demo base checkpoint (init recipe) in a temporary directory, then alternates
the two runs `--repeats` times and compares median training steps/s (the trainer's own
train_steps_per_second, which excludes model loading and tokenisation in both).
Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from alignment.demo import world
from alignment.pipeline import run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def plain_trl(base: Path, out: Path, steps: int, batch: int, max_length: int, n: int) -> float:
    """What a user would write with TRL alone."""
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    data = Dataset.from_list(world.sft_conversations(n, 0))
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        max_length=max_length, assistant_only_loss=True, use_cpu=True, bf16=False,
        activation_checkpointing=False, report_to="none", save_strategy="no", logging_steps=10,
        lr_scheduler_type="cosine", warmup_steps=0.05, seed=42, dataloader_num_workers=0, disable_tqdm=True,
    )
    result = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train()
    return result.metrics["train_steps_per_second"]


def ours(base: Path, out: Path, steps: int, batch: int, max_length: int, n: int) -> float:
    [node] = run(RECIPES / "sft.yaml", [
        f"model={base}", f"output_dir={out}", f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={batch}", f"training.max_length={max_length}",
        f"data.num_examples={n}", "training.logging_steps=10",
    ])
    rows = [json.loads(line) for line in (node.out_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["train_steps_per_second"] for r in rows if "train_steps_per_second" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(RECIPES / "init.yaml", [f"output_dir={tmp / 'base'}"])
        shape = (args.steps, args.batch, args.max_length, args.examples)
        ours_sps, trl_sps = [], []
        for i in range(args.repeats):
            trl_sps.append(plain_trl(tmp / "base", tmp / f"trl{i}", *shape))
            ours_sps.append(ours(tmp / "base", tmp / f"ours{i}", *shape))
    a, b = statistics.median(ours_sps), statistics.median(trl_sps)
    print(f"\nSFT steps/s (batch {args.batch}, max_length {args.max_length}, {args.steps} steps, median of {args.repeats})")
    print(f"  ours:      {a:.2f}   runs {[round(x, 2) for x in ours_sps]}")
    print(f"  plain TRL: {b:.2f}   runs {[round(x, 2) for x in trl_sps]}")
    print(f"  ratio ours/TRL: {a / b:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
