"""`python -m data_prep ...`: write datasets in the shapes the recipes read."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from alignment.demo import world


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    files = {
        "pretrain.jsonl": [{"text": t} for t in world.pretrain_corpus(args.pretrain, args.seed)],
        "sft.jsonl": world.sft_conversations(args.sft, args.seed),
        "preferences.jsonl": world.preference_pairs(args.pairs, args.seed),
        "eval_prompts.jsonl": [{"prompt": p} for p in world.eval_prompts(args.eval, args.seed)],
    }
    for name, rows in files.items():
        write_jsonl(out / name, rows)
        print(f"{out / name}: {len(rows)} rows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description="Prepare datasets for alignment recipes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="write the demo world's datasets as JSONL",
                       description="Write the demo world's pretraining corpus, SFT conversations, preference pairs "
                       "and held-out eval prompts as JSONL files.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--pretrain", type=int, default=20000, help="pretraining documents (default 20000)")
    p.add_argument("--sft", type=int, default=4000, help="SFT conversations (default 4000)")
    p.add_argument("--pairs", type=int, default=4000, help="preference pairs (default 4000)")
    p.add_argument("--eval", type=int, default=300, help="held-out eval prompts (default 300)")
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
