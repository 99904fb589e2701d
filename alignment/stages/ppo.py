"""Stage `ppo`: PPO with a KL penalty, our own loop on accelerate + transformers.

Models: the policy and the frozen reference both start from `model` (the SFT output; with
LoRA the reference is the policy with its adapters disabled); the reward model
(`reward_model`, a one-label classifier) is frozen; the critic starts from the reward model
and gives a value at every position. Dropout is off in all of them.

One iteration, as the loop below reads:
1. rollout: sample a reply to `ppo.batch_size` prompts (temperature T, KV cache);
2. score: log-probs of the reply tokens under the policy (the "old" log-probs) and the
   reference, at the same T; the critic's values; the reward model's score at the last real
   token (minus `missing_eos_penalty` for replies without EOS);
3. KL-shaped rewards: r_t = -beta kl_t on every reply token, plus the score on the last;
4. advantages: GAE, returns = A + V, advantages whitened over all real tokens;
5. PPO epochs: `ppo_epochs` passes over `num_minibatches` minibatches, one optimizer step
   each, clipped policy and value losses, token means over the whole minibatch (all
   micro-batches, all processes);
6. log every metric, adapt beta (adaptive control), checkpoint every `training.save_steps`.

Everything after a reply's first EOS is masked: it adds no KL and trains nothing. All math
lives in `alignment/losses.py`, sampling and forward passes in `alignment/generation.py`,
model plumbing in `alignment/models.py`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import losses
from ..compare import render_exchange, render_prompt
from ..config import PPORecipe, RecipeError
from ..data import Rows, check_rows, load_rows
from ..demo import world
from ..generation import position_ids, response_logits, sample, token_logprobs
from ..models import (
    PerTokenScores,
    apply_lora,
    check_reward_model,
    frozen,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    no_dropout,
    same_tokenizer,
    save_model,
)
from .common import append_metrics, drop_metrics_after, last_checkpoint, precision_flags, use_cpu

DEFAULT_PROMPTS = 2000


# --------------------------------------------------------------------------- inputs


def load_prompts(recipe: PPORecipe, tok) -> tuple[list[str], list[str], dict]:
    """(user prompts, the same rendered with the chat template, counts): the rows of
    `data.source` with a usable prompt; too long ones are dropped and counted."""
    d = recipe.data

    def problem(row: dict) -> str | None:
        value = row.get(d.prompt_field)
        if value is None:
            return f"missing '{d.prompt_field}'"
        if not isinstance(value, str) or not value.strip():
            return f"'{d.prompt_field}' is not a non-empty string"
        return None

    found = check_rows(load_rows(d, world.train_prompts, DEFAULT_PROMPTS), problem, d.on_bad_row)
    kept = Rows([], [], found.dropped)
    rendered = []
    for row, origin in zip(found.rows, found.origins):
        text = render_prompt(tok, row[d.prompt_field])
        if len(tok(text, add_special_tokens=False)["input_ids"]) > d.max_prompt_length:
            kept.dropped[f"longer than data.max_prompt_length ({d.max_prompt_length} tokens)"] += 1
            continue
        kept.rows.append(row)
        kept.origins.append(origin)
        rendered.append(text)
    if not kept.rows:
        raise RecipeError(f"data.source '{d.source}': no usable prompts ({dict(kept.dropped)})")
    counts = {"prompts": len(kept), **{f"dropped/{k}": v for k, v in kept.dropped.items()}}
    return [r[d.prompt_field] for r in kept.rows], rendered, counts


def batch_indices(num_rows: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """Rows of iteration `iteration`'s global batch: consecutive slices of a fresh permutation
    per pass over the data (seeded by `seed` and the pass), so the position in the data is
    just the iteration number, and a resumed run picks up exactly where it stopped."""
    out = []
    for g in range(iteration * batch_size, (iteration + 1) * batch_size):
        data_pass, offset = divmod(g, num_rows)
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + data_pass))
        out.append(int(order[offset]))
    return out


@dataclass
class Models:
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None: the policy with adapters disabled (LoRA)
    critic: torch.nn.Module
    reward: torch.nn.Module
    tok: object
    reward_tok: object | None  # None: same tokenizer as the policy


def build_models(recipe: PPORecipe, inputs: dict, say) -> Models:
    check_reward_model(inputs["reward_model"])
    options = recipe.model_options
    tok = load_tokenizer(inputs["model"], options)
    reward_tok = load_tokenizer(inputs["reward_model"], options)
    shared = same_tokenizer(tok, reward_tok)
    if not shared:
        say("ppo: the reward model's tokenizer differs from the policy's: replies are decoded and re-tokenised "
            "with the reward tokenizer for scoring; the critic starts from the policy with a new value head")
    policy = no_dropout(load_causal_lm(inputs["model"], tok, options))
    reference = None
    if recipe.lora is not None:
        policy = no_dropout(apply_lora(policy, recipe.lora))
    else:
        reference = frozen(load_causal_lm(inputs["model"], tok, options))
    reward = PerTokenScores(frozen(load_classifier(inputs["reward_model"], reward_tok, options)))
    critic = load_classifier(inputs["reward_model"] if shared else inputs["model"], tok, options)
    if recipe.lora is not None:
        critic = apply_lora(critic, recipe.lora, task_type="SEQ_CLS")
    critic = PerTokenScores(no_dropout(critic))
    return Models(policy, reference, critic, reward, tok, None if shared else reward_tok)


def prepare_training(m: Models, accelerator, recipe: PPORecipe):
    """One AdamW over the policy's and the critic's trainable weights, the LR schedule over every
    optimizer step of the run; models placed (and wrapped for DDP) by accelerate."""
    o, t = recipe.ppo, recipe.training
    optimizer_steps = (o.total_episodes // o.batch_size) * o.ppo_epochs * o.num_minibatches
    params = [p for model in (m.policy, m.critic) for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = t.warmup_steps if t.warmup_steps >= 1 else math.ceil(t.warmup_steps * optimizer_steps)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup), num_training_steps=optimizer_steps)
    m.policy, m.critic, optimizer = accelerator.prepare(m.policy, m.critic, optimizer)
    for frozen_model in (m.reference, m.reward):
        if frozen_model is not None:
            frozen_model.to(accelerator.device)
    return optimizer, scheduler


# --------------------------------------------------------------------------- rollout and scoring


@dataclass
class Rollout:
    """One iteration's local batch; reply tensors are (B, R), everything after EOS masked."""

    input_ids: torch.Tensor  # (B, P + R) prompt and reply
    attention_mask: torch.Tensor
    context_length: int  # P
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor  # (B,) reply ended with EOS
    logp: torch.Tensor | None = None  # old log-probs, at the sampling temperature
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # (B, R) per-token entropy of the sampling distribution

    def rows(self, index) -> "Rollout":
        pick = lambda x: x[index] if isinstance(x, torch.Tensor) else x  # noqa: E731
        return Rollout(**{k: pick(v) for k, v in self.__dict__.items()})


def reply_logprobs(model, r: Rollout, temperature: float, with_entropy: bool = False):
    """Log-probs of the reply tokens (and the per-token entropy), at `temperature`; the LM head
    runs in chunks (`generation.token_logprobs`)."""
    return token_logprobs(
        model, r.input_ids, r.attention_mask, r.context_length, r.response_mask, temperature, with_entropy=with_entropy
    )


def reply_values(critic, r: Rollout) -> torch.Tensor:
    """The critic's value before each reply token: read where the logits predicting it are."""
    values = critic(r.input_ids, r.attention_mask, position_ids(r.attention_mask))
    return values[:, r.context_length - 1 : -1]


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def reward_scores(m: Models, r: Rollout, prompts: list[str]) -> torch.Tensor:
    """The reward model's score of each prompt + reply, read at the last real token. With a
    different reward tokenizer, the reply is decoded and the exchange re-rendered with it."""
    if m.reward_tok is None:
        ids, mask = r.input_ids, r.attention_mask
    else:
        tok, rt = m.tok, m.reward_tok
        lengths = r.response_mask.sum(-1) - r.finished.long()
        replies = [tok.decode(r.response_ids[i, : lengths[i]].tolist(), skip_special_tokens=True) for i in range(len(prompts))]
        texts = [render_exchange(rt, p, reply) for p, reply in zip(prompts, replies)]
        enc = rt(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(r.input_ids.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    scores = m.reward(ids, mask, position_ids(mask))
    return scores.gather(1, last_real_index(mask).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def rollout(m: Models, accelerator, rendered: list[str], prompts: list[str], recipe: PPORecipe, timer: dict) -> Rollout:
    o = recipe.ppo
    policy = accelerator.unwrap_model(m.policy)
    started = time.perf_counter()
    s = sample(policy, m.tok, rendered, max_new_tokens=o.response_length, temperature=o.temperature, top_p=o.top_p)
    r = Rollout(s.input_ids, s.attention_mask, s.prompt_ids.shape[1], s.response_ids, s.response_mask, s.finished)
    timer["generation"] += time.perf_counter() - started

    started = time.perf_counter()
    critic = accelerator.unwrap_model(m.critic)
    parts = {"logp": [], "entropy": [], "ref_logp": [], "values": [], "scores": []}
    step = o.forward_batch_size or len(prompts)
    for lo in range(0, len(prompts), step):
        chunk = r.rows(slice(lo, lo + step))
        logp, entropy = reply_logprobs(policy, chunk, o.temperature, with_entropy=True)
        if m.reference is None:
            with policy.disable_adapter():
                ref_logp = reply_logprobs(policy, chunk, o.temperature)
        else:
            ref_logp = reply_logprobs(m.reference, chunk, o.temperature)
        scores = reward_scores(m, chunk, prompts[lo : lo + step])
        if o.missing_eos_penalty is not None:
            scores = scores - o.missing_eos_penalty * (~chunk.finished).float()
        for name, value in zip(parts, (logp, entropy, ref_logp, reply_values(critic, chunk), scores)):
            parts[name].append(value)
    for name, value in parts.items():
        setattr(r, name, torch.cat(value))
    timer["scoring"] += time.perf_counter() - started
    return r


def global_whiten(accelerator, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`losses.masked_whiten` with statistics over every process's batch."""
    if accelerator.num_processes == 1:
        return losses.masked_whiten(x, mask, shift_mean)
    everything = losses.masked_whiten(accelerator.gather(x), accelerator.gather(mask), shift_mean)
    n = x.shape[0]
    return everything[accelerator.process_index * n : (accelerator.process_index + 1) * n]


# --------------------------------------------------------------------------- optimisation


def ppo_update(
    m: Models, accelerator, optimizer, scheduler, r: Rollout, advantages, returns, recipe: PPORecipe, iteration: int
) -> dict:
    """`ppo_epochs` passes of `num_minibatches` optimizer steps over the rollouts. Each loss is a
    token mean over the whole minibatch: every micro-batch's masked sum is divided by the
    minibatch's token count summed over micro-batches and processes (DDP then averages the
    gradients over processes, hence the factor num_processes)."""
    o, t = recipe.ppo, recipe.training
    n = r.input_ids.shape[0]
    params = [p for model in (m.policy, m.critic) for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    first: dict[str, float] = {}
    steps = 0
    for epoch in range(o.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed * 7919 + iteration * 131 + epoch))
        for mb_index, minibatch in enumerate(order.chunk(o.num_minibatches)):
            tokens = accelerator.reduce(r.response_mask[minibatch].sum().float(), "sum")
            stats = dict.fromkeys(("loss/policy", "loss/value", "policy/clipfrac", "value/clipfrac", "policy/approxkl", "val/ratio", "val/ratio_sq"), 0.0)
            micros = minibatch.chunk(t.gradient_accumulation_steps)
            for k, micro in enumerate(micros):
                b = r.rows(micro)
                mask = b.response_mask
                sync = contextlib.ExitStack()
                if k < len(micros) - 1:
                    for model in (m.policy, m.critic):
                        sync.enter_context(accelerator.no_sync(model))
                with sync:
                    logp = reply_logprobs(m.policy, b, o.temperature)
                    values = reply_values(m.critic, b)
                    pg_loss, pg_clip, approxkl = losses.ppo_policy_loss(logp, b.logp, advantages[micro], mask, o.clip_range)
                    vf_loss, vf_clip = losses.ppo_value_loss(values, b.values, returns[micro], mask, o.value_clip_range)
                    weight = mask.sum() / tokens  # this micro-batch's share of the minibatch's tokens
                    loss = (pg_loss + o.vf_coef * vf_loss) * weight * accelerator.num_processes
                    accelerator.backward(loss)
                with torch.no_grad():
                    ratio = torch.exp(logp - b.logp)
                    micro_stats = {
                        "loss/policy": pg_loss, "loss/value": vf_loss, "policy/clipfrac": pg_clip,
                        "value/clipfrac": vf_clip, "policy/approxkl": approxkl,
                        "val/ratio": losses.masked_mean(ratio, mask), "val/ratio_sq": losses.masked_mean(ratio**2, mask),
                    }
                    for name, value in micro_stats.items():
                        stats[name] += float(value * weight)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            reduced = accelerator.reduce(torch.tensor(list(stats.values()), device=accelerator.device), "sum")
            for name, value in zip(stats, reduced.tolist()):
                sums[name] = sums.get(name, 0.0) + value
                if epoch == 0 and mb_index == 0:
                    first[name] = value
    out = {name: value / steps for name, value in sums.items()}
    out["val/ratio_var"] = out.pop("val/ratio_sq") - out["val/ratio"] ** 2
    out["policy/ratio_first_minibatch"] = first["val/ratio"]
    out["policy/clipfrac_first_minibatch"] = first["policy/clipfrac"]
    return out


def learn(m: Models, accelerator, optimizer, scheduler, r: Rollout, beta: float, recipe: PPORecipe, iteration: int):
    """Steps 3-5 of an iteration on scored rollouts: KL-shaped rewards, GAE and whitened
    advantages (statistics over all processes), PPO epochs. Returns (stats, kl, returns)."""
    o = recipe.ppo
    mask = r.response_mask
    rewards, kl = losses.kl_shaped_rewards(r.logp, r.ref_logp, mask, r.scores, beta, o.kl_estimator)
    if o.whiten_rewards:
        rewards = global_whiten(accelerator, rewards, mask, shift_mean=False) * mask
    advantages, returns = losses.gae(rewards, r.values, mask, o.gamma, o.lam)
    advantages = global_whiten(accelerator, advantages, mask) * mask
    stats = ppo_update(m, accelerator, optimizer, scheduler, r, advantages, returns, recipe, iteration)
    return stats, kl, returns


# --------------------------------------------------------------------------- checkpoints


class LoopState:
    """What a checkpoint needs beyond models, optimizer, scheduler and RNG states."""

    def __init__(self, beta: float):
        self.iteration = 0  # iterations done = the position in the data
        self.beta = beta
        self.first_score: float | None = None

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def save_checkpoint(accelerator, work_dir: Path, iteration: int) -> None:
    """accelerate's save_state (models, optimizer, scheduler, loop state, every process's RNG)
    into a temporary directory renamed when complete, so a kill never leaves a half checkpoint."""
    root = work_dir / "checkpoints"
    tmp = root / f"tmp-checkpoint-{iteration}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(root / f"checkpoint-{iteration}")
        for old in root.glob("checkpoint-*"):
            if old.name != f"checkpoint-{iteration}":
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the stage


def run(recipe: PPORecipe, inputs: dict, work_dir: Path) -> dict:
    o, t = recipe.ppo, recipe.training
    precision = precision_flags(recipe)
    accelerator = Accelerator(
        cpu=use_cpu(),
        mixed_precision="bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "no",
        log_with=t.report_to or None,
        project_dir=str(work_dir / "logs"),  # trackers' files (TensorBoard: logs/ppo/), as the trainer stages
    )
    say = accelerator.print
    world_size = accelerator.num_processes
    per_process = o.batch_size // world_size
    if o.batch_size % (world_size * o.num_minibatches * t.gradient_accumulation_steps):
        raise RecipeError(
            f"ppo.batch_size: {o.batch_size} rollouts do not split into {world_size} processes x "
            f"{o.num_minibatches} minibatches x {t.gradient_accumulation_steps} micro-batches"
        )
    set_seed(recipe.seed, device_specific=True)  # each process samples its own replies

    # Inputs: models (policy, reference, critic, reward) and prompts.
    m = build_models(recipe, inputs, say)
    prompts, rendered, counts = load_prompts(recipe, m.tok)
    iterations = o.total_episodes // o.batch_size
    optimizer, scheduler = prepare_training(m, accelerator, recipe)
    loop = LoopState(o.kl_coef)
    accelerator.register_for_checkpointing(scheduler, loop)

    resume = last_checkpoint(work_dir)
    if resume:
        accelerator.load_state(resume)
        if accelerator.is_main_process:
            drop_metrics_after(work_dir / "metrics.jsonl", loop.iteration)
        say(f"ppo: resumed from {Path(resume).name} (iteration {loop.iteration} of {iterations})")
    accelerator.init_trackers("ppo", config={k: v for k, v in o.model_dump().items() if isinstance(v, (int, float, str, bool))})

    metrics_file = work_dir / "metrics.jsonl"
    bar = tqdm(total=iterations * o.batch_size, initial=loop.iteration * o.batch_size, desc="ppo", unit="ep",
               disable=not accelerator.is_main_process)
    started_at, started_iteration = time.perf_counter(), loop.iteration
    record: dict = {}
    while loop.iteration < iterations:
        it_started = time.perf_counter()
        timer = {"generation": 0.0, "scoring": 0.0, "optimisation": 0.0}
        rows = batch_indices(len(prompts), o.batch_size, loop.iteration, recipe.seed)
        mine = rows[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]

        # 1-2. rollout and scoring (no gradients anywhere)
        r = rollout(m, accelerator, [rendered[i] for i in mine], [prompts[i] for i in mine], recipe, timer)

        started = time.perf_counter()
        # 3-5. KL-shaped rewards, advantages, PPO epochs
        stats, kl, returns = learn(m, accelerator, optimizer, scheduler, r, loop.beta, recipe, loop.iteration)
        timer["optimisation"] += time.perf_counter() - started

        # 6. metrics, KL control, checkpoint
        g = lambda x: accelerator.gather(x.float())  # noqa: E731 - every process's rows
        seq_kl = g(kl.sum(-1))
        scores = g(r.scores)
        non_score = g((-loop.beta * kl).sum(-1))
        all_mask = g(r.response_mask)
        record = {
            "objective/kl": seq_kl.mean().item(),
            "objective/scores": scores.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (scores + non_score).mean().item(),
            "objective/entropy": losses.masked_mean(g(r.entropy), all_mask).item(),
            **stats,
            "value/explained_variance": losses.explained_variance(g(r.values), g(returns), all_mask).item(),
            "eos_fraction": g(r.finished).mean().item(),
            "response_length": all_mask.sum(-1).mean().item(),
            "beta": loop.beta,
            "lr": scheduler.get_last_lr()[0],
            "episodes": (loop.iteration + 1) * o.batch_size,
            "episodes_per_second": o.batch_size / (time.perf_counter() - it_started),
            **{f"time/{k}": v for k, v in timer.items()},
        }
        if loop.first_score is None:
            loop.first_score = record["objective/scores"]
        if o.kl_control == "adaptive":
            loop.beta = losses.adaptive_kl_update(loop.beta, record["objective/kl"], o.kl_target, o.batch_size, o.kl_horizon)
        loop.iteration += 1
        if accelerator.is_main_process:
            append_metrics(metrics_file, {"step": loop.iteration, **record})
        accelerator.log(record, step=loop.iteration)
        bar.update(o.batch_size)
        bar.set_postfix(score=f"{record['objective/scores']:.3f}", kl=f"{record['objective/kl']:.3f}")
        if t.save_steps and loop.iteration % t.save_steps == 0 and loop.iteration < iterations:
            save_checkpoint(accelerator, work_dir, loop.iteration)
    bar.close()
    for tracker in accelerator.trackers:  # not end_training(): it also ends the process group the pipeline still uses
        tracker.finish()

    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(m.policy), m.tok, work_dir, recipe.lora)
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - started_at
    done = loop.iteration - started_iteration
    return {
        **counts,
        "iterations": loop.iteration,
        "episodes": loop.iteration * o.batch_size,
        "final_kl": record.get("objective/kl", float("nan")),
        "first_score": loop.first_score,
        "final_score": record.get("objective/scores", float("nan")),
        "score_gain": record.get("objective/scores", float("nan")) - (loop.first_score or 0.0),
        "final_beta": loop.beta,
        "episodes_per_second": done * o.batch_size / elapsed if done else float("nan"),
        "reference": "policy with adapters disabled" if m.reference is None else "frozen copy of the starting model",
        "resumed_from": Path(resume).name if resume else "",
    }
