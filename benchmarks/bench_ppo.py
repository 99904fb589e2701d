"""PPO speed: our `ppo` stage against TRL 1.9.0's trl.experimental.ppo.PPOTrainer, in one go.

Both train the same tiny model (the demo world's init checkpoint, recipes/init.yaml: a 2-layer,
256-wide Llama with its BPE tokenizer; the reward model and critic are a one-label classifier
on it) on the same rendered demo prompts with the same settings: batch 16, replies of 16
tokens, 4 PPO epochs, 1 minibatch, temperature 0.7, k1 KL with beta 0.05, CPU. Episodes per
second are measured the same way for both: from the first to the last iteration's end (so
start-up and model loading are left out). Our run starts from scratch every time: its output
directory (and any `.partial` one an interrupted run left) is removed first, else the pipeline
would find the stage up to date (or resume it) and read the old metrics again.

TRL 1.9 is installed, if missing, into its own virtual environment (--venv) with the torch
and transformers versions of this environment. Run it on an otherwise idle machine, with all
its cores:

    python benchmarks/bench_ppo.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = dict(batch=16, response_length=16, ppo_epochs=4, num_minibatches=1, temperature=0.7,
                kl_coef=0.05, learning_rate=1e-5, seed=0)

TRL_SCRIPT = r'''
import json, sys, time
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer

work, iterations, s = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(f"{work}/policy", padding_side="left")
prompts = json.load(open(f"{work}/prompts.json"))
data = Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]})
stamps = []

class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        stamps.append(time.perf_counter())

args = PPOConfig(
    output_dir=f"{work}/trl-out", per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
    num_mini_batches=s["num_minibatches"], num_ppo_epochs=s["ppo_epochs"], response_length=s["response_length"],
    temperature=s["temperature"], kl_coef=s["kl_coef"], learning_rate=s["learning_rate"], stop_token="eos",
    total_episodes=s["batch"] * iterations, num_sample_generations=0, use_cpu=True, report_to="none",
    save_strategy="no", logging_steps=1000, seed=s["seed"], dataloader_num_workers=0, disable_tqdm=True,
)
policy = AutoModelForCausalLM.from_pretrained(f"{work}/policy")
ref = AutoModelForCausalLM.from_pretrained(f"{work}/policy")
reward = AutoModelForSequenceClassification.from_pretrained(f"{work}/reward", num_labels=1)
value = AutoModelForSequenceClassification.from_pretrained(f"{work}/reward", num_labels=1)
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                     value_model=value, train_dataset=data, callbacks=[Clock()])
trainer.train()
print(json.dumps({"episodes_per_second": (len(stamps) - 1) * s["batch"] / (stamps[-1] - stamps[0])}))
'''


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl.experimental.ppo"], capture_output=True).returncode == 0:
        return python
    import torch
    import transformers

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", "trl==1.9.0",
                    f"transformers=={transformers.__version__}"], check=True)
    return python


def build_models(work: Path) -> None:
    """The demo init checkpoint as policy; a one-label classifier on it as reward model."""
    import torch

    from alignment.templates import render_prompt
    from alignment.demo import world
    from alignment.models import load_classifier, load_tokenizer
    from alignment.pipeline import run

    if not (work / "policy" / "model.safetensors").exists():
        run(REPO / "recipes" / "init.yaml", [f"output_dir={work / 'policy'}"])
    tok = load_tokenizer(str(work / "policy"))
    torch.manual_seed(0)
    reward = load_classifier(str(work / "policy"), tok)
    reward.save_pretrained(work / "reward")
    tok.save_pretrained(work / "reward")
    prompts = [render_prompt(tok, row["prompt"]) for row in world.train_prompts(512, 0)]
    (work / "prompts.json").write_text(json.dumps(prompts))


def run_ours(work: Path, iterations: int) -> dict:
    s = SETTINGS
    out = work / "ours"
    for stale in (out, out.with_name(out.name + ".partial")):  # else the stage is up to date (or resumes)
        shutil.rmtree(stale, ignore_errors=True)
    args = [
        sys.executable, "-m", "alignment", "run", str(REPO / "recipes" / "ppo.yaml"),
        f"model={work / 'policy'}", f"reward_model={work / 'reward'}", f"output_dir={out}", "report.models={}",
        f"data.num_examples=512", f"ppo.batch_size={s['batch']}", f"ppo.total_episodes={s['batch'] * iterations}",
        f"ppo.response_length={s['response_length']}", f"ppo.ppo_epochs={s['ppo_epochs']}",
        f"ppo.num_minibatches={s['num_minibatches']}", f"ppo.temperature={s['temperature']}",
        f"ppo.kl_coef={s['kl_coef']}", "ppo.missing_eos_penalty=null", f"training.learning_rate={s['learning_rate']}",
        f"seed={s['seed']}",
    ]
    subprocess.run(args, check=True, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "objective/kl" in r]
    split = {k: sum(r[f"time/{k}"] for r in steps[1:]) for k in ("generation", "scoring", "optimisation")}
    eps = (len(steps) - 1) * s["batch"] / (steps[-1]["time"] - steps[0]["time"])
    return {"episodes_per_second": eps, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30, help="PPO iterations of 16 episodes, each side")
    parser.add_argument("--work", default="/tmp/bench_ppo", help="scratch directory")
    parser.add_argument("--venv", default="/tmp/trl19-venv", help="virtual environment with trl==1.9.0")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    python = ensure_venv(Path(args.venv))
    build_models(work)

    ours = run_ours(work, args.iterations)
    done = subprocess.run([python, "-c", TRL_SCRIPT, str(work), str(args.iterations), json.dumps(SETTINGS)],
                          capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    if done.returncode:
        sys.exit(f"TRL run failed:\n{done.stderr[-3000:]}")
    trl = json.loads(done.stdout.strip().splitlines()[-1])

    total = sum(ours["split"].values())
    print(f"PPO, batch {SETTINGS['batch']}, replies of {SETTINGS['response_length']} tokens, {SETTINGS['ppo_epochs']} epochs, "
          f"{SETTINGS['num_minibatches']} minibatch, {args.iterations} iterations, CPU ({os.cpu_count()} cores)")
    print(f"  ours (alignment ppo):   {ours['episodes_per_second']:7.1f} episodes/s")
    print(f"  TRL 1.9.0 PPOTrainer:   {trl['episodes_per_second']:7.1f} episodes/s")
    print(f"  ratio ours / TRL:       {ours['episodes_per_second'] / trl['episodes_per_second']:7.2f}x")
    print("  our time split: " + ", ".join(f"{k} {v / total:.0%}" for k, v in ours["split"].items()))


if __name__ == "__main__":
    main()
