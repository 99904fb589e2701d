"""Realistic-size benchmark: our sft/reward/dpo/ppo stages against plain TRL at SmolLM2-135M's shape.

The model is built here with random weights, nothing is downloaded: a Llama with SmolLM2-135M's
shape (30 layers, hidden 576, MLP 1536, 9 heads, 3 KV heads, vocabulary 49,152, tied embeddings;
134.5M parameters). The tokenizer is the simplest honest one of that vocabulary size: a byte-level
BPE with no merges, whose vocabulary is the 256 byte symbols, our 6 special tokens and synthetic
`<unused_N>` tokens up to 49,152. Every character of the (ASCII) text is one token, so the
embedding matrix, the LM head and the logits have the real size and every sequence has exactly
the length asked for; what the text says does not matter to speed or memory. The data are random
lowercase words rendered with the toolkit's default chat template:

    sft          conversations of exactly --seq tokens
    sft_varied   conversations of --seq/8 to --seq tokens (uniform), padded per batch
    sft_packed   the same conversations packed into rows of --seq tokens, padding-free
                 (ours: sft.packing; TRL: packing=True, packing_strategy='bfd')
    reward       pairs whose prompt+chosen and prompt+rejected are --seq tokens each
    dpo          the same pairs, sigmoid DPO, beta 0.1, a frozen reference (copy; LoRA: the
                 policy with its adapters off, on both sides)
    ppo          prompts of --prompt-len tokens (after the chat template), replies of
                 --reply-len tokens, --ppo-epochs epochs, one minibatch, temperature 1, k1 KL
                 with a fixed beta 0.05; the critic and reward model are one-label classifiers
                 (full fine-tuning only: TRL 1.9's PPOTrainer is measured without LoRA here)

Each task runs in four variants, full fine-tuning or LoRA (r 16, alpha 32, all linear layers)
and gradient checkpointing off or on, through our stage (alignment's pipeline, in-process) and
through a plain TRL script at the same shapes and settings (SFTTrainer, RewardTrainer,
DPOTrainer; AdamW lr 1e-5, no warm-up, batch --batch, float32 on CPUs, bf16 with --bf16).
Each run is a fresh process; ours and TRL alternate. Measured the same way for both:

    tokens/s    non-pad tokens the trained model's embedding layer sees with gradients on
                (reference and no-grad passes not counted), from the end of the first optimizer
                step to the end of the last (with --steps 1: from the start of training, so
                the warm-up is in it); PPO: episodes/s from the first iteration's end to the
                last's, and tokens/s = episodes/s x (prompt + reply tokens)
    peak RSS    the process's maximum resident memory at the end of training (before saving),
                model loading and data preparation included; on a GPU also
                torch.cuda.max_memory_allocated
    MFU         (GPU only) model FLOPs per token (6 x parameters; LoRA 4x; DPO adds 2x for the
                reference; + attention) x tokens/s / the GPU's peak bf16 FLOPs (--peak-tflops)

PPO's peer is TRL 1.9's trl.experimental.ppo.PPOTrainer (later TRL releases have none). It runs in
its own virtual environment (--trl19-venv), installed if missing the way benchmarks/bench_ppo.py
does it: trl==1.9.0 with this environment's torch and transformers versions.

    python benchmarks/bench_scale.py                          # everything (hours on a CPU)
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_scale.py --steps 1 --seq 128 --only sft   # smoke run
    python benchmarks/bench_scale.py --only sft,dpo --variants full,lora_gc --steps 3 --seq 512
    python benchmarks/bench_scale.py --bf16 --batch 8 --steps 10  # on a GPU (benchmarks/gpu_check.sh)

--fsdp instead runs ppo and grpo (ours, full fine-tuning) on 2 processes, sharded with FSDP2 (the RL
loop's own, alignment/sharding.py) against DDP, --batch episodes per process: peak RSS per process (the
larger of the two), episodes/s, and the bytes of parameters and optimizer states each process held (the
run's summary). On GPUs the launches take recipes/accelerate/fsdp.yaml and multi_gpu.yaml with
--num_processes 2; on CPUs `--multi_gpu` over gloo, with ACCELERATE_USE_FSDP set for the FSDP2 runs and
glibc's mmap threshold fixed for both (MALLOC_MMAP_THRESHOLD_, docs/scaling.md says why).
--tiny shrinks the model to 2 layers of width 64 (same vocabulary) for a smoke run:

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --fsdp --tiny --steps 2 --batch 2 --seq 64 --prompt-len 32 --reply-len 16 --work /tmp/bench_fsdp
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --fsdp --steps 3 --batch 2 --prompt-len 128 --reply-len 64   # 135M, ~12 min on 2 cores

Figures: docs/benchmarks.md ("Realistic-size benchmark on CPUs").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MARK = "BENCH_SCALE_RESULT "
TASKS = ("sft", "sft_varied", "sft_packed", "reward", "dpo", "ppo")
VARIANTS = ("full", "full_gc", "lora", "lora_gc")
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3)
TINY = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
RL_TASKS = ("ppo", "grpo")  # --fsdp
LR = 1e-5
CHAT_OVERHEAD = 6  # <|user|> \n ... \n <|assistant|> \n ... </s>: tokens the template adds to a conversation


# ----------------------------------------------------------------------------------------------- inputs

def build_tokenizer():
    """Byte-level BPE without merges, vocabulary padded with synthetic tokens to 49,152."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alignment.models import DEFAULT_CHAT_TEMPLATE, PAD_TOKEN
    from alignment.stages.init import SPECIAL_TOKENS

    symbols = SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols += [f"<unused_{n}>" for n in range(SHAPE["vocab_size"] - len(symbols))]
    bpe = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD_TOKEN, bos_token="<s>", eos_token="</s>",
                                  clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    assert len(tok) == SHAPE["vocab_size"], len(tok)
    return tok


def words(rng: random.Random, n: int) -> str:
    """n characters (= n tokens) of random lowercase words."""
    out = []
    while sum(map(len, out)) + len(out) < n + 1:
        out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(out)[:n].strip().ljust(n, "x")


def build_inputs(work: Path, a) -> None:
    """Model, reward model and tokenizer of SmolLM2-135M's shape; the data files; in `work`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = build_tokenizer()
    longest = max(a.seq, a.prompt_len + a.reply_len) + 8
    shape = TINY if a.tiny else SHAPE
    saved = json.loads((work / "policy" / "config.json").read_text()) if (work / "policy" / "model.safetensors").exists() else {}
    if saved.get("max_position_embeddings", 0) < longest or saved.get("hidden_size") != shape["hidden_size"]:
        config = LlamaConfig(**shape, max_position_embeddings=max(2048, longest), tie_word_embeddings=True,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        model.save_pretrained(work / "policy")
        tok.save_pretrained(work / "policy")
        torch.manual_seed(1)
        config.num_labels = 1
        reward = LlamaForSequenceClassification(config)
        reward.save_pretrained(work / "reward")
        tok.save_pretrained(work / "reward")

    rng = random.Random(0)
    rows = a.steps * a.batch * 2 + 16
    half = (a.seq - CHAT_OVERHEAD) // 4  # prompt a quarter, reply the rest
    sft = [conversation(rng, half, a.seq - CHAT_OVERHEAD - half) for _ in range(rows)]
    varied = []
    for _ in range(rows * 4):
        n = rng.randint(max(a.seq // 8, 16), a.seq) - CHAT_OVERHEAD
        varied.append(conversation(rng, n // 4, n - n // 4))
    pairs = [{"prompt": words(rng, half), "chosen": words(rng, a.seq - CHAT_OVERHEAD - half),
              "rejected": words(rng, a.seq - CHAT_OVERHEAD - half)} for _ in range(rows)]
    prompts = [{"prompt": words(rng, a.prompt_len - 5)} for _ in range(rows * 4)]  # + <|user|>\n \n<|assistant|>\n
    for name, data in (("sft", sft), ("sft_varied", varied), ("pairs", pairs), ("prompts", prompts)):
        with open(work / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    # the lengths are what the template gives
    render = lambda msgs, **kw: len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"])
    assert render(sft[0]["messages"]) == a.seq, (render(sft[0]["messages"]), a.seq)
    assert render([{"role": "user", "content": prompts[0]["prompt"]}], add_generation_prompt=True) == a.prompt_len


def conversation(rng, prompt: int, reply: int) -> dict:
    return {"messages": [{"role": "user", "content": words(rng, prompt)},
                         {"role": "assistant", "content": words(rng, reply)}]}


# ----------------------------------------------------------------------------------------------- measuring

class Meter:
    """Counts the tokens the trained model's embedding sees with gradients on, and stamps steps."""

    def __init__(self, pad_id: int):
        import torch

        self.pad_id, self.tokens, self.stamps, self.peak = pad_id, 0, [], {}
        self.start = None

        def hook(module, args):
            if (isinstance(module, torch.nn.Embedding) and module.num_embeddings == SHAPE["vocab_size"]
                    and torch.is_grad_enabled() and args):
                self.tokens += int((args[0] != self.pad_id).sum())

        torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def begin(self):
        self.start = (time.perf_counter(), self.tokens)

    def step(self):
        self.stamps.append((time.perf_counter(), self.tokens))

    def end(self):
        import torch

        self.peak["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            self.peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20

    def result(self) -> dict:
        first = self.stamps[0] if len(self.stamps) > 1 else self.start
        (t0, n0), (t1, n1) = first, self.stamps[-1]
        return {"tokens_per_second": (n1 - n0) / (t1 - t0), "timed_steps": len(self.stamps) - (len(self.stamps) > 1),
                "warmup_in_timing": len(self.stamps) == 1, **self.peak}


def patch_trainer_callbacks(meter: Meter) -> None:
    """Stamp every transformers Trainer (ours and TRL's alike) at train begin, step end and train end."""
    from transformers.trainer_callback import CallbackHandler

    for name, fn in (("on_train_begin", meter.begin), ("on_step_end", meter.step), ("on_train_end", meter.end)):
        original = getattr(CallbackHandler, name)

        def wrapped(self, *args, _original=original, _fn=fn, **kwargs):
            _fn()
            return _original(self, *args, **kwargs)

        setattr(CallbackHandler, name, wrapped)


# ----------------------------------------------------------------------------------------------- workers

def our_worker(work: Path, task: str, variant: str, a, out: Path, meter: Meter) -> dict:
    from alignment.pipeline import run

    lora, gc = variant.startswith("lora"), variant.endswith("_gc")
    common = [f"model={work / 'policy'}", f"output_dir={out}", "report.models={}", f"seed=0",
              f"training.learning_rate={LR}", "training.warmup_steps=0", "training.lr_scheduler_type=constant",
              "training.logging_steps=1000", "training.save_steps=0",
              f"training.mixed_precision={'bf16' if a.bf16 else 'no'}",
              f"model_options.gradient_checkpointing={'true' if gc else 'false'}"]
    common += ["lora={}"] if lora else []
    trainer_common = [f"training.max_steps={a.steps}", f"training.per_device_train_batch_size={a.batch}",
                      f"training.max_length={a.seq}"]
    if task.startswith("sft"):
        data = work / ("sft.jsonl" if task == "sft" else "sft_varied.jsonl")
        run(REPO / "recipes" / "sft.yaml", common + trainer_common + [
            f"data.source={data}", "data.num_examples=null",
            f"sft.packing={'true' if task == 'sft_packed' else 'false'}"])
    elif task == "reward":
        run(REPO / "recipes" / "reward.yaml", common + trainer_common + [
            f"data.source={work / 'pairs.jsonl'}", "data.num_examples=null", "data.eval_examples=0",
            "reward.center_coef=0.0"])
    elif task == "dpo":
        run(REPO / "recipes" / "dpo.yaml", common + trainer_common + [
            f"data.source={work / 'pairs.jsonl'}", "data.num_examples=null", "data.eval_examples=0",
            "dpo.loss_type=sigmoid", "dpo.beta=0.1", "dpo.reference=copy"])
    else:
        return our_ppo(work, a, out, common, task)
    return meter.result()


def our_ppo(work: Path, a, out: Path, common: list[str], task: str = "ppo") -> dict:
    import torch

    import alignment.stages.rl as loop
    from alignment.pipeline import run

    stamps, write = [], loop.append_metrics

    def append_metrics(path, record):  # once per iteration, after its optimizer steps
        stamps.append(time.perf_counter())
        write(path, record)

    loop.append_metrics = append_metrics
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # --fsdp: --batch episodes per process
    batch = a.batch * processes
    own = ([f"ppo.ppo_epochs={a.ppo_epochs}", "ppo.kl_estimator=k1", "ppo.kl_coef=0.05"] if task == "ppo"
           else ["grpo.num_generations=2", "grpo.beta=0.05", "reward_fn=[]"])
    run(REPO / "recipes" / f"{task}.yaml", common + own + [
        f"reward_model={work / 'reward'}", f"data.source={work / 'prompts.jsonl'}", "data.num_examples=null",
        f"data.max_prompt_length={a.prompt_len}", f"{task}.batch_size={batch}",
        f"{task}.total_episodes={batch * a.steps}", f"{task}.response_length={a.reply_len}",
        f"{task}.num_minibatches=1", f"{task}.temperature=1.0", f"{task}.kl_control=fixed",
        f"{task}.missing_eos_penalty=null", "training.logging_steps=1"])
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "process": int(os.environ.get("RANK", "0"))}
    if torch.cuda.is_available():
        peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if peak["process"] != 0:  # the main process reads the run's files
        return peak
    summary = json.loads((out / "run_info.json").read_text())["summary"]
    peak.update({k: summary[k] for k in ("distributed", "trained_parameter_bytes_per_process",
                                         "optimizer_state_bytes_per_process", "frozen_parameter_bytes_per_process")
                 if k in summary})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "objective/kl" in r]
    if len(stamps) > 1:
        eps = (len(stamps) - 1) * batch / (stamps[-1] - stamps[0])
    else:  # one iteration: its own time, warm-up included
        eps = batch / sum(steps[0][f"time/{k}"] for k in ("generation", "scoring", "optimisation"))
    reply = statistics.mean(r["response_length"] for r in steps)
    timed = steps[1:] or steps
    split = {k: statistics.mean(r[f"time/{k}"] for r in timed) for k in ("generation", "scoring", "optimisation")}
    return {"episodes_per_second": eps, "tokens_per_second": eps * (a.prompt_len + reply), "reply_length": reply,
            "seconds_per_iteration": split,
            "timed_steps": max(len(stamps) - 1, 1), "warmup_in_timing": len(stamps) < 2, **peak}


def trl_worker(work: Path, task: str, variant: str, a, out: Path, meter: Meter) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignment.stages.common import _checkpointing_flag

    if task == "ppo":
        return trl19_ppo(work, variant, a, out, Path(a.trl19_venv))
    lora, gc = variant.startswith("lora"), variant.endswith("_gc")
    tok = AutoTokenizer.from_pretrained(work / "policy")
    cpu = not torch.cuda.is_available()
    common = dict(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, max_length=a.seq, use_cpu=cpu, bf16=a.bf16,
                  report_to="none", save_strategy="no", logging_steps=1000, seed=0, dataloader_num_workers=0,
                  disable_tqdm=True)
    kind = TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                             task_type=kind) if lora else None
    if task.startswith("sft"):
        from trl import SFTConfig, SFTTrainer

        data = load_dataset("json", data_files=str(work / ("sft.jsonl" if task == "sft" else "sft_varied.jsonl")),
                            split="train")
        packing = {"packing": True, "packing_strategy": "bfd"} if task == "sft_packed" else {}
        args = SFTConfig(**common, assistant_only_loss=True, **packing, **_checkpointing_flag(SFTConfig, gc))
        model = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    else:
        data = load_dataset("json", data_files=str(work / "pairs.jsonl"), split="train").map(lambda r: {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}]})
        if task == "reward":
            from trl import RewardConfig, RewardTrainer

            args = RewardConfig(**common, center_rewards_coefficient=None, **_checkpointing_flag(RewardConfig, gc))
            model = AutoModelForSequenceClassification.from_pretrained(work / "policy", num_labels=1,
                                                                       dtype=torch.float32)
            model.config.pad_token_id = tok.pad_token_id
            trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                    peft_config=peft_config)
        else:
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], **_checkpointing_flag(DPOConfig, gc))
            model = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
            ref = None if lora else AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
            trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                                 peft_config=peft_config)
    trainer.train()
    return meter.result()


TRL19_PPO = r"""
import json, resource, sys, time
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer

work, out, a = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(f"{work}/policy", padding_side="left")
rows = [json.loads(line) for line in open(f"{work}/prompts.jsonl")]
ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True,
                               return_dict=True)["input_ids"] for r in rows]
assert {len(i) for i in ids} == {a["prompt_len"]}, {len(i) for i in ids}
stamps = []

class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        stamps.append(time.perf_counter())

args = PPOConfig(
    output_dir=out, per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1, num_mini_batches=1,
    num_ppo_epochs=a["ppo_epochs"], response_length=a["reply_len"], temperature=1.0, kl_coef=0.05, kl_estimator="k1",
    learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0, stop_token="eos",
    total_episodes=a["batch"] * a["steps"], num_sample_generations=0, use_cpu=not a["gpu"], bf16=a["bf16"],
    gradient_checkpointing=a["gc"], report_to="none", save_strategy="no", logging_steps=1, seed=0,
    dataloader_num_workers=0, disable_tqdm=True,
)
load = lambda cls, path, **kw: cls.from_pretrained(f"{work}/{path}", **kw)
trainer = PPOTrainer(args=args, processing_class=tok, model=load(AutoModelForCausalLM, "policy"),
                     ref_model=load(AutoModelForCausalLM, "policy"),
                     reward_model=load(AutoModelForSequenceClassification, "reward", num_labels=1),
                     value_model=load(AutoModelForSequenceClassification, "reward", num_labels=1),
                     train_dataset=Dataset.from_dict({"input_ids": ids}), callbacks=[Clock()])
trainer.train()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
eps = (len(stamps) - 1) * a["batch"] / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
print("MARK" + json.dumps({"episodes_per_second": eps, "timed_steps": len(stamps) - 1, "rss_mib": rss}))
"""


def trl19_ppo(work: Path, variant: str, a, out: Path, venv: Path) -> dict:
    """TRL 1.9's PPOTrainer at the same shapes, in its own environment (full fine-tuning only)."""
    if variant.startswith("lora"):
        raise SystemExit("TRL 1.9's PPO side is measured with full fine-tuning only")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_ppo import ensure_venv

    import torch

    settings = dict(batch=a.batch, steps=a.steps, ppo_epochs=a.ppo_epochs, reply_len=a.reply_len,
                    prompt_len=a.prompt_len, lr=LR, bf16=a.bf16, gpu=torch.cuda.is_available(),
                    gc=variant.endswith("_gc"))
    done = subprocess.run([ensure_venv(venv), "-c", TRL19_PPO.replace("MARK", MARK), str(work), str(out),
                           json.dumps(settings)], capture_output=True, text=True,
                          env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise SystemExit(f"TRL 1.9 PPO run failed:\n{done.stderr[-3000:]}")
    r = json.loads(lines[-1][len(MARK):])
    if r["episodes_per_second"] is None:
        raise SystemExit("TRL 1.9 PPO: one iteration is not timed; use --steps 2 or more")
    # TRL's replies run to --reply-len (random weights rarely sample EOS); tokens as for ours
    return {**r, "tokens_per_second": r["episodes_per_second"] * (a.prompt_len + a.reply_len),
            "reply_length": a.reply_len, "warmup_in_timing": False}


# ----------------------------------------------------------------------------------------------- report

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def flops_per_token(task: str, variant: str, a) -> float:
    """Model FLOPs per trained token: 6 x parameters (LoRA: 4x, no weight gradients of the base), +2x for
    DPO's reference forward, + attention (causal: 6 x layers x seq x hidden)."""
    params = 134_515_008
    f = (4 if variant.startswith("lora") else 6) * params + 6 * SHAPE["num_hidden_layers"] * a.seq * SHAPE["hidden_size"]
    return f + 2 * params if task == "dpo" else f


def peak_flops(a) -> float | None:
    if a.peak_tflops:
        return a.peak_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (ppo: iterations) per run; the first "
                        "is not timed unless it is the only one")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length of sft, reward and dpo")
    parser.add_argument("--batch", type=int, default=2, help="sequences (pairs, episodes) per optimizer step")
    parser.add_argument("--prompt-len", type=int, default=256, help="ppo prompt tokens (chat template included)")
    parser.add_argument("--reply-len", type=int, default=256, help="ppo reply tokens")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--only", default=",".join(TASKS), help="comma-separated tasks: " + ",".join(TASKS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ",".join(VARIANTS))
    parser.add_argument("--sides", default="ours,trl", help="ours, trl or both")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak bf16 TFLOPs for MFU (default: by its name)")
    parser.add_argument("--work", default="/tmp/bench_scale", help="scratch directory")
    parser.add_argument("--trl19-venv", default="/tmp/trl19-venv",
                        help="virtual environment with trl==1.9.0 for PPO's peer (installed if missing)")
    parser.add_argument("--fsdp", action="store_true", help="instead: ppo and grpo on 2 processes, FSDP2 against DDP")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (smoke runs only)")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "TASK", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--launched", choices=("ddp", "fsdp2"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    tasks, variants, sides = a.only.split(","), a.variants.split(","), a.sides.split(",")
    for given, allowed, what in ((tasks, TASKS, "--only"), (variants, VARIANTS, "--variants"),
                                 (sides, ("ours", "trl"), "--sides")):
        if bad := [x for x in given if x not in allowed]:
            parser.error(f"{what}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if a.steps < 1 or a.seq < 64:
        parser.error("--steps must be at least 1 and --seq at least 64")
    work = Path(a.work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if a.worker:
        side, task, variant = a.worker
        from transformers import AutoTokenizer

        meter = Meter(AutoTokenizer.from_pretrained(work / "policy").pad_token_id)
        patch_trainer_callbacks(meter)
        out = work / (f"{side}-{task}-{variant}" + (f"-{a.launched}" if a.launched else ""))
        main_process = os.environ.get("RANK", "0") == "0"
        if main_process:
            shutil.rmtree(out, ignore_errors=True)
        result = (our_worker if side == "ours" else trl_worker)(work, task, variant, a, out, meter)
        if main_process:
            shutil.rmtree(out, ignore_errors=True)
        print(MARK + json.dumps(result), flush=True)
        return

    work.mkdir(parents=True, exist_ok=True)
    build_inputs(work, a)
    flops = peak_flops(a)
    results = {}
    passthrough = ["--work", str(work), "--steps", str(a.steps), "--seq", str(a.seq), "--batch", str(a.batch),
                   "--prompt-len", str(a.prompt_len), "--reply-len", str(a.reply_len),
                   "--ppo-epochs", str(a.ppo_epochs), "--trl19-venv", a.trl19_venv] + (["--bf16"] if a.bf16 else [])
    passthrough += ["--tiny"] if a.tiny else []
    if a.fsdp:
        return compare_sharding(a, passthrough)
    for task in tasks:
        for variant in variants:
            for side in sides:
                if side == "trl" and task == "ppo" and variant.startswith("lora"):
                    continue  # TRL 1.9's side: full fine-tuning only
                started = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--worker", side, task, variant, *passthrough],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
                if done.returncode or not lines:
                    print(f"  {side} {task} {variant}: FAILED\n{done.stderr[-3000:]}", file=sys.stderr)
                    continue
                r = results[side, task, variant] = json.loads(lines[-1][len(MARK):])
                print(f"  {side:>4} {task:<10} {variant:<8} {r['tokens_per_second']:9.1f} tokens/s  "
                      f"peak RSS {r['rss_mib']:7.0f} MiB  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    where = "GPU" if flops or "cuda_mib" in next(iter(results.values()), {}) else "CPU"
    print(f"\nSmolLM2-135M shape (134.5M parameters, vocabulary 49,152), random weights; seq {a.seq}, batch {a.batch}, "
          f"{a.steps} steps per run; ppo: prompts {a.prompt_len} + replies {a.reply_len}, {a.ppo_epochs} epochs; "
          f"{'bf16' if a.bf16 else 'float32'}, {where} ({len(os.sched_getaffinity(0))} usable cores, "
          f"OMP_NUM_THREADS={threads})")
    head = f"  {'task':<10} {'variant':<8} {'ours tok/s':>10} {'TRL tok/s':>10} {'ratio':>6}   {'ours RSS':>8} {'TRL RSS':>8} {'ratio':>6}"
    gpu = any("cuda_mib" in r for r in results.values())
    print(head + (f"   {'ours GPU':>8} {'TRL GPU':>8} {'MFU ours':>8} {'MFU TRL':>8}" if gpu else ""))
    for task in tasks:
        for variant in variants:
            o, t = results.get(("ours", task, variant)), results.get(("trl", task, variant))
            if not o and not t:
                continue
            cell = lambda r, k, f: format(r[k], f) if r and k in r else "-"
            ratio = lambda k: f"{o[k] / t[k]:5.2f}x" if o and t else "     -"
            line = (f"  {task:<10} {variant:<8} {cell(o, 'tokens_per_second', '10.1f'):>10} "
                    f"{cell(t, 'tokens_per_second', '10.1f'):>10} {ratio('tokens_per_second'):>6}   "
                    f"{cell(o, 'rss_mib', '8.0f'):>8} {cell(t, 'rss_mib', '8.0f'):>8} {ratio('rss_mib'):>6}")
            if gpu:
                mfu = lambda r: (f"{r['tokens_per_second'] * flops_per_token(task, variant, a) / flops:8.1%}"
                                 if r and flops and task != "ppo" else "-")
                line += (f"   {cell(o, 'cuda_mib', '8.0f'):>8} {cell(t, 'cuda_mib', '8.0f'):>8} {mfu(o):>8} {mfu(t):>8}")
            if task == "ppo" and o:
                line += f"   ({o['episodes_per_second']:.3f} episodes/s, mean reply {o['reply_length']:.0f} tokens)"
                line += "; ours per iteration: " + ", ".join(f"{k} {v:.1f} s" for k, v in o["seconds_per_iteration"].items())
            if (o or t)["warmup_in_timing"]:
                line += "   (1 step: warm-up included)"
            print(line)
    print("  tokens/s: non-pad tokens through the trained model per second; RSS in MiB (peak, end of training); "
          "ratios ours / TRL (targets: tokens/s >= 0.95x, RSS <= 1.05x)")


def compare_sharding(a, passthrough: list[str]) -> None:
    """--fsdp: ppo and grpo on 2 processes, DDP then FSDP2, each a fresh `accelerate launch`."""
    import torch

    gpu = torch.cuda.is_available()
    accelerate = str(Path(sys.executable).parent / "accelerate")
    results = {}
    for task in RL_TASKS:
        for mode in ("ddp", "fsdp2"):
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if not gpu:  # glibc keeps freed buffers of over 128 KiB in its heap once one was freed (its mmap threshold
                # rises to the freed size), so FSDP2's gathered layers, allocated and freed at every pass, stay in the
                # RSS: 8.3 GB instead of 5.1 for ppo here. A fixed threshold returns them; both sides get it.
                env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
            launch = [accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no",
                      "--mixed_precision", "bf16" if a.bf16 else "no"]
            if gpu:
                launch += ["--config_file", str(REPO / "recipes" / "accelerate" / ("fsdp.yaml" if mode == "fsdp2" else "multi_gpu.yaml"))]
            else:
                launch += ["--multi_gpu"]
                if mode == "fsdp2":
                    env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
            started = time.perf_counter()
            done = subprocess.run([*launch, __file__, "--worker", "ours", task, "full", "--launched", mode, *passthrough],
                                  capture_output=True, text=True, env=env)
            # the two processes' result lines may interleave in the launcher's stdout: decode each object after MARK
            decoder, text = json.JSONDecoder(), done.stdout
            lines = [decoder.raw_decode(text, i + len(MARK))[0] for i in range(len(text)) if text.startswith(MARK, i)]
            if done.returncode or len(lines) != 2:
                print(f"  {task} {mode}: FAILED\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            main_row = next(r for r in lines if r["process"] == 0)
            r = results[task, mode] = {**main_row, "rss_mib": max(r["rss_mib"] for r in lines),
                                       "cuda_mib": max((r.get("cuda_mib", 0) for r in lines), default=0)}
            print(f"  {task} {mode}: {r['episodes_per_second']:.3f} episodes/s, peak RSS {r['rss_mib']:.0f} MiB per process "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    shape = TINY if a.tiny else SHAPE
    print(f"\n2 processes, {'GPU' if gpu else 'CPU'}; Llama of {shape['num_hidden_layers']} layers x {shape['hidden_size']} "
          f"(vocabulary {shape['vocab_size']}), random weights; {a.batch} episodes per process, prompts {a.prompt_len} + "
          f"replies {a.reply_len}, {a.steps} iterations, ppo {a.ppo_epochs} epochs, grpo groups of 2; "
          f"{'bf16' if a.bf16 else 'float32'}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}")
    mib = lambda r, k: f"{r[k] / 2**20:8.1f}" if k in r else "       -"  # noqa: E731
    print(f"  {'task':<5} {'launch':<6} {'episodes/s':>10} {'peak RSS':>9} {'GPU peak':>9}   MiB held per process: "
          f"{'trained':>8} {'optim':>8} {'frozen':>8}")
    for (task, mode), r in results.items():
        print(f"  {task:<5} {mode:<6} {r['episodes_per_second']:10.3f} {r['rss_mib']:9.0f} "
              f"{r['cuda_mib'] or float('nan'):9.0f}   {'':>21}{mib(r, 'trained_parameter_bytes_per_process')} "
              f"{mib(r, 'optimizer_state_bytes_per_process')} {mib(r, 'frozen_parameter_bytes_per_process')}")


if __name__ == "__main__":
    main()
