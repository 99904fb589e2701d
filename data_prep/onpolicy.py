"""On-policy preference pairs (iterative DPO): sample k replies per prompt from a model, score them
with a reward model or the demo world's gold oracle, keep best vs worst when the margin clears
a threshold.

Generation and scoring are the toolkit's (`alignment.evaluation.generate`, `reward_scores`,
`gold_scores`): batched, left-padded, seeded, with a progress bar. The pairs come out as rows
of the explicit shape with scores, and go through the same cleaning and accounting as any
other source (a prompt whose samples do not clear the margin is a counted drop).
"""

from __future__ import annotations

from .read import Bad, DataError, read_source
from .shapes import _prompt


def read_prompts(source: str, column: str, limit: int | None, seed: int,
                 world_name: str = "default") -> list[tuple[str, str | Bad]]:
    """(origin, user prompt or Bad) from a file of prompts, or 'demo' (the training prompts of the demo
    world's preset `world_name`)."""
    if source == "demo":
        from alignment.demo import world

        convs = world.sft_conversations(limit or 200, seed, world=world_name)
        return [(f"demo prompt {i + 1}", c["messages"][0]["content"]) for i, c in enumerate(convs)]
    found = []
    for origin, row in read_source(source):
        if limit is not None and len(found) >= limit:
            break
        if isinstance(row, Bad):
            found.append((origin, row))
            continue
        prompt = _prompt(row, column)
        if isinstance(prompt, str):
            found.append((origin, Bad(prompt)))
        elif len(prompt) != 1:
            found.append((origin, Bad("multi-turn prompt (on-policy sampling takes one user turn)")))
        else:
            found.append((origin, prompt[0]["content"]))
    return found


def sample_and_score(
    prompts: list[str],
    model_path: str,
    *,
    k: int,
    reward_model: str | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    kl_model: str | None = None,
    stats: dict | None = None,
) -> list[list[tuple[float, str]]]:
    """For each user prompt, its k samples from `model_path` as (score, text), in sampling order
    (seeded, batched: `alignment.evaluation.generate`). No reward model: the demo gold oracle scores,
    and prompts that are not demo-world tasks are a DataError.

    `stats`, when given, receives `samples` (how many), `mean_score`, and with `kl_model` `kl`: the
    mean over replies of their summed log-ratio log p_model - log p_kl_model (an estimate of
    KL(model || kl_model) on the model's own samples, under the sampling temperature)."""
    from alignment import evaluation, models

    if reward_model is None and not evaluation.has_gold(prompts):
        raise DataError("the gold oracle (--oracle, scorer: oracle) grades demo-world prompts only; "
                        "these are not: score with a reward model")
    tok = models.load_tokenizer(model_path)
    policy = models.load_causal_lm(model_path, tok)
    asked = [p for p in prompts for _ in range(k)]
    gens, batches = evaluation.generate_with_samples(
        policy, tok, asked, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        batch_size=batch_size, seed=seed, progress=progress, desc="sample",
    )
    kl = None
    if kl_model is not None and gens:
        import torch

        ref = models.load_causal_lm(kl_model, tok)
        ratios = [evaluation.reply_logprob_sums(policy, b, temperature) - evaluation.reply_logprob_sums(ref, b, temperature)
                  for b in batches]
        kl = float(torch.cat(ratios).mean())
        del ref
    del policy
    if reward_model is None:
        scores = evaluation.gold_scores(gens)
    else:
        rm_tok = models.load_reward_tokenizer(reward_model)
        scores = evaluation.reward_scores(models.load_classifier(reward_model, rm_tok), rm_tok, gens, batch_size=batch_size)
    if stats is not None:
        stats.update(samples=len(scores), mean_score=sum(scores) / len(scores) if scores else float("nan"),
                     **({"kl": kl} if kl is not None else {}))
    return [list(zip(scores[i * k : (i + 1) * k], (g.text for g in gens[i * k : (i + 1) * k]))) for i in range(len(prompts))]


def onpolicy_rows(
    prompts: list[tuple[str, str | Bad]],
    model_path: str,
    *,
    k: int,
    reward_model: str | None,
    min_margin: float,
    **sampling,
) -> list[tuple[str, dict | Bad]]:
    """Rows of the explicit shape (prompt, chosen, rejected, score_chosen, score_rejected), one per prompt,
    or a Bad with the reason the prompt gave no pair. No reward model: the demo gold oracle scores.
    `sampling`: sample_and_score's temperature, top_p, max_new_tokens, batch_size, seed, progress."""
    good = [(o, p) for o, p in prompts if not isinstance(p, Bad)]
    groups = sample_and_score([p for _, p in good], model_path, k=k, reward_model=reward_model, **sampling)
    made: dict[str, dict | Bad] = {}
    for (origin, prompt), group in zip(good, groups):
        best = max(group, key=lambda s: s[0])
        worst = min(group, key=lambda s: s[0])
        if best[0] == worst[0]:
            made[origin] = Bad("all samples scored the same")
        elif best[0] - worst[0] < min_margin:
            made[origin] = Bad("score margin below min_margin")
        else:
            made[origin] = {
                "prompt": prompt, "chosen": best[1], "rejected": worst[1],
                "score_chosen": best[0], "score_rejected": worst[0],
            }
    return [(o, p if isinstance(p, Bad) else made[o]) for o, p in prompts]


def rated_rows(prompts: list[tuple[str, str | Bad]], model_path: str, *, k: int, reward_model: str | None,
               **sampling) -> list[tuple[str, dict | Bad]]:
    """Rows of the rated shape (prompt, completions, ratings): each prompt's k samples and their scores,
    for data_prep's rules to make pairs (best vs worst) or binary rows (by a threshold) of; a Bad stays."""
    good = [(o, p) for o, p in prompts if not isinstance(p, Bad)]
    groups = sample_and_score([p for _, p in good], model_path, k=k, reward_model=reward_model, **sampling)
    made = {o: {"prompt": p, "completions": [t for _, t in g], "ratings": [s for s, _ in g]}
            for (o, p), g in zip(good, groups)}
    return [(o, p if isinstance(p, Bad) else made[o]) for o, p in prompts]
