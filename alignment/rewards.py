"""Reward sources of the RL stages (ppo, grpo, rloo) and of on-policy sampling (online DPO's rounds,
prep's `samples` with scorer 'reward_fn'), behind one call.

A recipe names one or more sources, summed with `reward_weights`:
- `reward_model`: a one-label sequence classifier, given prompt + reply in the form it was trained on
  (`templates.reward_ids`: the reply's text after the rendered prompt, the template's turn-closing
  text after a finished reply) and scored by its own forward (its own pooling);
- `reward_fn`: Python functions, 'file.py:name' or 'package.module:name', called once per batch as
  `name(prompts=[...], completions=[...], **columns)` and returning one number per reply, where
  `columns` are the prompt rows' other fields (a reference answer, test cases...). That is the
  calling convention of TRL's GRPO reward functions, so those work unchanged; a function is given
  only the keywords its signature names (all of them when it takes **kwargs). Also offered:
  `completion_ids` (token ids of each reply), `finished` (the reply ended with EOS) and `replies`
  (the same as completions);
- `gold`: the demo world's gold oracle.

A function may return None for a reply it does not apply to (TRL's convention): that source then
adds nothing to the reply's score (a NaN-aware weighted sum over the sources, as TRL 1.16's
GRPOTrainer sums its functions) and is left out of its `rewards/<name>` mean. A reply that no
source scores is refused. Everything else a function does wrong (raises, returns the wrong count, a
non-number, NaN or inf) is a one-line RecipeError naming the function and the prompt.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from . import user_functions
from .errors import RecipeError
from .demo import world
from .templates import reward_batch


def gold(prompts: list[str], completions: list[str], finished: list[bool], **_) -> list[float]:
    """The demo world's gold oracle (polite 0.25, right content 0.5, concise stop 0.25)."""
    out = []
    for i, (prompt, reply, done) in enumerate(zip(prompts, completions, finished)):
        try:
            out.append(world.gold_score(prompt, reply, done))
        except ValueError:
            raise RecipeError(
                f"reward_fn 'gold': prompt {i} ({prompt[:60]!r}) is not a demo-world prompt; the gold oracle "
                "grades demo prompts only"
            ) from None
    return out


BUILTIN = {"gold": gold}


def load_function(ref: str) -> Callable:
    """The function a `reward_fn` entry names (a built-in, or `user_functions.load_function`'s); a one-line
    RecipeError when it cannot be had."""
    return BUILTIN[ref] if ref in BUILTIN else user_functions.load_function(ref, "reward_fn")


def _accepted(fn: Callable, offered: dict) -> dict:
    """The keywords of `offered` that `fn` takes (all of them if it takes **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return offered
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in names}


def call_function(ref: str, fn: Callable, offered: dict) -> torch.Tensor:
    """Call `fn` on a batch and check what comes back: one finite number (or None: not applicable, kept
    as NaN) per reply."""
    prompts = offered["prompts"]
    n = len(prompts)
    try:
        out = fn(**_accepted(fn, offered))
    except RecipeError:
        raise
    except Exception as exc:
        raise RecipeError(f"reward_fn {ref!r} raised {type(exc).__name__}: {exc} ({_first_failing(fn, offered)})") from None
    try:
        if isinstance(out, (str, bytes)):
            raise TypeError
        values = list(out)
    except TypeError:
        raise RecipeError(f"reward_fn {ref!r} returned {type(out).__name__}; expected a list of {n} numbers") from None
    if len(values) != n:
        raise RecipeError(f"reward_fn {ref!r} returned {len(values)} values for {n} replies; expected one per reply")
    for i, value in enumerate(values):
        if value is None:  # not applicable to this reply (TRL's convention)
            values[i] = math.nan
            continue
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise RecipeError(
                f"reward_fn {ref!r} returned {value!r} for prompt {i} ({prompts[i][:60]!r}); expected a finite number"
            )
        values[i] = float(number)
    return torch.tensor(values, dtype=torch.float32)


def _first_failing(fn: Callable, offered: dict) -> str:
    """'on prompt i (...)': the first row that raises on its own, found by calling row by row."""
    n = len(offered["prompts"])
    for i in range(n):
        one = {k: v[i : i + 1] if isinstance(v, list) and len(v) == n else v for k, v in offered.items()}
        try:
            fn(**_accepted(fn, one))
        except Exception:
            return f"on prompt {i}: {offered['prompts'][i][:60]!r}"
    return "on the whole batch; every prompt alone passes"


def source_weights(has_model: bool, refs: list[str], weights: list[float] | None) -> dict[str, float]:
    """Source name -> weight, in the order `reward_weights` gives them: 'reward_model' first when there
    is one, then each function. No weights: all 1."""
    names = (["reward_model"] if has_model else []) + list(refs)
    return dict(zip(names, weights or [1.0] * len(names)))


def offered_batch(prompts: list[str], replies: list[str], ids: list[list[int]], finished: list[bool],
                  columns: dict[str, list]) -> dict:
    """What a reward function may ask for, one entry per reply: `columns` (the prompt rows' other
    fields) and the reply in its forms."""
    return {**columns, "prompts": prompts, "completions": replies, "replies": replies, "completion_ids": ids,
            "finished": finished}


def function_scores(functions: dict[str, Callable], offered: dict, with_model: bool) -> dict[str, torch.Tensor]:
    """Each function's scores of the batch (`call_function`; None is NaN). Without a reward model
    scoring beside them (`with_model`), a reply that no function applies to is refused: it would have
    no score at all."""
    out = {ref: call_function(ref, fn, offered) for ref, fn in functions.items()}
    if functions and not with_model:
        unscored = torch.stack(list(out.values())).isnan().all(0).nonzero()
        if len(unscored):
            i = int(unscored[0])
            prompt = offered["prompts"][i]
            raise RecipeError(
                f"reward_fn: every function returned None for prompt {i} ({prompt[:60]!r}); None means 'not "
                "applicable', and each reply needs a score from at least one reward source"
            )
    return out


def weighted_sum(per_source: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum of the sources, NaN-aware: a source's None (NaN) adds 0 to that reply, as
    TRL's GRPOTrainer sums its reward functions (nansum). Sources without a weight (the overlong
    shaping) weigh 1."""
    return sum(weights.get(name, 1.0) * value.nan_to_num(0.0) for name, value in per_source.items())


def reply_ids(response_ids, response_mask, finished) -> list[list[int]]:
    """Each sampled reply's token ids before its stop token (what reward functions get as completion_ids)."""
    lengths = (response_mask.sum(-1) - finished.long()).tolist()
    return [response_ids[i, :n].tolist() for i, n in enumerate(lengths)]


class Rewards:
    """The recipe's reward sources. `scores(...)` gives each source's raw scores; `total(...)` their
    weighted sum."""

    def __init__(self, recipe, reward_model, tok, reward_tok):
        self.reward_model = reward_model  # a frozen one-label classifier, or None
        self.tok, self.reward_tok = tok, reward_tok  # the policy's tokenizer, the reward model's
        self.prompt_field = recipe.data.prompt_field
        self.functions = {ref: load_function(ref) for ref in recipe.reward_fn}
        self.weights = source_weights(reward_model is not None, recipe.reward_fn, recipe.reward_weights)
        self.names = list(self.weights)

    def scores(self, prompts: list[str], rows: list[dict], input_ids, attention_mask, response_ids, response_mask,
               finished, which: str = "all") -> dict[str, torch.Tensor]:
        """Each source's score of each reply (B,), on the device of `input_ids`. `prompts` are the user
        prompts, `rows` their data rows; the tensors are prompt + reply as sampled (reply: everything
        after its first EOS masked). `which`: 'model' (the reward model only, for a chunk of the batch),
        'functions' (the Python functions only, called once on the whole batch) or 'all'. A function's
        None is NaN here; with 'functions' or 'all', a reply that no source can score is refused."""
        ids = reply_ids(response_ids, response_mask, finished)
        replies = self.tok.batch_decode(ids, skip_special_tokens=True)
        out = {}
        if self.reward_model is not None and which != "functions":
            scores = model_scores(self.reward_model, self.reward_tok, prompts, replies, finished.tolist())
            out["reward_model"] = scores.to(input_ids.device)
        if which == "model":
            return out
        columns = {k: [row.get(k) for row in rows] for k in (rows[0] if rows else {}) if k != self.prompt_field}
        offered = offered_batch(prompts, replies, ids, finished.tolist(), columns)
        scored = function_scores(self.functions, offered, with_model=self.reward_model is not None)
        out.update({ref: value.to(input_ids.device) for ref, value in scored.items()})
        return out

    def total(self, per_source: dict[str, torch.Tensor]) -> torch.Tensor:
        """`weighted_sum` with the recipe's weights."""
        return weighted_sum(per_source, self.weights)


def model_scores(model, tok, prompts: list, replies: list[str], finished: list[bool]) -> torch.Tensor:
    """A reward model's score of each exchange (B,), float32 on the model's device: prompt and
    reply given as `templates.reward_batch` builds them with the reward model's tokenizer `tok`
    (the reply's own text; the template's turn-closing text after a finished reply, none after one
    cut off at the length limit), through the model's own forward, so its own pooling reads it
    (the last real token for decoder classifiers, [CLS]/<s> for DeBERTa/RoBERTa ones): where the
    reward stage trained it."""
    enc = reward_batch(tok, prompts, replies, finished)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
    return logits[:, 0].float()
