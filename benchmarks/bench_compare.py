"""`alignment compare` speed: batched generation vs a per-prompt `model.generate` loop, and the
wall time of the whole command on three demo models and 300 prompts.

    python benchmarks/bench_compare.py [--prompts 300] [--steps 150]

1. Builds the demo chain in a temporary directory (init -> pretrain -> sft -> dpo, each stage
   shortened to --steps optimizer steps so that the models stop like trained ones do).
2. Tokens/s of the compare path (`evaluation.generate`: left-padded batches of 64, KV cache) vs
   a loop calling `model.generate` one prompt at a time (KV cache too), on the sft model and the
   same held-out demo prompts, sampling at temperature 1 with up to 24 new tokens; reply tokens
   (EOS included) per second of generation. Both run in this process, alternating, best of 3.
3. Wall time of `alignment compare base=... sft=... dpo=... --baseline sft` as a user types it
   (a subprocess: start-up, loading, generation, KL passes, scoring, report.html included).
Run it on an otherwise idle machine; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignment import evaluation, templates
from alignment import models as model_layer
from alignment.demo import world
from alignment.pipeline import run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MAX_NEW_TOKENS = 24


def build_chain(work: Path, steps: int) -> dict[str, str]:
    overrides = [f"{name}:output_dir={work / name}" for name in ("init", "pretrain", "sft")]
    overrides += [f"output_dir={work / 'dpo'}", "report.models={}", f"pretrain:training.max_steps={steps}",
                  f"sft:training.max_steps={steps}", f"training.max_steps={max(steps // 3, 10)}"]
    run(RECIPES / "dpo.yaml", overrides)
    return {"base": str(work / "pretrain"), "sft": str(work / "sft"), "dpo": str(work / "dpo")}


def per_prompt_loop(model, tok, prompts: list[str]) -> int:
    """What a user writes without batching: one prompt at a time through `generate`."""
    torch.manual_seed(0)
    stops = model.generation_config.eos_token_id
    tokens = 0
    with torch.no_grad():
        for prompt in prompts:
            enc = tok(templates.render_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.0, top_k=0,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stops)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    return tokens


def batched(model, tok, prompts: list[str]) -> int:
    gens = evaluation.generate(model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, batch_size=64,
                            seed=0, progress=False)
    return sum(g.num_tokens for g in gens)


def tokens_per_second(fn, *args, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn(*args)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of pretrain and sft (dpo: a third)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = build_chain(work, args.steps)
        prompts = world.eval_prompts(args.prompts, 0)

        tok = model_layer.load_tokenizer(models["sft"])
        model = model_layer.load_causal_lm(models["sft"], tok).eval()
        ours = loop = 0.0
        for _ in range(3):  # alternate, so that a change in machine load hits both
            ours = max(ours, tokens_per_second(batched, model, tok, prompts, repeats=1))
            loop = max(loop, tokens_per_second(per_prompt_loop, model, tok, prompts, repeats=1))
        print(f"generation, sft model, {len(prompts)} prompts, temperature 1, <= {MAX_NEW_TOKENS} new tokens:")
        print(f"  compare path (batches of 64): {ours:8.0f} tokens/s")
        print(f"  per-prompt generate loop:     {loop:8.0f} tokens/s")
        print(f"  ratio: {ours / loop:.1f}x")

        command = ["alignment", "compare", *(f"{k}={v}" for k, v in models.items()), "--baseline", "sft",
                   "--num-prompts", str(args.prompts), "--out", str(work / "cmp"), "--no-progress"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        print("\n" + done.stdout.strip())
        print(f"\n`alignment compare` on 3 demo models x {args.prompts} prompts: {wall:.1f} s wall "
              f"(report.html {os.path.getsize(work / 'cmp' / 'report.html') / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
