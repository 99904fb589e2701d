"""GRPO speed: our `grpo` stage against TRL's trl.GRPOTrainer (the version installed here), in one go.

Both train the same tiny model (the demo world's init checkpoint, built here by our pipeline from
recipes/init.yaml: a 2-layer, 256-wide Llama with its BPE tokenizer) on the same demo training
prompts (`alignment.demo.world.train_prompts`, rendered with the tokenizer's chat template: ours
renders them itself, TRL gets them in conversational format and applies the same template), with
the same reward, the demo gold oracle (`alignment.rewards.gold`; for TRL wrapped as a reward
function `gold(prompts, completions, completion_ids, **kw)`, a reply is finished when its last id
is EOS, exactly as ours decides), and the same settings:

    G (num_generations) 8, batch 64 episodes (8 prompts x 8 replies) per rollout and per optimizer
    step (TRL: per_device_train_batch_size 64, gradient_accumulation_steps 1, hence
    generation_batch_size 64 and steps_per_generation 1; ours: batch_size 64, num_minibatches 1),
    one update per rollout batch (num_iterations 1), replies of at most 24 tokens, temperature 1,
    top_p 1, top_k 0, no repetition penalty, beta 0.04 (k3) with a frozen reference model on both
    sides, epsilon 0.2, per-reply loss then mean over replies (ours loss_aggregation 'sequence' =
    TRL loss_type 'grpo'), advantages scaled by the group's std (scale_rewards 'group'),
    truncated replies kept in the loss, AdamW lr 1e-4 linear, no warm-up, weight decay 0, grad
    clip 1.0, float32, no gradient checkpointing, dropout off, CPU, no vLLM, logging and saving
    off.

Episodes per second are measured the same way for both, in the process that trains: from the
end of the first iteration (the warm-up, left out on both sides) to the end of the last one
(ours: where the loop writes an iteration's metrics; TRL: on_step_end), so start-up and model
loading are left out too; by the wall clock and by the process's CPU time (the latter is steadier
when other work shares the cores). Each run is a fresh process; the sides alternate (ours, TRL,
ours, ...) for --repeats runs each. Printed: the median over runs of each side, its best run,
and the ratio ours / TRL as the median of the per-run ratios (each run of ours against the TRL
run right after it, i.e. under similar load). Time splits over the same timed iterations: ours
from metrics.jsonl's `time/*` keys (generation / scoring / optimisation; "other": metrics and
logging), TRL's from timers around GRPOTrainer._generate (generation) and
_generate_and_score_completions (the rest of it: scoring), the rest of the step: optimisation.

Not the same in the two, by design of each: both leave out the "old" log-prob forward pass when
the samples are on-policy (TRL: num_iterations 1 and steps_per_generation = gradient_accumulation_
steps; ours: one pass over one minibatch, `old_logprobs_from_update`) and take the old log-probs
(ours: and the entropy) from the update's own forward, detached. Ours runs each prompt once per
group of G replies (its keys and values are shared by the group's rows, `generation.
shared_prompt_cache`): in the sampling prefill, the reference's pass and the update's forward and
backward, where TRL runs prompt + completion for every row (here 8 x 11 + 64 x 24 = 1,624 instead
of 64 x 35 = 2,240 tokens per pass: -27%); ours tokenises each distinct prompt once. Ours also
leaves reply columns after every reply's end out of its passes; that saves nothing here (nearly
every reply runs to the full length) but most of a pass on a model that stops (the SFT model of
recipes/grpo.yaml: its grpo stage went from 56 s to 32 s with these changes, same metrics).
The prompts drawn differ (each side shuffles its own way) but come from the same 512.

The init checkpoint's random weights almost never sample EOS, so nearly every reply runs to the
full reply length on both sides: both do the same work per episode (the table prints the mean
reply length of each side to show it).

    python benchmarks/bench_grpo.py                                  # all cores
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_grpo.py   # one thread on one pinned core

At a realistic size: --model takes any causal LM checkpoint with its tokenizer (for example the
SmolLM2-135M-shaped one benchmarks/bench_scale.py builds in its --work directory) and --prompts a
.jsonl file with a "prompt" column (bench_scale writes prompts.jsonl, each --prompt-len tokens
after the chat template). The gold oracle grades demo prompts only, so with --prompts both sides
are rewarded by `distinct_characters` below (a prompt-independent toy: the share of distinct
characters in the reply), called as a Python reward function on both sides:

    python benchmarks/bench_scale.py --only ppo --variants full --steps 1 --sides ours   # builds /tmp/bench_scale
    python benchmarks/bench_grpo.py --model /tmp/bench_scale/policy --prompts /tmp/bench_scale/prompts.jsonl \
        --work /tmp/bench_grpo_scale --num-generations 8 --batch 8 --response-length 128 --iterations 3 --repeats 1

Measured (torch 2.13 CPU, transformers 5.24, TRL 1.16.0; one thread pinned to one core of a 2-core
VM whose other core, and at times this one, ran other training jobs, so even the CPU time is
noisy: per-run ratios 1.11x to 1.49x), `OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_grpo.py
--num-generations 8 --batch 64 --response-length 24 --iterations 8 --repeats 5`:

                               episodes/s  best run  per CPU s  reply len
    ours (alignment grpo)            63.2      73.6       64.2       23.2
    TRL 1.16.0 GRPOTrainer           50.6      54.2       51.4       22.5
    ratio ours / TRL                1.22x     1.36x      1.22x

    our time split (metrics.jsonl time/*): generation 35%, scoring 15%, optimisation 49% of 1.01 s an iteration
    TRL's time split:                      generation 32%, scoring 17%, optimisation 51% of 1.26 s an iteration

A second run (--repeats 3, same load) gave 1.20x per CPU second, 1.34x best run; split 37/15/48%.
Before these changes (the old log-probs always taken in scoring, every row running its prompt),
the same command gave 0.89x per CPU second (0.93x and 0.97x in earlier runs); leaving out the
old-log-prob pass alone: 1.01x. What is left is arithmetic: nearly all of both sides' time is
the same transformers forward and backward passes (matrix products most of it), and per
iteration ours runs 8,112 token passes (sampling 8 x 10 + 64 + 23 x 64 = 1,616, reference 1,624,
update 3 x 1,624 counting the backward as two) where TRL runs 11,136 (2,176 + 2,240 + 3 x 2,240):
1.37x is the ceiling of doing less work here. 1.5x would need faster passes than transformers'
own (both sides sample through `generate`, whose 24 decoding steps are most of generation).
At SmolLM2-135M's shape (--model/--prompts as above: prompts of 256 tokens, G 8, batch 8,
--iterations 2, idle 2-core machine, both threads): with replies of 256 tokens 1.45x (101 s against
147 s an iteration; --repeats 1), then 1.32x and 1.33x (--repeats 2); with replies of 128 tokens
1.68x (58 s against 98 s; --repeats 1): the prompt,
run once per group instead of G times, is a large share of the work there.
Figures also in docs/benchmarks.md ("GRPO against TRL's GRPOTrainer").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MARK = "BENCH_GRPO_RESULT "  # a worker's result line on stdout

SETTINGS = dict(num_generations=8, batch=64, response_length=24, temperature=1.0, beta=0.04, epsilon=0.2,
                learning_rate=1e-4, num_prompts=512, seed=0)


def build_inputs(work: Path, s: dict) -> None:
    """The policy (and reference): the demo init checkpoint unless --model; the prompts: the demo
    training prompts unless --prompts."""
    from alignment.demo import world
    from alignment.pipeline import run

    if s["model"] is None and not (work / "policy" / "model.safetensors").exists():
        run(REPO / "recipes" / "init.yaml", [f"output_dir={work / 'policy'}"])
    if s["prompts"] is None:
        prompts = [row["prompt"] for row in world.train_prompts(s["num_prompts"], 0)]
    else:
        prompts = [json.loads(line)["prompt"] for line in Path(s["prompts"]).read_text().splitlines() if line.strip()]
    (work / "prompts.json").write_text(json.dumps(prompts))


def policy_dir(work: Path, s: dict) -> Path:
    return Path(s["model"]) if s["model"] else work / "policy"


def distinct_characters(prompts: list, completions: list, **_) -> list[float]:
    """Toy reward for prompts the gold oracle cannot grade: the share of distinct characters in the
    reply (completions as plain strings, ours, or as conversational messages, TRL's)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t)) / max(len(t), 1) for t in texts]


def our_worker(work: Path, iterations: int, s: dict, out: Path) -> dict:
    """Our side, in its own process: the grpo recipe through our pipeline, stamped at each iteration's end."""
    import alignment.stages.rl as loop
    from alignment.pipeline import run

    stamps = []
    write = loop.append_metrics

    def append_metrics(path, record):  # called once per iteration, after its optimizer step
        stamps.append((time.perf_counter(), time.process_time()))
        write(path, record)

    loop.append_metrics = append_metrics
    for stale in (out, out.with_name(out.name + ".partial")):  # else the stage is up to date (or resumes)
        shutil.rmtree(stale, ignore_errors=True)
    run(REPO / "recipes" / "grpo.yaml", [
        f"model={policy_dir(work, s)}", f"output_dir={out}", "report.models={}",  # grpo.yaml: reward_fn: gold
        *([] if s["prompts"] is None else [f"reward_fn={Path(__file__).resolve()}:distinct_characters",
                                           f"data.source={s['prompts']}", "data.max_prompt_length=4096"]),
        f"data.num_examples={s['num_prompts']}", f"grpo.batch_size={s['batch']}",
        f"grpo.total_episodes={s['batch'] * iterations}", f"grpo.num_generations={s['num_generations']}",
        f"grpo.response_length={s['response_length']}", f"grpo.temperature={s['temperature']}", "grpo.top_p=1.0",
        f"grpo.beta={s['beta']}", f"grpo.epsilon={s['epsilon']}", "grpo.num_iterations=1", "grpo.num_minibatches=1",
        "grpo.loss_aggregation=sequence", "grpo.scale_rewards=true", "grpo.mask_truncated_completions=false",
        "grpo.missing_eos_penalty=null", "grpo.kl_estimator=k3", "grpo.kl_in=loss",
        f"training.learning_rate={s['learning_rate']}", "training.lr_scheduler_type=linear", "training.warmup_steps=0",
        "training.weight_decay=0.0", "training.max_grad_norm=1.0", "training.gradient_accumulation_steps=1",
        "training.mixed_precision=no", "training.save_steps=0", f"seed={s['seed']}",
    ])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "objective/kl" in r]
    assert len(steps) == len(stamps) == iterations, (len(steps), len(stamps), iterations)
    split = {k: sum(r[f"time/{k}"] for r in steps[1:]) for k in ("generation", "scoring", "optimisation")}
    split["other"] = stamps[-1][0] - stamps[0][0] - sum(split.values())  # metrics, logging
    return {
        **rates(stamps, s["batch"]),
        "split": split,
        "reply_length": sum(r["response_length"] for r in steps) / len(steps),
        "score": sum(r["objective/scores"] for r in steps) / len(steps),
    }


def rates(stamps: list[tuple[float, float]], batch: int) -> dict:
    """Episodes/s from the first iteration's end to the last's, by the wall clock and by the process's CPU time."""
    (wall0, cpu0), (wall1, cpu1) = stamps[0], stamps[-1]
    episodes = (len(stamps) - 1) * batch
    return {"episodes_per_second": episodes / (wall1 - wall0), "episodes_per_cpu_second": episodes / (cpu1 - cpu0)}


def trl_worker(work: Path, iterations: int, s: dict, out: Path) -> dict:
    """TRL's side, in its own process: GRPOTrainer on the same checkpoint, prompts, reward and settings."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignment.templates import render_prompt
    from alignment.rewards import gold as our_gold

    tok = AutoTokenizer.from_pretrained(str(policy_dir(work, s)))
    prompts = json.loads((work / "prompts.json").read_text())
    # TRL renders conversational prompts with the tokenizer's chat template (add_generation_prompt,
    # no special tokens added): check it gives exactly the token ids our stage samples from.
    ours = tok(render_prompt(tok, prompts[0]), add_special_tokens=False)["input_ids"]
    theirs = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    assert list(ours) == list(theirs), (ours, theirs)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    eos = {tok.eos_token_id}
    seen = {"replies": 0, "tokens": 0, "score": 0.0}

    def gold(prompts, completions, completion_ids, **kw):
        """The demo gold oracle as a TRL reward function (conversational prompts and completions)."""
        score = our_gold if s["prompts"] is None else distinct_characters
        scores = score(
            prompts=[p[-1]["content"] for p in prompts],
            completions=[c[-1]["content"] for c in completions],
            finished=[bool(ids) and ids[-1] in eos for ids in completion_ids],
        )
        seen["replies"] += len(scores)
        seen["tokens"] += sum(len(ids) for ids in completion_ids)
        seen["score"] += sum(scores)
        return scores

    stamps, clock, marks = [], {"generation": 0.0, "generation+scoring": 0.0}, []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))
            marks.append(dict(clock))

    def timed(fn, key):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock[key] += time.perf_counter() - started
        return wrapper

    args = GRPOConfig(
        output_dir=str(out),
        # one generation batch of `batch` episodes per optimizer step, one optimizer step per generation
        per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1, num_generations=s["num_generations"],
        num_iterations=1, max_steps=iterations,
        max_completion_length=s["response_length"], temperature=s["temperature"], top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, use_vllm=False,
        beta=s["beta"], epsilon=s["epsilon"], loss_type="grpo", scale_rewards="group", mask_truncated_completions=False,
        importance_sampling_level="token", top_entropy_quantile=1.0,
        learning_rate=s["learning_rate"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
        model_init_kwargs={"dtype": torch.float32},
        report_to="none", save_strategy="no", logging_strategy="no", log_completions=False, disable_tqdm=True,
        seed=s["seed"], dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=str(policy_dir(work, s)), reward_funcs=gold, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    assert trainer.ref_model is not None, "TRL made no reference model"
    # TRL's split: _generate (tokenise, sample, decode) inside _generate_and_score_completions (also the
    # reference forward, rewards, advantages); the rest of the step: loss forward, backward, optimizer step
    trainer._generate = timed(trainer._generate, "generation")
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "generation+scoring")
    trainer.train()
    assert len(stamps) == iterations, (len(stamps), iterations)
    gen = marks[-1]["generation"] - marks[0]["generation"]
    both = marks[-1]["generation+scoring"] - marks[0]["generation+scoring"]
    return {
        **rates(stamps, s["batch"]),
        "split": {"generation": gen, "scoring": both - gen, "optimisation": stamps[-1][0] - stamps[0][0] - both},
        "reply_length": seen["tokens"] / seen["replies"],  # EOS counted, as ours counts it
        "score": seen["score"] / seen["replies"],
        "version": trl.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8, help="iterations (= optimizer steps) per run; "
                        "the first is the warm-up and is not timed")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (ours, TRL, ours, ...); "
                        "medians are reported")
    parser.add_argument("--num-generations", type=int, default=SETTINGS["num_generations"], help="G")
    parser.add_argument("--batch", type=int, default=SETTINGS["batch"], help="episodes per iteration")
    parser.add_argument("--response-length", type=int, default=SETTINGS["response_length"], help="most reply tokens")
    parser.add_argument("--work", default="/tmp/bench_grpo", help="scratch directory")
    parser.add_argument("--model", help="checkpoint to train instead of the demo init model")
    parser.add_argument("--prompts", help=".jsonl with a 'prompt' column instead of the demo prompts "
                        "(then both sides are rewarded by distinct_characters)")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    s = {**SETTINGS, "num_generations": args.num_generations, "batch": args.batch,
         "response_length": args.response_length, "model": args.model, "prompts": args.prompts}
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (the first is not timed)")
    if s["batch"] % s["num_generations"]:
        parser.error("--batch must be a multiple of --num-generations")
    work = Path(args.work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        worker = our_worker if args.worker == "ours" else trl_worker
        result = worker(work, args.iterations, s, work / args.worker)
        print(MARK + json.dumps(result))
        return
    work.mkdir(parents=True, exist_ok=True)
    build_inputs(work, s)

    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for rep in range(args.repeats):
        for side in ("ours", "trl"):
            done = subprocess.run(
                [sys.executable, __file__, "--worker", side, "--work", str(work), "--iterations", str(args.iterations),
                 "--num-generations", str(s["num_generations"]), "--batch", str(s["batch"]),
                 "--response-length", str(s["response_length"]),
                 *(["--model", args.model] if args.model else []), *(["--prompts", args.prompts] if args.prompts else [])],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
            if done.returncode or not lines:
                sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(lines[-1][len(MARK):]))
            r = runs[side][-1]
            print(f"  run {rep + 1} {side:>4}: {r['episodes_per_second']:.3g} episodes/s, "
                  f"{r['episodes_per_cpu_second']:.3g} per CPU s", file=sys.stderr)

    ours, trl = runs["ours"], runs["trl"]
    med = {side: {k: statistics.median([r[k] for r in rs]) for k in ("episodes_per_second", "episodes_per_cpu_second",
                                                                     "reply_length", "score")} for side, rs in runs.items()}
    best = {side: max(r["episodes_per_second"] for r in rs) for side, rs in runs.items()}
    # each run of ours is paired with the TRL run right after it (nearest in time, so under similar load)
    paired = {k: [o[k] / t[k] for o, t in zip(ours, trl)] for k in ("episodes_per_second", "episodes_per_cpu_second")}
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"GRPO, G {s['num_generations']}, batch {s['batch']} episodes ({s['batch'] // s['num_generations']} prompts), "
          f"replies of at most {s['response_length']} tokens, beta {s['beta']}, {args.iterations} iterations per run "
          f"(first untimed), {args.repeats} runs each, CPU ({len(os.sched_getaffinity(0))} usable cores, "
          f"OMP_NUM_THREADS={threads})")
    print(f"  {'':26} {'episodes/s':>10} {'best run':>9} {'per CPU s':>9} {'reply len':>9} {'mean score':>10}")
    for side, name in (("ours", "ours (alignment grpo)"), ("trl", f"TRL {trl[0]['version']} GRPOTrainer")):
        m = med[side]
        print(f"  {name:26} {m['episodes_per_second']:10.3g} {best[side]:9.3g} {m['episodes_per_cpu_second']:9.3g} "
              f"{m['reply_length']:9.1f} {m['score']:10.3f}")
    print(f"  {'ratio ours / TRL':26} {statistics.median(paired['episodes_per_second']):9.2f}x "
          f"{best['ours'] / best['trl']:8.2f}x {statistics.median(paired['episodes_per_cpu_second']):8.2f}x")
    print("  (episodes/s and per CPU s: medians over runs; ratios: median of the per-run ratios, each run of ours "
          "against the TRL run after it)")
    for key, what in (("episodes_per_second", "episodes/s"), ("episodes_per_cpu_second", "episodes per CPU s")):
        print(f"  per run, {what}: ours " + ", ".join(f"{r[key]:.3g}" for r in ours)
              + "; TRL " + ", ".join(f"{r[key]:.3g}" for r in trl))
    for side, rs, name in (("ours", ours, "our time split (metrics.jsonl time/*)"), ("trl", trl, "TRL's time split")):
        split = {k: sum(r["split"][k] for r in rs) for k in rs[0]["split"]}
        total = sum(split.values())
        per_it = total / (len(rs) * (args.iterations - 1))
        print(f"  {name}: " + ", ".join(f"{k} {v / total:.0%}" for k, v in split.items())
              + f" of {per_it:.2f} s per iteration")

if __name__ == "__main__":
    main()
