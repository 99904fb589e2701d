"""On-policy preference pairs (iterative DPO): sample k replies per prompt from a model, score them
with a reward model, Python reward functions or the demo world's gold oracle, keep best vs worst
when the margin clears a threshold.

Generation and scoring are the toolkit's (`alignment.evaluation.generate`, `reward_scores`,
`gold_scores`, and `alignment.rewards` for reward functions, called as the RL stages call them):
batched, left-padded, seeded, with a progress bar. The pairs come out as rows of the explicit shape
with scores, and go through the same cleaning and accounting as any other source (a prompt whose
samples do not clear the margin is a counted drop). They are marked `generated`: a sampled reply
may be empty (the model stopped at once), and such a reply is kept, since a pair whose worst reply is
empty teaches the model not to stop before answering.
"""

from __future__ import annotations

from .read import Bad, DataError, read_source
from .shapes import _prompt


def read_prompts(source: str, column: str, limit: int | None, seed: int, world_name: str = "default",
                 columns: dict | None = None) -> list[tuple[str, str | Bad]]:
    """(origin, user prompt or Bad) from a file of prompts, or 'demo' (the training prompts of the demo
    world's preset `world_name`). `columns`, when given, receives origin -> the row's other fields, which
    reward functions are given (a reference answer, test cases...), as the RL stages give them."""
    if source == "demo":
        from alignment.demo import world

        convs = world.sft_conversations(limit or 200, seed, world=world_name)
        return [(f"demo prompt {i + 1}", c["messages"][0]["content"]) for i, c in enumerate(convs)]
    found = []
    seen: set[str] = set()  # the columns of the rows read
    for origin, row in read_source(source):
        if limit is not None and len(found) >= limit:
            break
        if isinstance(row, Bad):
            found.append((origin, row))
            continue
        seen.update(row)
        prompt = _prompt(row, column)
        if isinstance(prompt, str):
            found.append((origin, Bad(prompt)))
        elif len(prompt) != 1:
            found.append((origin, Bad("multi-turn prompt (on-policy sampling takes one user turn)")))
        else:
            found.append((origin, prompt[0]["content"]))
            if columns is not None:
                columns[origin] = {k: v for k, v in row.items() if k != column}
    if seen and column not in seen:  # a column no row has is a wrong name, not rows to count as dropped
        raise DataError(f"{source}: no column {column!r} in its rows (columns: {', '.join(sorted(seen))}); "
                        "name the prompt column with --prompt-column (a recipe: data.prompt_field)")
    return found


def sample_and_score(
    prompts: list[str],
    model_path: str,
    *,
    k: int,
    reward_model: str | None,
    reward_fn: list[str] = (),
    reward_weights: list[float] | None = None,
    columns: list[dict] | None = None,
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
    (seeded, batched: `alignment.evaluation.generate`). With `reward_fn`, the functions score (and the
    reward model too when given), summed with `reward_weights`, each function given `columns` (one dict
    of fields per prompt); else the reward model; with neither, the demo gold oracle, and prompts that
    are not demo-world tasks are a DataError.

    `stats`, when given, receives `samples` (how many), `mean_score`, and with `kl_model` `kl`: the
    mean over replies of their summed log-ratio log p_model - log p_kl_model (an estimate of
    KL(model || kl_model) on the model's own samples, under the sampling temperature)."""
    from alignment import evaluation, models
    from alignment.rewards import load_function, reply_ids, source_weights

    if reward_model is None and not reward_fn and not evaluation.has_gold(prompts):
        raise DataError("the gold oracle (--oracle, scorer: oracle) grades demo-world prompts only; "
                        "these are not: score with a reward model or reward functions")
    functions = {ref: load_function(ref) for ref in reward_fn}  # a bad one is refused before any sampling
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
    if reward_model is None and not reward_fn:
        scores = evaluation.gold_scores(gens)
    else:
        if reward_model is not None:
            rm_tok = models.load_reward_tokenizer(reward_model)
            scores = evaluation.reward_scores(models.load_classifier(reward_model, rm_tok), rm_tok, gens, batch_size=batch_size)
        if reward_fn:
            ids = [reply for b in batches for reply in reply_ids(b.response_ids, b.response_mask, b.finished)]
            weights = source_weights(reward_model is not None, reward_fn, reward_weights)
            per_prompt = columns if columns is not None else [{}] * len(prompts)
            scores = summed_scores(gens, ids, [c for c in per_prompt for _ in range(k)], functions, weights,
                                     scores if reward_model is not None else None, batch_size)
    if stats is not None:
        stats.update(samples=len(scores), mean_score=sum(scores) / len(scores) if scores else float("nan"),
                     **({"kl": kl} if kl is not None else {}))
    return [list(zip(scores[i * k : (i + 1) * k], (g.text for g in gens[i * k : (i + 1) * k]))) for i in range(len(prompts))]


def summed_scores(gens, ids: list[list[int]], columns: list[dict], functions: dict, weights: dict,
                    model_scores: list[float] | None, batch_size: int) -> list[float]:
    """Each reply's weighted sum of its reward sources, as the RL stages sum them (`alignment.rewards`):
    the functions are called once per batch of `batch_size` replies, in TRL's calling convention, with
    `columns` (each reply's prompt-row fields) as keyword lists; `model_scores`, when given, are the
    reward model's, weighed as 'reward_model'. A function's None adds nothing to that reply."""
    import torch

    from alignment import rewards

    totals: list[float] = []
    for start in range(0, len(gens), batch_size):
        end = start + batch_size
        batch, rows = gens[start:end], columns[start:end]
        fields = {k: [row.get(k) for row in rows] for k in dict.fromkeys(k for row in rows for k in row)}
        offered = rewards.offered_batch([g.prompt for g in batch], [g.text for g in batch], ids[start:end],
                                        [g.finished for g in batch], fields)
        per_source = rewards.function_scores(functions, offered, with_model=model_scores is not None)
        if model_scores is not None:
            per_source = {"reward_model": torch.tensor(model_scores[start:end], dtype=torch.float32), **per_source}
        totals += rewards.weighted_sum(per_source, weights).tolist()
    return totals


def onpolicy_rows(
    prompts: list[tuple[str, str | Bad]],
    model_path: str,
    *,
    k: int,
    reward_model: str | None,
    min_margin: float,
    columns: dict | None = None,
    **sampling,
) -> list[tuple[str, dict | Bad]]:
    """Rows of the explicit shape (prompt, chosen, rejected, score_chosen, score_rejected, generated), one
    per prompt, or a Bad with the reason the prompt gave no pair. No reward model and no reward_fn: the
    demo gold oracle scores. `columns`: origin -> the prompt row's other fields (`read_prompts`), for
    reward functions. `sampling`: sample_and_score's reward_fn, reward_weights, temperature, top_p,
    max_new_tokens, batch_size, seed, progress."""
    good = [(o, p) for o, p in prompts if not isinstance(p, Bad)]
    groups = sample_and_score([p for _, p in good], model_path, k=k, reward_model=reward_model,
                              columns=[(columns or {}).get(o, {}) for o, _ in good], **sampling)
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
                "score_chosen": best[0], "score_rejected": worst[0], "generated": True,
            }
    return [(o, p if isinstance(p, Bad) else made[o]) for o, p in prompts]


def rated_rows(prompts: list[tuple[str, str | Bad]], model_path: str, *, k: int, reward_model: str | None,
               columns: dict | None = None, **sampling) -> list[tuple[str, dict | Bad]]:
    """Rows of the rated shape (prompt, completions, ratings, generated): each prompt's k samples and their
    scores, for data_prep's rules to make pairs (best vs worst) or binary rows (by a threshold) of; a Bad
    stays. `columns` and `sampling` as for onpolicy_rows."""
    good = [(o, p) for o, p in prompts if not isinstance(p, Bad)]
    groups = sample_and_score([p for _, p in good], model_path, k=k, reward_model=reward_model,
                              columns=[(columns or {}).get(o, {}) for o, _ in good], **sampling)
    made = {o: {"prompt": p, "completions": [t for _, t in g], "ratings": [s for s, _ in g], "generated": True}
            for (o, p), g in zip(good, groups)}
    return [(o, p if isinstance(p, Bad) else made[o]) for o, p in prompts]
