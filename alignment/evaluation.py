"""Generation, scoring and statistics: what `alignment compare`, the compare stage and the
closing report of every pipeline share (rendering is in `report.py`).

`generate` answers user prompts through the tokenizer's chat template; `gold_scores` grades
the answers with the demo world's exact oracle (`gold_parts` part by part) and
`reward_scores` with a trained reward model; `reply_logprob_sums` is the forward pass behind
KL(model || baseline); `bootstrap_ci`, `paired_bootstrap_diff` and `win_rate` put
confidence intervals on means, differences and win rates. `compare_models` runs all of it
for a few models on the same prompts under the same seed and returns one `Comparison`
(a JSON summary and the side-by-side samples).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from data_prep.read import read_text, split_problem
from tqdm.auto import tqdm

from . import models as model_layer
from .config import DEMO_PROMPTS, DataOptions, GenerationOptions, ModelOptions, PromptOptions
from .errors import RecipeError
from .data import check_rows, load_rows, text_problem
from .demo import world
from .generation import Samples, checkpoint_overrides, decoding, sample, token_logprobs
from .rewards import model_scores
from .templates import render_prompt


@dataclass
class Generation:
    prompt: str  # the user message, before the chat template
    text: str  # the reply, decoded up to (not including) the first EOS
    finished: bool  # True when the model emitted EOS within max_new_tokens
    num_tokens: int  # tokens the model generated, counting the EOS when there is one


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    return generate_with_samples(
        model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        batch_size=batch_size, seed=seed, progress=progress,
    )[0]


def generate_with_samples(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
) -> tuple[list[Generation], list[Samples]]:
    """`generate`, plus the token ids of every batch (on the CPU) for later forward passes."""
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    results: list[Generation] = []
    batches: list[Samples] = []
    try:
        with tqdm(total=len(prompts), desc=desc, disable=not progress) as bar:
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
                batches.append(_to(out, "cpu"))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results, batches


def _to(samples: Samples, device) -> Samples:
    return Samples(**{f.name: getattr(samples, f.name).to(device) for f in fields(Samples)})


def reply_logprob_sums(model, samples: Samples, temperature: float) -> torch.Tensor:
    """(B,) summed log-probability of each sampled reply (its stop token included) under `model`.

    Log-probs are those of softmax(logits / temperature), the distribution the replies were
    sampled from (top-p truncation aside); temperature 0 (greedy) uses the raw logits.
    Padding is masked and positions follow the attention mask, so a row's value does not
    depend on its batch mates.
    """
    s = _to(samples, model.device)
    with torch.no_grad():
        logp = token_logprobs(
            model, s.input_ids, s.attention_mask, s.prompt_ids.shape[1], s.response_mask, temperature or 1.0
        )
    return logp.sum(-1).cpu()


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


GOLD_PARTS = ("polite", "content", "concise")


def gold_parts(generations: list[Generation]) -> dict[str, list[float]]:
    """Part -> score of each reply (polite / content / concise); the parts sum to `gold_scores`."""
    rows = [world.score_parts(g.prompt, g.text, g.finished) for g in generations]
    return {part: [row[part] for row in rows] for part in GOLD_PARTS}


def reward_scores(reward_model, tok, generations: list[Generation], batch_size: int = 64) -> list[float]:
    """The reward model's score of each (prompt, reply) exchange, in the form the reward stage trains
    it on and the RL stages score it (`rewards.model_scores`: the reply's own text, whatever it holds,
    after the rendered prompt; a reply cut off at the length limit left open), `tok` being the reward
    model's tokenizer.

    A decoder classifier pools at the last non-pad token, found through `config.pad_token_id`;
    a mismatch with the tokenizer would read the score at the wrong position, so it is an error.
    """
    if reward_model.config.pad_token_id != tok.pad_token_id:
        raise ValueError(
            f"reward model pad_token_id ({reward_model.config.pad_token_id}) differs from the tokenizer's "
            f"({tok.pad_token_id}); load it with alignment.models.load_classifier"
        )
    was_training = reward_model.training
    reward_model.eval()
    scores: list[float] = []
    try:
        for batch in _batches(generations, batch_size):
            values = model_scores(reward_model, tok, [g.prompt for g in batch], [g.text for g in batch],
                                  [g.finished for g in batch])
            scores.extend(values.tolist())
    finally:
        reward_model.train(was_training)
    return scores


# --------------------------------------------------------------------------- comparing models


class CompareError(RecipeError):
    """Bad input to a comparison; `arg` is the argument (recipe key) it is about."""

    def __init__(self, arg: str, message: str):
        super().__init__(f"{arg}: {message}")
        self.arg, self.message = arg, message


def demo_prompt_source(world_name: str = "default") -> str:
    """What a table calls the demo world's held-out prompts (naming the preset unless default)."""
    return "held-out demo prompts" + ("" if world_name == "default" else f" ({world_name} world)")


def load_prompts(options: PromptOptions, world_name: str = "default") -> tuple[list[str], str]:
    """(prompts, what they are) from the prompt options; a bad source is a CompareError('prompts').
    Demo prompts are the held-out prompts of the world preset `world_name`."""
    source = options.source
    if problem := split_problem(source, options.split):  # a split a file or the demo prompts would ignore
        raise CompareError("split", problem)
    if source == "demo":
        prompts = world.eval_prompts(options.num_prompts or DEMO_PROMPTS, options.seed, world=world_name)
        return prompts, demo_prompt_source(world_name)
    if source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise CompareError("prompts", f"{source}: no such file")
        try:
            lines = read_text(path).rstrip("\n").split("\n")
        except RecipeError as exc:  # not UTF-8, binary, empty: one line naming the file
            raise CompareError("prompts", str(exc)) from None
        for number, line in enumerate(lines, 1):
            if not line.strip() and len(lines) > 1:
                raise CompareError("prompts", f"{source}:{number}: empty line (expected one prompt a line)")
        prompts = lines
    else:
        try:
            found = load_rows(DataOptions(source=source, split=options.split), lambda n, seed: [], 0)
            rows = check_rows(found, text_problem(options.field), "error").rows
        except RecipeError as exc:
            message = str(exc).removeprefix("data.source").lstrip(": ")
            raise CompareError("prompts", message.replace(" (set data.on_bad_row: drop to skip such rows)", "")) from None
        prompts = [row[options.field] for row in rows]
    if not prompts or prompts == [""]:
        raise CompareError("prompts", f"{source}: no prompts (the file is empty)")
    return prompts[: options.num_prompts], f"prompts from {source}"


def has_gold(prompts: list[str]) -> bool:
    """True when every prompt is a demo-world task, which the gold oracle can grade."""
    try:
        for prompt in prompts:
            world.parse_prompt(prompt)
    except ValueError:
        return False
    return True


def _about(label: str, exc: Exception) -> str:
    """The error message, naming the model's label unless it already does (a directory's name)."""
    return str(exc) if label in str(exc) else f"{label}: {exc}"


def per_prompt(values, samples_per_prompt: int) -> np.ndarray:
    """Mean over each prompt's samples (values are prompt-major: p0 s0, p0 s1, ..., p1 s0, ...)."""
    return np.asarray(values, dtype=float).reshape(-1, samples_per_prompt).mean(axis=1)


def win_rate(a, b, samples_per_prompt: int = 1, n_resamples: int = 2000, seed: int = 0) -> dict:
    """How often reply a scores above reply b (the same prompt and sample index); ties count half.

    Returns the win / tie / loss fractions, `win_rate` = win + tie / 2 and its 95% bootstrap
    interval over prompts (each prompt's samples stay together).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs scores of the same replies, got {len(a)} and {len(b)}")
    outcome = (a > b) + 0.5 * (a == b)
    rate, lo, hi = bootstrap_ci(per_prompt(outcome, samples_per_prompt), n_resamples=n_resamples, seed=seed)
    return {
        "win": float((a > b).mean()), "tie": float((a == b).mean()), "loss": float((a < b).mean()),
        "win_rate": rate, "lo": lo, "hi": hi,
    }


@dataclass
class Comparison:
    """What a comparison produced: the summary (JSON; every table and plot is drawn from it)
    and one row per prompt and sample with every model's reply side by side."""

    summary: dict
    samples: list[dict]


def compare_models(
    models: dict[str, str],
    prompts: list[str],
    generation: GenerationOptions,
    *,
    baseline: str,
    reward_model: str | None = None,
    prompt_source: str = "prompts",
    model_options: ModelOptions | None = None,
    progress: bool = True,
) -> Comparison:
    """Every model (label -> path or hub id) answers every prompt under the same seed; replies
    are scored (gold oracle when the prompts are demo tasks, reward model when given) and
    KL(model || baseline) is estimated from each model's own samples.

    Models are loaded one at a time, the baseline last: while it is loaded it scores the
    other models' samples, so no two policies are in memory together.
    """
    if baseline not in models:
        raise CompareError("baseline", f"{baseline!r} is not one of the models ({', '.join(models)})")
    options = model_options or ModelOptions()
    if reward_model is not None:
        try:
            model_layer.check_reward_model(reward_model)
            reward_tok = model_layer.load_reward_tokenizer(reward_model, options)
        except RecipeError as exc:
            raise CompareError("reward_model", str(exc).removeprefix("reward_model: ")) from None
    toks = {}
    for label, path in models.items():
        try:  # config first: a reward model given as a policy would load with a random LM head
            model_layer.check_model_kind(path, "causal-lm", key=label, options=options)
            toks[label] = model_layer.load_tokenizer(path, options)
        except RecipeError as exc:
            raise CompareError("models", _about(label, exc)) from None

    gen = generation
    kl_able = {label: gen.temperature > 0 and model_layer.same_tokenizer(toks[label], toks[baseline]) for label in models}
    notes = []
    if gen.temperature == 0:
        notes.append("KL not estimated: greedy decoding is a deterministic policy (use temperature > 0)")
    for label in models:
        if gen.temperature > 0 and not kl_able[label]:
            notes.append(f"KL not estimated for '{label}': its tokenizer differs from the baseline's "
                         "(replies are compared as decoded text)")
    if gen.temperature > 0 and gen.top_p < 1:
        notes.append(f"KL uses the temperature-{gen.temperature:g} distributions without the top-p cut")

    asked = [p for p in prompts for _ in range(gen.samples_per_prompt)]
    generations, logratio, overridden = _generate_all(models, toks, asked, gen, baseline, kl_able, options, progress)
    rule = "greedy decoding" if gen.temperature == 0 else f"replies drawn from softmax(logits / {gen.temperature:g})"
    if gen.temperature > 0 and gen.top_p < 1:
        rule += f" cut at top-p {gen.top_p:g}"
    for label, settings in overridden.items():
        listed = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        notes.append(f"'{label}': its generation_config's {listed} not applied ({rule}, as for every model)")
    scores = {}
    if has_gold(prompts):
        for label, gens in generations.items():
            parts = gold_parts(gens)
            scores.setdefault("gold", {})[label] = [sum(p) for p in zip(*parts.values())]
            for part, values in parts.items():
                scores.setdefault(part, {})[label] = values
    else:
        notes.append("no gold scores: the prompts are not demo-world tasks")
    if reward_model is not None:
        scorer = model_layer.load_classifier(reward_model, reward_tok, options).to(_device())
        scores["reward"] = {
            label: reward_scores(scorer, reward_tok, gens, batch_size=gen.batch_size) for label, gens in generations.items()
        }
        del scorer
    settings = {
        **gen.model_dump(), "num_prompts": len(prompts), "prompt_source": prompt_source,
        "decoding": decoding(gen.temperature, gen.top_p), "checkpoint_settings_not_applied": overridden,
    }
    summary = summarize(generations, scores, logratio, settings, baseline=baseline, notes=notes)
    for label in models:
        summary["models"][label]["model"] = models[label]
    return Comparison(summary, side_by_side(generations, scores, logratio, gen.samples_per_prompt))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _generate_all(models, toks, asked, gen: GenerationOptions, baseline, kl_able, options, progress):
    """Each model's replies (label -> generations, in `models` order), where KL is estimated
    each reply's summed log-ratio log p_model - log p_baseline (label -> list), and the sampling
    settings of each model's generation_config that were not applied (label -> field -> value)."""
    generations, batches, own, logratio, overridden = {}, {}, {}, {}, {}
    device = _device()
    for label in [m for m in models if m != baseline] + [baseline]:
        tok = toks[label]
        try:
            model = model_layer.load_causal_lm(models[label], tok, options).to(device)
        except RecipeError as exc:
            raise CompareError("models", _about(label, exc)) from None
        if settings := checkpoint_overrides(model, gen.temperature, gen.top_p):
            overridden[label] = settings
        generations[label], batches[label] = generate_with_samples(
            model, tok, asked, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
            batch_size=gen.batch_size, seed=gen.seed, progress=progress, desc=f"generate {label}",
        )
        if label != baseline and kl_able[label]:
            own[label] = torch.cat([reply_logprob_sums(model, b, gen.temperature) for b in batches[label]])
        if label == baseline:  # the last one: it scores the others' replies
            for other in own:
                ref = torch.cat([reply_logprob_sums(model, b, gen.temperature) for b in batches[other]])
                logratio[other] = (own[other] - ref).tolist()
            if kl_able[baseline]:
                logratio[baseline] = [0.0] * len(asked)  # KL of a model to itself
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {label: generations[label] for label in models}, logratio, {m: overridden[m] for m in models if m in overridden}


SCORE_KINDS = ("gold", "reward")


def summarize(
    generations: dict[str, list[Generation]],
    scores: dict[str, dict[str, list[float]]],
    logratio: dict[str, list[float]],
    settings: dict,
    *,
    baseline: str,
    notes: list[str] = (),
) -> dict:
    """The comparison's numbers, from per-reply values (prompt-major, `samples_per_prompt` each).

    scores: kind ('gold', its parts, 'reward') -> label -> one score per reply.
    logratio: label -> summed log pi_model(y) - log pi_baseline(y) per reply, for the labels
    where KL is estimated. Means carry 95% bootstrap intervals over prompts.
    """
    n, seed = settings.get("samples_per_prompt", 1), settings.get("seed", 0)
    labels = list(generations)
    kinds = [k for k in scores if k in SCORE_KINDS]
    parts = [k for k in scores if k in GOLD_PARTS]
    primary = kinds[0] if kinds else None
    per_model = {}
    for label, gens in generations.items():
        lengths = np.array([g.num_tokens for g in gens], dtype=float)
        row = {}
        for kind in [*kinds, *parts]:
            mean, lo, hi = bootstrap_ci(per_prompt(scores[kind][label], n), seed=seed)
            row |= {f"{kind}_mean": mean, f"{kind}_lo": lo, f"{kind}_hi": hi}
        if label in logratio:
            mean, lo, hi = bootstrap_ci(per_prompt(logratio[label], n), seed=seed)
            row |= {"kl_mean": mean, "kl_lo": lo, "kl_hi": hi}
        else:
            row |= {"kl_mean": None, "kl_lo": None, "kl_hi": None}
        row |= {
            "eos_rate": float(np.mean([g.finished for g in gens])),
            "length_mean": float(lengths.mean()),
            "length_median": float(np.median(lengths)),
            "length_p90": float(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
            "length_score_corr": _correlation(lengths, scores[primary][label]) if primary else None,
        }
        per_model[label] = row

    pairs = [(a, baseline) for a in labels if a != baseline]
    pairs += [(a, b) for i, b in enumerate(labels) for a in labels[i + 1 :] if baseline not in (a, b)]
    wins = [
        {"a": a, "b": b, "score": kind, **win_rate(scores[kind][a], scores[kind][b], n, seed=seed)}
        for kind in kinds for a, b in pairs
    ]
    diffs = []
    for kind in kinds:
        for b, a in zip(labels, labels[1:]):
            mean, lo, hi = paired_bootstrap_diff(per_prompt(scores[kind][a], n), per_prompt(scores[kind][b], n), seed=seed)
            diffs.append({"a": a, "b": b, "score": kind, "mean": mean, "lo": lo, "hi": hi})
    return {
        "settings": settings,
        "baseline": baseline,
        "score_kinds": kinds,
        "parts": parts,
        "models": per_model,
        "win_rates": wins,
        "differences": diffs,
        "notes": list(notes),
    }


def _correlation(x, y) -> float | None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def side_by_side(generations, scores, logratio, samples_per_prompt: int) -> list[dict]:
    """One row per prompt and sample index, every model's reply and its scores."""
    labels = list(generations)
    rows = []
    for i, first in enumerate(generations[labels[0]]):
        replies = {}
        for label in labels:
            g = generations[label][i]
            reply = {"text": g.text, "finished": g.finished, "num_tokens": g.num_tokens}
            reply |= {kind: values[label][i] for kind, values in scores.items()}
            if label in logratio:
                reply["logratio"] = logratio[label][i]
            replies[label] = reply
        rows.append({"prompt": first.prompt, "sample": i % samples_per_prompt, "replies": replies})
    return rows
