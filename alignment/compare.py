"""Generation and scoring: what the end-of-pipeline report and `alignment compare` share.

`generate` answers user prompts through the tokenizer's chat template; `gold_scores` grades
the answers with the demo world's exact oracle and `reward_scores` with a trained reward
model; `bootstrap_ci` and `paired_bootstrap_diff` put confidence intervals on the means;
`evaluate` runs all of it for a few model directories and `gold_table` prints the result.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import models as model_layer
from .demo import world
from .generation import sample


@dataclass
class Generation:
    prompt: str  # the user message, before the chat template
    text: str  # the reply, decoded up to (not including) the first EOS
    finished: bool  # True when the model emitted EOS within max_new_tokens
    num_tokens: int  # tokens the model generated, counting the EOS when there is one


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def render_prompt(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def render_exchange(tok, prompt: str, response: str) -> str:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tok.apply_chat_template(messages, tokenize=False)


def generate(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[Generation]:
    """Answer each user prompt through the chat template; temperature 0 is greedy, otherwise
    sampling (no top-k; nucleus when top_p < 1). Same seed, same replies.

    Batches are left-padded (see `generation.sample`), so under greedy decoding a reply does
    not depend on its batch mates.
    """
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    results: list[Generation] = []
    try:
        with tqdm(total=len(prompts), desc="generate", disable=not progress) as bar:
            for batch in _batches(list(prompts), batch_size):
                out = sample(
                    model, tok, [render_prompt(tok, p) for p in batch],
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                )
                lengths = out.response_mask.sum(-1).tolist()
                for i, prompt in enumerate(batch):
                    finished = bool(out.finished[i])
                    text = tok.decode(out.response_ids[i, : lengths[i] - finished].tolist(), skip_special_tokens=True)
                    results.append(Generation(prompt, text, finished, lengths[i]))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results


def bootstrap_ci(values, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and a percentile bootstrap interval of level 1 - alpha."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("bootstrap_ci needs a non-empty list of numbers")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    means = values[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(values.mean()), float(lo), float(hi)


def paired_bootstrap_diff(a, b, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean of a - b, lo, hi) for scores of two models on the same prompts, in the same order.

    Resampling prompts (the same indices for both models) is the bootstrap of the per-prompt
    differences, which removes the prompt-to-prompt variance the two models share.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have the same length, got {len(a)} and {len(b)}")
    return bootstrap_ci(a - b, n_resamples=n_resamples, seed=seed, alpha=alpha)


def gold_scores(generations: list[Generation]) -> list[float]:
    return [world.gold_score(g.prompt, g.text, g.finished) for g in generations]


def reward_scores(reward_model, tok, generations: list[Generation], batch_size: int = 64) -> list[float]:
    """The reward model's score of each (prompt, reply) exchange, rendered by the chat template.

    The classifier pools at the last non-pad token, found through `config.pad_token_id`;
    a mismatch with the tokenizer would read the score at the wrong position, so it is an error.
    """
    if reward_model.config.pad_token_id != tok.pad_token_id:
        raise ValueError(
            f"reward model pad_token_id ({reward_model.config.pad_token_id}) differs from the tokenizer's "
            f"({tok.pad_token_id}); load it with alignment.models.load_classifier"
        )
    was_training, old_side = reward_model.training, tok.padding_side
    reward_model.eval()
    tok.padding_side = "right"
    scores: list[float] = []
    try:
        with torch.no_grad():
            for batch in _batches(generations, batch_size):
                texts = [render_exchange(tok, g.prompt, g.text) for g in batch]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(reward_model.device)
                logits = reward_model(**enc).logits
                scores.extend(logits[:, 0].float().tolist())
    finally:
        tok.padding_side = old_side
        reward_model.train(was_training)
    return scores


def evaluate(
    models: dict[str, str],
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, dict]:
    """Generate with each model directory (name -> path) on the same prompts; grade with the gold oracle."""
    results = {}
    for name, path in models.items():
        tok = model_layer.load_tokenizer(path)
        model = model_layer.load_causal_lm(path, tok)
        gens = generate(
            model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size, seed=seed,
        )
        scores = gold_scores(gens)
        mean, lo, hi = bootstrap_ci(scores, seed=seed)
        results[name] = {
            "gold_mean": mean,
            "gold_lo": lo,
            "gold_hi": hi,
            "eos_rate": sum(g.finished for g in gens) / len(gens),
            "scores": scores,
            "generations": gens,
        }
        del model
        gc.collect()
    return results


def gold_table(results: dict, baseline_order: list[str]) -> str:
    """Rows in `baseline_order`, then each model's paired gain over the one before it."""
    rows = [("model", "gold [95% CI]", "EOS rate")]
    for name in baseline_order:
        r = results[name]
        rows.append((name, f"{r['gold_mean']:.3f} [{r['gold_lo']:.3f}, {r['gold_hi']:.3f}]", f"{r['eos_rate']:.0%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]

    for prev, cur in zip(baseline_order, baseline_order[1:]):
        if [g.prompt for g in results[cur]["generations"]] != [g.prompt for g in results[prev]["generations"]]:
            raise ValueError(f"'{cur}' and '{prev}' were evaluated on different prompts; cannot pair them")
        diff, lo, hi = paired_bootstrap_diff(results[cur]["scores"], results[prev]["scores"])
        lines.append(f"{cur} - {prev}: {diff:+.3f} [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)
