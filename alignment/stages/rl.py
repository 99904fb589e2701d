"""Stages `ppo`, `grpo` and `rloo`: one online RL loop on accelerate + transformers.

The advantage estimator is the only real difference between them (as OpenRLHF's
`--advantage_estimator` and verl's `algorithm.adv_estimator`): `gae` with a critic (PPO),
or a critic-free one over a group of replies to each prompt (GRPO, RLOO, REINFORCE with a
baseline). `stages/grpo.py` and `stages/rloo.py` only name this loop; their recipes' sections
(`grpo:`, `rloo:`) choose the defaults of each method.

Models: the policy and the frozen reference both start from `model` (the SFT output; with
LoRA the reference is the policy with its adapters disabled; with a KL coefficient of 0, none
is loaded); the reward sources (`alignment/rewards.py`: a reward model, Python functions, the
demo oracle) are frozen; PPO's critic starts from the reward model (or the policy, with a new
head) and gives a value at every position. Dropout is off in all of them.

One iteration, as the loop below reads:
1. rollout: sample `num_generations` replies (1 for PPO) to each of batch_size / num_generations
   prompts (temperature T, KV cache); with `dynamic_sampling` (DAPO), groups whose scores are all
   equal are dropped and more prompts sampled until the batch is full (`sample_batch`);
2. score: log-probs of the reply tokens under the policy (the "old" log-probs) and the
   reference, at the same T; PPO's values; each reward source's score (minus
   `missing_eos_penalty` for replies without EOS, plus DAPO's overlong penalty with
   `soft_punish_cache`), summed with the recipe's weights. When the
   update is on-policy (`old_logprobs_from_update`: one pass over one minibatch, nothing needs
   the old log-probs before it), the policy's pass is left out here: the update's own forward
   gives them, detached (ratio exactly 1), with the entropy, as TRL's GRPOTrainer does;
3. advantages: PPO: r_t = -beta kl_t on every reply token plus the score on the last, GAE,
   whitened over all real tokens. Critic-free: the reply's score against its group's by the
   registered estimator (`estimators.ADVANTAGE`: grpo, rloo, ...) or the recipe's own
   function (`advantage_estimator`), minus beta times the
   estimator's unscaled advantage of its summed KL when the KL is in the reward; the same
   advantage on every token of the reply;
4. policy epochs: `ppo_epochs` passes over `num_minibatches` minibatches, one optimizer step
   each: the clipped surrogate (per token, or GSPO's per-reply ratio; `epsilon_high`: DAPO's
   clip-higher), plus PPO's clipped value loss, or the KL term when the KL is in the loss, each
   aggregated over the whole minibatch (`losses.aggregate_loss`: global token/reply totals);
5. log every metric, adapt beta (adaptive control), checkpoint every `training.save_steps`.

Everything after a reply's first EOS is masked: it adds no KL and trains nothing. All math
lives in `alignment/losses.py` and `alignment/estimators.py`, sampling and forward passes in `alignment/generation.py`,
model plumbing in `alignment/models.py`, reward sources in `alignment/rewards.py`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import estimators, losses, user_functions
from ..templates import encode, render_prompt, template_complaint
from ..config import RLRecipe
from ..errors import RecipeError
from ..data import Rows, check_rows, load_rows
from ..demo import world
from ..generation import position_ids, sample, token_logprobs
from ..models import (
    PerTokenScores,
    apply_lora,
    check_reward_model,
    frozen,
    load_causal_lm,
    load_classifier,
    load_reward_tokenizer,
    load_tokenizer,
    no_dropout,
    per_token_head,
    same_tokenizer,
    save_model,
)
from ..rewards import Rewards
from .. import sharding
from .common import append_metrics, drop_metrics_after, last_checkpoint, precision_flags, use_cpu

# --------------------------------------------------------------------------- inputs


def load_prompts(recipe: RLRecipe, tok) -> tuple[list[str], list[str], dict, list[dict]]:
    """(user prompts, the same rendered with the chat template, counts, their data rows): the rows
    of `data.source` with a usable prompt; too long ones are dropped and counted."""
    d = recipe.data

    def problem(row: dict) -> str | None:
        value = row.get(d.prompt_field)
        if value is None:
            return f"missing '{d.prompt_field}'"
        if not isinstance(value, str) or not value.strip():
            return f"'{d.prompt_field}' is not a non-empty string"
        complaint = template_complaint(tok, [{"role": "user", "content": value}], add_generation_prompt=True)
        return f"the chat template cannot render this prompt ({complaint})" if complaint else None

    found = check_rows(load_rows(d, world.preset(recipe.world).train_prompts), problem, d.on_bad_row)
    kept = Rows([], [], found.dropped)
    rendered = []
    for row, origin in zip(found.rows, found.origins):
        text = render_prompt(tok, row[d.prompt_field])
        if len(encode(tok, text)) > d.max_prompt_length:  # as rollouts tokenise it
            kept.dropped[f"longer than data.max_prompt_length ({d.max_prompt_length} tokens)"] += 1
            continue
        kept.rows.append(row)
        kept.origins.append(origin)
        rendered.append(text)
    if not kept.rows:
        raise RecipeError(f"data.source '{d.source}': no usable prompts ({dict(kept.dropped)})")
    counts = {"prompts": len(kept), **{f"dropped/{k}": v for k, v in kept.dropped.items()}}
    return [r[d.prompt_field] for r in kept.rows], rendered, counts, kept.rows


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
    reference: torch.nn.Module | None  # a frozen copy; None: see reference_kind
    critic: torch.nn.Module | None  # PPO only
    rewards: Rewards
    tok: object
    reference_kind: str = "copy"  # 'copy', 'adapters' (the policy with adapters disabled) or 'none' (KL 0)


def build_models(recipe: RLRecipe, inputs: dict, say) -> Models:
    o, options = recipe.rl, recipe.model_options
    tok = load_tokenizer(inputs["model"], options)
    reward, reward_tok, critic_from_reward = None, None, False
    if inputs.get("reward_model"):
        check_reward_model(inputs["reward_model"])
        reward_tok = load_reward_tokenizer(inputs["reward_model"], options)
        reward = frozen(load_classifier(inputs["reward_model"], reward_tok, options))
        shared = same_tokenizer(tok, reward_tok)
        critic_from_reward = shared and per_token_head(reward)
        if o.uses_critic and not critic_from_reward:
            why = ("its tokenizer differs from the policy's (vocabulary, special tokens or chat template)" if not shared
                   else "its head pools the sequence itself, so it gives no value per token")
            say(f"{recipe.stage}: the critic starts from the policy with a new value head, not from the reward model: {why}")
    policy = no_dropout(load_causal_lm(inputs["model"], tok, options))
    reference, kind = None, "copy"
    if o.kl_coef == 0 and o.kl_control == "fixed":
        kind = "none"
    elif recipe.lora is not None:
        kind = "adapters"
    else:
        reference = frozen(load_causal_lm(inputs["model"], tok, options))
    if recipe.lora is not None:
        policy = no_dropout(apply_lora(policy, recipe.lora))
    critic = None
    if o.uses_critic:
        critic = load_classifier(inputs["reward_model"] if critic_from_reward else inputs["model"], tok, options)
        if recipe.lora is not None:
            critic = apply_lora(critic, recipe.lora, task_type="SEQ_CLS")
        critic = PerTokenScores(no_dropout(critic))
    rewards = Rewards(recipe, reward, tok, reward_tok)
    return Models(policy, reference, critic, rewards, tok, kind)


def trained_models(m: Models) -> list[torch.nn.Module]:
    return [m.policy] if m.critic is None else [m.policy, m.critic]


@contextlib.contextmanager
def train_mode(models: list[torch.nn.Module]):
    """The policy epochs run in train mode, so that transformers checkpoints activations when
    `model_options.gradient_checkpointing` is on (it does in train mode only); every dropout
    probability is 0 (`no_dropout`), so train mode computes what eval mode does. Rollouts: eval."""
    for model in models:
        model.train()
    try:
        yield
    finally:
        for model in models:
            model.eval()


def prepare_training(m: Models, accelerator, recipe: RLRecipe):
    """One AdamW over the policy's (and PPO's critic's) trainable weights, the LR schedule over every
    optimizer step of the run; models placed (and wrapped for DDP) by accelerate, or under an FSDP launch
    all of them sharded by `sharding.shard_models` first."""
    o, t = recipe.rl, recipe.training
    optimizer_steps = (o.total_episodes // o.batch_size) * o.ppo_epochs * o.num_minibatches
    fsdp = sharding.active(accelerator)
    if fsdp:  # FSDP2 (alignment/sharding.py): every model sharded here, the optimizer then over the shards
        sharding.shard_models(m, accelerator, precision_flags(recipe)["bf16"])
    params = [p for model in trained_models(m) for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = t.warmup_steps if t.warmup_steps >= 1 else math.ceil(t.warmup_steps * optimizer_steps)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup), num_training_steps=optimizer_steps)
    if fsdp:
        return optimizer, scheduler
    if m.critic is None:
        m.policy, optimizer = accelerator.prepare(m.policy, optimizer)
    else:
        m.policy, m.critic, optimizer = accelerator.prepare(m.policy, m.critic, optimizer)
    for frozen_model in (m.reference, m.rewards.reward_model):
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
    logp: torch.Tensor | None = None  # old log-probs, at the sampling temperature (on-policy: set by the update)
    ref_logp: torch.Tensor | None = None  # None: no reference (KL coefficient 0), the KL is 0
    values: torch.Tensor | None = None  # PPO's critic
    scores: torch.Tensor | None = None  # the weighted sum of the sources, minus the missing-EOS penalty
    entropy: torch.Tensor | None = None  # (B, R) per-token entropy of the sampling distribution
    sources: dict = field(default_factory=dict)  # each reward source's (B,) scores

    def rows(self, index) -> "Rollout":
        def pick(x):
            if isinstance(x, torch.Tensor):
                return x[index]
            if isinstance(x, dict):
                return {k: v[index] for k, v in x.items()}
            return x

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


def reference_logprobs(m: Models, policy, r: Rollout, temperature: float) -> torch.Tensor:
    if m.reference_kind == "adapters":
        with policy.disable_adapter():
            return reply_logprobs(policy, r, temperature)
    return reply_logprobs(m.reference, r, temperature)


def old_logprobs_from_update(m: Models, o) -> bool:
    """Whether the update's own first forward pass can give the old log-probs, so that scoring
    leaves the policy's pass out: provably on-policy, i.e. one pass (ppo_epochs 1) over one
    minibatch, so that every micro-batch's forward runs before the only optimizer step, with the
    weights that sampled; and nothing needs them before the update (PPO's GAE rewards, a KL in
    the reward)."""
    kl_before_update = not o.kl_in_loss and m.reference_kind != "none"
    return o.ppo_epochs == 1 and o.num_minibatches == 1 and not o.uses_critic and not kl_before_update


def token_kl(r: Rollout, estimator: str) -> torch.Tensor:
    """(B, R) per-token KL estimate to the reference: 0 after EOS, and everywhere without a reference
    (then the on-policy path may not have filled the old log-probs yet: the mask gives the shape)."""
    if r.ref_logp is None:
        return torch.zeros(r.response_mask.shape, device=r.response_mask.device)
    return estimators.masked_kl(r.logp, r.ref_logp, r.response_mask, estimator)


def source_scores(m: Models, r: Rollout, prompts: list[str], rows: list[dict], which: str = "all") -> dict[str, torch.Tensor]:
    """Each reward source's score of the rollout's replies (no missing-EOS penalty); `which`: 'model' (the
    reward model only), 'functions' (the Python functions only) or 'all'."""
    return m.rewards.scores(prompts, rows, r.input_ids, r.attention_mask, r.response_ids, r.response_mask, r.finished,
                            which=which)


@torch.no_grad()
def rollout(m: Models, accelerator, rendered: list[str], prompts: list[str], recipe: RLRecipe, timer: dict,
            rows: list[dict] | None = None) -> Rollout:
    """Sample one reply to each of `rendered` (a prompt repeated num_generations times gives a group)
    and score it. Every forward pass runs under the accelerator's autocast, the frozen reference's
    too, so that under mixed precision policy and reference log-probs agree while they are equal;
    sampling too, so that replies are drawn from the distribution the old log-probs describe."""
    o = recipe.rl
    rows = rows if rows is not None else [{recipe.data.prompt_field: p} for p in prompts]
    policy = accelerator.unwrap_model(m.policy)
    started = time.perf_counter()
    with accelerator.autocast(), sharding.generation(policy, o.generation_gather):  # peft's generate bypasses the autocast accelerate wraps around forward
        s = sample(policy, m.tok, rendered, max_new_tokens=o.response_length, temperature=o.temperature, top_p=o.top_p)
    r = Rollout(s.input_ids, s.attention_mask, s.prompt_ids.shape[1], s.response_ids, s.response_mask, s.finished)
    timer["generation"] += time.perf_counter() - started

    started = time.perf_counter()
    parts: dict[str, list] = {"logp": [], "entropy": [], "ref_logp": [], "values": [], "sources": []}
    step = o.forward_batch_size or len(prompts)
    old_logprobs = not old_logprobs_from_update(m, o)
    with accelerator.autocast():
        for lo in range(0, len(prompts), step):
            chunk = r.rows(slice(lo, lo + step))
            if old_logprobs:
                logp, entropy = reply_logprobs(policy, chunk, o.temperature, with_entropy=True)
                parts["logp"].append(logp)
                parts["entropy"].append(entropy)
            if m.reference_kind != "none":
                parts["ref_logp"].append(reference_logprobs(m, policy, chunk, o.temperature))
            if m.critic is not None:
                parts["values"].append(reply_values(accelerator.unwrap_model(m.critic), chunk))
            if m.rewards.reward_model is not None:  # the model in chunks; functions below, once per batch
                parts["sources"].append(source_scores(m, chunk, prompts[lo : lo + step], rows[lo : lo + step], "model"))
    for name in ("logp", "entropy", "ref_logp", "values"):
        if parts[name]:
            setattr(r, name, torch.cat(parts[name]).float())
    r.sources = {k: torch.cat([p[k] for p in parts["sources"]]).float() for k in (parts["sources"] or [{}])[0]}
    r.sources.update(source_scores(m, r, prompts, rows, "functions"))
    if o.soft_punish_cache:
        r.sources["overlong"] = losses.overlong_penalty(r.response_mask.sum(-1), o.response_length, o.soft_punish_cache)
    r.scores = m.rewards.total(r.sources)
    if o.missing_eos_penalty is not None:
        r.scores = r.scores - o.missing_eos_penalty * (~r.finished).float()
    timer["scoring"] += time.perf_counter() - started
    return r


def global_whiten(accelerator, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`losses.masked_whiten` with statistics over every process's batch."""
    if accelerator.num_processes == 1:
        return losses.masked_whiten(x, mask, shift_mean)
    everything = losses.masked_whiten(accelerator.gather(x), accelerator.gather(mask), shift_mean)
    n = x.shape[0]
    return everything[accelerator.process_index * n : (accelerator.process_index + 1) * n]


def advantage_estimator(recipe: RLRecipe) -> Callable:
    """The critic-free estimator `advantage_estimator` names: a registered one (alignment/estimators.py),
    or the recipe's own function ('file.py:name', 'module:name'), whose every answer is checked: a
    float tensor of one finite advantage per reply, else a one-line RecipeError naming the key."""
    ref = recipe.rl.estimator
    if ref in estimators.ADVANTAGE:
        return estimators.ADVANTAGE[ref]
    key = f"{recipe.stage}.advantage_estimator"
    fn = user_functions.load_function(ref, key, estimators.ADVANTAGE_ARGUMENTS)

    def checked(scores: torch.Tensor, group_size: int, scale: bool, whiten: Callable) -> torch.Tensor:
        try:
            out = fn(scores, group_size, scale, whiten)
        except RecipeError:
            raise
        except Exception as exc:  # the user's code: its error in one line
            raise RecipeError(f"{key} {ref!r} raised {type(exc).__name__}: {exc}") from None
        n = scores.shape[0]
        if not isinstance(out, torch.Tensor):
            got = type(out).__name__
        elif not out.is_floating_point():
            got = f"a {out.dtype} tensor"
        elif tuple(out.shape) != (n,):
            got = f"a tensor of shape {list(out.shape)}"
        elif not out.isfinite().all():
            bad = int((~out.isfinite()).nonzero()[0])
            got = f"{out[bad].item()} for reply {bad}"
        else:
            return out.float()  # float32 as the registered ones give: a float64 answer would make the loss float64
        raise RecipeError(f"{key} {ref!r} returned {got}; expected a float tensor of shape [{n}], one finite advantage "
                          "per reply")

    return checked


def group_advantages(accelerator, scores: torch.Tensor, estimator: Callable, group_size: int, scale: bool) -> torch.Tensor:
    """One advantage per reply from the scores of its group (a process holds whole groups), by
    `estimator` (`advantage_estimator`'s); its batch-wide whitening, if any, over every process's
    replies."""

    def whiten(x: torch.Tensor) -> torch.Tensor:
        return global_whiten(accelerator, x[:, None], torch.ones_like(x[:, None]))[:, 0]

    return estimator(scores, group_size, scale, whiten)


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout of several (dynamic sampling's rounds): prompts left-padded to the longest
    prompt, replies right-padded to the longest reply, with masks 0 there (position ids come from the
    mask, so the padding changes no log-prob)."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.context_length for p in parts)
    R = max(p.response_ids.shape[1] for p in parts)
    pad = torch.nn.functional.pad

    def widen(p: Rollout) -> dict:
        left, right = P - p.context_length, R - p.response_ids.shape[1]
        out = {}
        for name, x in p.__dict__.items():
            if name in ("input_ids", "attention_mask"):
                fill = pad_id if name == "input_ids" else 0
                x = torch.cat([pad(x[:, : p.context_length], (left, 0), value=fill),
                               pad(x[:, p.context_length :], (0, right), value=fill)], 1)
            elif isinstance(x, torch.Tensor) and x.dim() == 2:  # (B, R): reply ids, mask, log-probs, values
                x = pad(x, (0, right), value=pad_id if name == "response_ids" else 0)
            out[name] = x
        return out

    wide = [widen(p) for p in parts]
    merged = {}
    for name, first in wide[0].items():
        if isinstance(first, torch.Tensor):
            merged[name] = torch.cat([w[name] for w in wide])
        elif isinstance(first, dict):
            merged[name] = {k: torch.cat([w[name][k] for w in wide]) for k in first}
        elif name == "context_length":
            merged[name] = P
        else:  # None (a pass the rollouts left out) everywhere
            merged[name] = first
    return Rollout(**merged)


def sample_batch(m: Models, accelerator, recipe: RLRecipe, timer: dict, data: tuple, iteration: int) -> tuple[Rollout, dict]:
    """This process's rollouts of iteration `iteration`: its share of the batch's prompts, each
    num_generations times in a row (a group). With `dynamic_sampling` (DAPO, Yu et al. 2025), groups
    whose scores are all equal are dropped and further rounds of prompts sampled (round k's prompts:
    the iteration's slice of a permutation seeded by seed and k) until every process holds its share,
    at most `dynamic_sampling_max_rounds` rounds; a batch the rounds do not fill is topped up with
    dropped groups (advantage 0). Returns (rollout, dynamic-sampling metrics over all processes)."""
    o = recipe.rl
    prompts, rendered, prompt_rows = data
    G = o.group_size
    group_prompts = (o.batch_size // accelerator.num_processes) // G
    me = accelerator.process_index

    def one_round(k: int) -> Rollout:
        seed = recipe.seed if k == 0 else recipe.seed + 100_003 * k
        rows = batch_indices(len(prompts), o.batch_size // G, iteration, seed)
        mine = [i for i in rows[me * group_prompts : (me + 1) * group_prompts] for _ in range(G)]
        return rollout(m, accelerator, [rendered[i] for i in mine], [prompts[i] for i in mine], recipe, timer,
                       [prompt_rows[i] for i in mine])

    if not o.drops_equal_groups:
        return one_round(0), {}
    kept: list[Rollout] = []
    spare: list[Rollout] = []
    have = sampled = dropped = rounds = 0
    first_round = 0.0  # the sum of round 1's scores: every group, before any is dropped (an unbiased mean)
    while rounds < o.dynamic_sampling_max_rounds:
        short = torch.tensor(float(group_prompts - have > 0), device=accelerator.device)
        if accelerator.reduce(short, "sum").item() == 0:
            break
        rounds += 1
        if have < group_prompts or sharding.active(accelerator):  # FSDP2: a forward is collective, all sample
            r = one_round(rounds - 1)
            if have >= group_prompts:
                continue
            first_round += r.scores.sum().item() if rounds == 1 else 0.0
            useful = losses.informative_groups(r.scores, G).tolist()
            sampled += len(useful)
            dropped += useful.count(False)
            for group, ok in enumerate(useful):
                rows = torch.arange(group * G, (group + 1) * G)
                if ok and have < group_prompts:
                    kept.append(r.rows(rows))
                    have += 1
                elif not ok:
                    spare.append(r.rows(rows))
    topped_up = group_prompts - have
    kept += spare[:topped_up]
    counts = torch.tensor([float(sampled), float(dropped), float(topped_up), first_round], device=accelerator.device)
    sampled, dropped, topped_up, first_round = accelerator.reduce(counts, "sum").tolist()
    stats = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/sampled_groups": sampled,
             "dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/topped_up": topped_up,
             # objective/scores is over the kept groups (all-equal ones dropped): this one is comparable to a run without
             "dynamic_sampling/first_round_scores": first_round / o.batch_size}
    return cat_rollouts(kept, m.tok.pad_token_id), stats


# --------------------------------------------------------------------------- optimisation


def ppo_update(
    m: Models, accelerator, optimizer, scheduler, r: Rollout, advantages, returns, loss_mask, beta: float,
    recipe: RLRecipe, iteration: int,
) -> dict:
    """`ppo_epochs` passes of `num_minibatches` optimizer steps over the rollouts. Each loss is
    aggregated over the whole minibatch: every micro-batch's part divides by the minibatch's token (or
    reply) totals over all processes (`losses.aggregate_loss`), summed over micro-batches and
    processes (DDP then averages the gradients over processes, hence the factor num_processes)."""
    o, t = recipe.rl, recipe.training
    n = r.input_ids.shape[0]
    aggregation = o.aggregation
    kl_in_loss = o.kl_in_loss and m.reference_kind != "none"
    params = [p for model in trained_models(m) for p in model.parameters() if p.requires_grad]
    names = ["loss/policy", "policy/clipfrac", "policy/approxkl", "val/ratio", "val/ratio_sq"]
    names += ["loss/value", "value/clipfrac"] if m.critic is not None else []
    names += ["loss/kl"] if kl_in_loss else []
    sums: dict[str, float] = {}
    first: dict[str, float] = {}
    steps = 0
    on_policy = r.logp is None  # the rollout left the old log-probs to this pass (old_logprobs_from_update)
    if on_policy:
        assert o.ppo_epochs == 1 and o.num_minibatches == 1, "old log-probs from the update need one pass of one minibatch"
        r.logp, r.entropy = (torch.zeros(loss_mask.shape, device=loss_mask.device) for _ in range(2))
    for epoch in range(o.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed * 7919 + iteration * 131 + epoch))
        for mb_index, minibatch in enumerate(order.chunk(o.num_minibatches)):
            tokens = accelerator.reduce(loss_mask[minibatch].sum().float(), "sum").clamp_min(1)
            replies = len(minibatch) * accelerator.num_processes
            stats = dict.fromkeys(names, 0.0)
            micros = minibatch.chunk(t.gradient_accumulation_steps)
            for k, micro in enumerate(micros):
                b = r.rows(micro)
                mask = loss_mask[micro]
                token_share = mask.sum() / tokens  # this micro-batch's share of the minibatch's tokens
                sync = contextlib.ExitStack()
                if k < len(micros) - 1:
                    for model in trained_models(m):
                        sync.enter_context(sharding.no_sync(accelerator, model))
                with sync, accelerator.autocast():
                    if on_policy:  # the weights that sampled: the old log-probs are these, detached
                        logp, entropy = reply_logprobs(m.policy, b, o.temperature, with_entropy=True)
                        r.logp[micro], r.entropy[micro] = logp.detach().float(), entropy.detach().float()
                        b.logp = r.logp[micro]
                    else:
                        logp = reply_logprobs(m.policy, b, o.temperature)
                    # every term: this micro-batch's part of the minibatch's loss (global token/reply totals)
                    part = lambda per_token, kind=aggregation: losses.aggregate_loss(  # noqa: E731
                        per_token, mask, kind, tokens, replies, o.response_length)
                    surrogate, clipped = losses.clipped_surrogate(
                        logp, b.logp, advantages[micro], mask, o.clip_range, o.ratio_clip_high, o.ratio_level)
                    loss = part(surrogate)
                    micro_stats = {"loss/policy": loss, "policy/clipfrac": part(clipped.float(), "token"),
                                   "policy/approxkl": part(0.5 * (logp - b.logp) ** 2, "token")}
                    if m.critic is not None:
                        error, vf_clipped = losses.clipped_value_error(reply_values(m.critic, b), b.values, returns[micro],
                                                                       o.value_clip_range)
                        vf_loss = part(error, "token")
                        loss = loss + o.vf_coef * vf_loss
                        micro_stats.update({"loss/value": vf_loss, "value/clipfrac": part(vf_clipped.float(), "token")})
                    if kl_in_loss:
                        kl = part(estimators.kl_penalty(logp, b.ref_logp, o.kl_estimator))
                        loss = loss + beta * kl
                        micro_stats["loss/kl"] = kl
                    accelerator.backward(loss * accelerator.num_processes)  # DDP averages over processes
                with torch.no_grad():
                    ratio = torch.exp(logp - b.logp)
                    micro_stats["val/ratio"] = losses.masked_mean(ratio, mask) * token_share
                    micro_stats["val/ratio_sq"] = losses.masked_mean(ratio**2, mask) * token_share
                    for name, value in micro_stats.items():
                        stats[name] += float(value)
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


def learn(m: Models, accelerator, optimizer, scheduler, r: Rollout, beta: float, recipe: RLRecipe, iteration: int):
    """Steps 3-4 of an iteration on scored rollouts: advantages (statistics over all processes) and
    the policy epochs. Returns (stats, kl, returns, advantages); returns is None without a critic.
    The KL is read after the update: on-policy, the update's forward gives the old log-probs."""
    o = recipe.rl
    mask = r.response_mask
    if o.uses_critic:
        rewards = losses.rewards_from_kl(token_kl(r, o.kl_estimator), mask, r.scores, beta)
        if o.whiten_rewards:
            rewards = global_whiten(accelerator, rewards, mask, shift_mean=False) * mask
        advantages, returns = losses.gae(rewards, r.values, mask, o.gamma, o.lam)
        advantages = global_whiten(accelerator, advantages, mask) * mask
        loss_mask, per_reply = mask, None
    else:
        estimator = advantage_estimator(recipe)
        per_reply = group_advantages(accelerator, r.scores, estimator, o.group_size, scale=o.scale_rewards)
        if not o.kl_in_loss and m.reference_kind != "none":  # the KL in the reward keeps beta's scale: unscaled
            kl_sums = token_kl(r, o.kl_estimator).sum(-1)
            per_reply = per_reply - beta * group_advantages(accelerator, kl_sums, estimator, o.group_size, scale=False)
        loss_mask = mask * r.finished[:, None] if o.mask_truncated_completions else mask
        advantages, returns = per_reply[:, None] * loss_mask, None
    with train_mode(trained_models(m)):
        stats = ppo_update(m, accelerator, optimizer, scheduler, r, advantages, returns, loss_mask, beta, recipe, iteration)
    return stats, token_kl(r, o.kl_estimator), returns, per_reply


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


def save_checkpoint(accelerator, work_dir: Path, iteration: int, sharded: sharding.Checkpointer | None = None) -> None:
    """accelerate's save_state (models, optimizer, scheduler, loop state, every process's RNG), or
    under FSDP2 the sharded checkpoint (`sharded`), into a temporary directory renamed when complete,
    so a kill never leaves a half checkpoint."""
    root = work_dir / "checkpoints"
    tmp = root / f"tmp-checkpoint-{iteration}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded is not None:
        sharded.save(tmp)
    else:
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(root / f"checkpoint-{iteration}")
        for old in root.glob("checkpoint-*"):
            if old.name != f"checkpoint-{iteration}":
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- metrics


def iteration_metrics(accelerator, m: Models, r: Rollout, kl, returns, per_reply, beta: float, o) -> dict:
    """What one iteration did, over every process's rollouts."""
    g = lambda x: accelerator.gather(x.float())  # noqa: E731 - every process's rows
    seq_kl = g(kl.sum(-1))
    scores = g(r.scores)
    non_score = -beta * seq_kl
    all_mask = g(r.response_mask)
    record = {
        "objective/kl": seq_kl.mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scores + non_score).mean().item(),
        "objective/entropy": losses.masked_mean(g(r.entropy), all_mask).item(),
        **{f"rewards/{name}": g(value).nanmean().item() for name, value in r.sources.items()},  # None: not applicable
        "eos_fraction": g(r.finished).mean().item(),
        "response_length": all_mask.sum(-1).mean().item(),
    }
    if m.critic is not None:
        record["value/explained_variance"] = losses.explained_variance(g(r.values), g(returns), all_mask).item()
    if per_reply is not None:
        advantages, groups = g(per_reply), g(r.scores).view(-1, o.group_size)
        record.update({
            "advantages/mean": advantages.mean().item(), "advantages/std": advantages.std().item(),
            "advantages/min": advantages.min().item(), "advantages/max": advantages.max().item(),
            "frac_groups_equal_rewards": (groups.max(1).values == groups.min(1).values).float().mean().item(),
        })
    return record


# --------------------------------------------------------------------------- the stage


def run(recipe: RLRecipe, inputs: dict, work_dir: Path) -> dict:
    o, t, stage = recipe.rl, recipe.training, recipe.stage
    precision = precision_flags(recipe)
    accelerator = Accelerator(
        cpu=use_cpu(),
        mixed_precision="bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "no",
        log_with=t.report_to or None,
        project_dir=str(work_dir / "logs"),  # trackers' files (TensorBoard: logs/<stage>/), as the trainer stages
    )
    say = accelerator.print
    world_size = accelerator.num_processes
    per_process = o.batch_size // world_size
    if o.batch_size % (world_size * o.num_minibatches * t.gradient_accumulation_steps):
        raise RecipeError(
            f"{stage}.batch_size: {o.batch_size} rollouts do not split into {world_size} processes x "
            f"{o.num_minibatches} minibatches x {t.gradient_accumulation_steps} micro-batches"
        )
    if per_process % o.group_size:
        raise RecipeError(
            f"{stage}.batch_size: {per_process} rollouts per process do not hold whole groups of num_generations "
            f"{o.group_size}; use a multiple of {world_size * o.group_size}"
        )
    set_seed(recipe.seed, device_specific=True)  # each process samples its own replies

    # Inputs: models (policy, reference, critic, reward sources) and prompts.
    m = build_models(recipe, inputs, say)
    prompts, rendered, counts, prompt_rows = load_prompts(recipe, m.tok)
    iterations = o.total_episodes // o.batch_size
    optimizer, scheduler = prepare_training(m, accelerator, recipe)
    loop = LoopState(o.kl_coef)
    accelerator.register_for_checkpointing(scheduler, loop)
    sharded = sharding.Checkpointer(accelerator, trained_models(m), optimizer, [scheduler, loop]) if sharding.active(accelerator) else None

    resume = last_checkpoint(work_dir)
    if resume:
        sharded.load(resume) if sharded else accelerator.load_state(resume)
        if accelerator.is_main_process:
            drop_metrics_after(work_dir / "metrics.jsonl", loop.iteration)
        say(f"{stage}: resumed from {Path(resume).name} (iteration {loop.iteration} of {iterations})")
    accelerator.init_trackers(stage, config={k: v for k, v in o.model_dump().items() if isinstance(v, (int, float, str, bool))})

    metrics_file = work_dir / "metrics.jsonl"
    bar = tqdm(total=iterations * o.batch_size, initial=loop.iteration * o.batch_size, desc=stage, unit="ep",
               disable=not accelerator.is_main_process)
    started_at, started_iteration = time.perf_counter(), loop.iteration
    record: dict = {}
    try:  # the bar is closed on an error too, so that the error's line is a line of its own
        while loop.iteration < iterations:
            it_started = time.perf_counter()
            timer = {"generation": 0.0, "scoring": 0.0, "optimisation": 0.0}
            # 1-2. rollout and scoring (no gradients anywhere); a group: one prompt num_generations times in a row
            r, sampling = sample_batch(m, accelerator, recipe, timer, (prompts, rendered, prompt_rows), loop.iteration)

            started = time.perf_counter()
            # 3-4. advantages, policy epochs
            stats, kl, returns, per_reply = learn(m, accelerator, optimizer, scheduler, r, loop.beta, recipe, loop.iteration)
            timer["optimisation"] += time.perf_counter() - started

            # 5. metrics, KL control, checkpoint
            record = {
                **iteration_metrics(accelerator, m, r, kl, returns, per_reply, loop.beta, o),
                **stats,
                **sampling,
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
                save_checkpoint(accelerator, work_dir, loop.iteration, sharded)
    finally:
        bar.close()
    for tracker in accelerator.trackers:  # not end_training(): it also ends the process group the pipeline still uses
        tracker.finish()

    if sharded:  # gathered to the main process alone, which writes the directory
        sharding.save_full(accelerator, m.policy, m.tok, work_dir, recipe.lora,
                           lambda: apply_lora(load_causal_lm(inputs["model"], m.tok, recipe.model_options), recipe.lora))
    elif accelerator.is_main_process:
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
        "reference": {"copy": "frozen copy of the starting model", "adapters": "policy with adapters disabled",
                      "none": "none (KL coefficient 0)"}[m.reference_kind],
        "reward_sources": ", ".join(f"{m.rewards.weights[n]:g} x {n}" for n in m.rewards.names),
        "resumed_from": Path(resume).name if resume else "",
        **sharding.summary(accelerator, trained_models(m), [m.reference, m.rewards.reward_model], optimizer),
    }
