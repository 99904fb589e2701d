"""Batched sampling and the forward pass over sampled text: what PPO rollouts, `alignment
compare`, the closing report and on-policy preference pairs share.

`sample` answers a batch of already-rendered prompts (left-padded, KV cache) and returns the
token ids and masks, so that callers can score or train on exactly what was sampled.
`position_ids` gives the positions a left-padded row must use in any later forward pass, so
that padding never changes a row's logits. `token_logprobs` is the one forward pass behind
every per-token log-prob (PPO's old, new and reference log-probs, compare's KL): it applies
the LM head in chunks, so the (batch, length, vocab) logits never exist at once.

Rows that share a prompt (GRPO's and RLOO's groups: one prompt, several replies) run it once:
`sample` and `token_logprobs` compute the distinct prompts' keys and values, hand each row its
prompt's (`shared_prompt_cache`), and run only the rows' own tokens on top; with gradients too,
each prompt's share of every reply's gradient flows back into its one pass. The same values as
one pass per row, up to float rounding.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig

from . import losses
from .errors import RecipeError
from .templates import encode

logger = logging.getLogger(__name__)

# Reply tokens whose logits `token_logprobs` holds at once. Log-softmax, gather, entropy and
# their gradients hold up to ~7 float32 copies of a chunk's logits: with 512 tokens, 0.2 GB per
# copy at a 152k vocabulary (measured on a CPU at vocabulary 49k, 4 x 512 reply tokens, forward
# and backward: peak RSS 3.5 GB unchunked, 0.8 GB at 512, 0.47 GB at 256).
LOGPROB_CHUNK_TOKENS = 512


@dataclass
class Samples:
    """A batch of sampled replies, as tensors on the model's device.

    prompt_ids / prompt_mask: (B, P) left-padded prompts and their attention mask.
    response_ids: (B, R) sampled tokens; everything after the first stop token is pad.
    response_mask: (B, R) 1 for the reply's real tokens, the first stop token included.
    finished: (B,) True where the reply ended with a stop token within the length limit.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and reply side by side: (B, P + R)."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def stop_ids(model, tok) -> list[int]:
    """The tokenizer's EOS plus any EOS ids in the model's generation config (Qwen lists two)."""
    ids = {tok.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update([config_eos] if isinstance(config_eos, int) else config_eos)
    return sorted(ids)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: a left-padded row starts at 0 where its text starts."""
    return (attention_mask.cumsum(-1) - attention_mask).clamp(min=0)


def cache_keyword(model) -> str:
    """The name the model's forward takes its KV cache under (transformers 5.2x renamed
    `past_key_values` to `cache`; the outputs carry it under the same name)."""
    return "cache" if "cache" in inspect.signature(base_lm(model).forward).parameters else "past_key_values"


def shared_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int):
    """(cache, hidden, inverse) when some rows share their first `width` tokens (ids and mask), else
    None: the distinct prefixes run through `model` once, `cache` holds each row's prefix keys and
    values (ready for the rows' remaining tokens), `hidden` the trunk's last hidden state at each
    distinct prefix's last position (None when no trunk is found) and `inverse` maps each row to
    its prefix. Not with models whose layers drop the cache (activation checkpointing while
    training) or keep no per-token cache (linear attention), nor across DDP's forward: the prefix
    runs through the wrapped module, its gradients reach DDP's all-reduce with the rows' pass."""
    lm = base_lm(model)
    if width < 1 or getattr(lm.config, "is_encoder_decoder", False):
        return None
    if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) and m.training for m in lm.modules()):
        return None
    prefixes = torch.cat([input_ids[:, :width], attention_mask[:, :width].to(input_ids.dtype)], 1)
    unique, inverse = torch.unique(prefixes, dim=0, return_inverse=True)
    if unique.shape[0] == input_ids.shape[0]:
        return None
    ids, mask = unique[:, :width], unique[:, width:].to(attention_mask.dtype)
    parts = _trunk_and_head(model)
    seen = {}
    handle = parts[0].register_forward_hook(lambda module, args, output: seen.update(hidden=_hidden_of(output))) if parts else None
    keyword = cache_keyword(model)
    runner = model.module if isinstance(model, DistributedDataParallel) else model
    try:
        out = runner(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
    finally:
        if handle is not None:
            handle.remove()
    cache = getattr(out, keyword, None)
    if cache is None or not hasattr(cache, "batch_select_indices") or any(getattr(cache, "is_linear", None) or []):
        return None
    cache.batch_select_indices(inverse)
    hidden = seen["hidden"][:, -1:] if "hidden" in seen else None
    return cache, hidden, inverse


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def truncate_after_stop(response_ids: torch.Tensor, stops: list[int], pad_id: int):
    """(ids, mask, finished): tokens after the first stop token become pad, the stop token stays."""
    is_stop = torch.isin(response_ids, torch.tensor(stops, device=response_ids.device))
    # number of stop tokens strictly before each position: > 0 means the reply already ended
    before = is_stop.long().cumsum(-1) - is_stop.long()
    mask = (before == 0).long()
    return response_ids.masked_fill(mask == 0, pad_id), mask, is_stop.any(-1)


# Generation-config fields that say nothing about which token is drawn: a checkpoint keeps these.
NOT_DECODING = (
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
    "max_time", "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
    "disable_compile", "prefill_chunk_size", "return_dict_in_generate", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits",
)
_told: set = set()  # overrides already logged, so that each is said once


def decoding(temperature: float, top_p: float = 1.0) -> dict:
    """The decoding rule `sample` uses: greedy at temperature 0, otherwise plain sampling from
    softmax(logits / temperature), no top-k, nucleus only when top_p < 1."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    return {"do_sample": False}


def base_lm(model):
    """The transformers model inside DDP and peft wrappers: the one whose `generate` runs."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_overrides(model, temperature: float, top_p: float = 1.0) -> dict:
    """The settings of the checkpoint's own generation config that `sample` does not apply
    (field -> the checkpoint's value): everything about decoding that differs from `decoding`,
    e.g. repetition_penalty, no_repeat_ngram_size, top_k, min_p, suppress_tokens."""
    config = getattr(base_lm(model), "generation_config", None)
    if config is None:
        return {}
    used = decoding(temperature, top_p)
    own = json.loads(config.to_json_string(use_diff=True))  # as saved: JSON values only
    return {
        k: v for k, v in sorted(own.items())
        if k not in NOT_DECODING and k not in ("transformers_version", "_from_model_config") and used.get(k) != v
    }


def _clean_generation_config(config: GenerationConfig | None) -> GenerationConfig:
    """A generation config holding only the checkpoint's token ids and cache settings."""
    kept = {k: getattr(config, k, None) for k in NOT_DECODING} if config is not None else {}
    return GenerationConfig(**{k: v for k, v in kept.items() if v is not None})


def sample(
    model,
    tok,
    texts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Samples:
    """Answer rendered prompts `texts` in one batch; temperature 0 is greedy, otherwise plain
    sampling at `temperature` (no top-k; nucleus if top_p < 1). Seed torch before calling for
    reproducible samples.

    Replies are drawn exactly from softmax(logits / temperature), the distribution the log-probs
    assume: the checkpoint's own generation config is set aside during `generate` (transformers
    would otherwise fill every unset field from it, e.g. a repetition penalty or
    no_repeat_ngram_size), and what it would have changed is logged once (`checkpoint_overrides`).
    No position ids are passed to `generate`: it derives them from the attention mask.
    """
    stops = stop_ids(model, tok)
    overridden = checkpoint_overrides(model, temperature, top_p)
    told = (getattr(base_lm(model).config, "name_or_path", ""), repr(overridden))
    if overridden and told not in _told:
        _told.add(told)
        settings = ", ".join(f"{k}={v!r}" for k, v in overridden.items())
        logger.warning("sampling from softmax(logits / T) only: the checkpoint's generation config settings %s "
                       "are not applied", settings)
    distinct = {text: i for i, text in enumerate(dict.fromkeys(texts))}  # a prompt asked for G replies: tokenised once
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:  # as SFT tokenised them: exactly one BOS (templates.encode), left-padded
        enc = tok.pad({"input_ids": [encode(tok, text) for text in distinct]}, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    rows = torch.tensor([distinct[text] for text in texts], dtype=torch.long)
    enc = {k: enc[k][rows].to(model.device) for k in ("input_ids", "attention_mask")}
    lm = base_lm(model)
    own_config = lm.generation_config
    lm.generation_config = _clean_generation_config(own_config)
    try:
        with torch.no_grad():
            # prompts asked for several replies run once; generate then starts from their cache
            shared = None if getattr(own_config, "cache_implementation", None) else shared_prompt_cache(
                model, enc["input_ids"], enc["attention_mask"], enc["input_ids"].shape[1] - 1
            )
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=stops,
                **({cache_keyword(model): shared[0]} if shared else {}),
                **decoding(temperature, top_p),
            )
    finally:
        lm.generation_config = own_config
    response = out[:, enc["input_ids"].shape[1] :]
    if response.shape[1] < max_new_tokens:  # every row stopped early: pad to a fixed width
        fill = response.new_full((response.shape[0], max_new_tokens - response.shape[1]), tok.pad_token_id)
        response = torch.cat([response, fill], dim=1)
    ids, mask, finished = truncate_after_stop(response, stops, tok.pad_token_id)
    return Samples(enc["input_ids"], enc["attention_mask"], ids, mask, finished)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int) -> torch.Tensor:
    """(B, R, V) logits that predict each of the R tokens after `context_length`: the logits at
    position t predict token t + 1, so they are read from positions context_length - 1 .. -2.

    Positions come from the attention mask (`position_ids`), so left padding and batch mates
    leave a row's logits unchanged; only the last R + 1 positions go through the LM head.
    """
    width = input_ids.shape[1] - context_length
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=width + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
):
    """(B, R) log-probs of the reply tokens input_ids[:, context_length:] under
    softmax(logits / temperature), 0 where `response_mask` is 0; with `with_entropy`, also the
    (B, R) entropy of that distribution at each reply position. Gradients flow to the model.

    The model's trunk runs once, through the model's own forward (DDP, peft and accelerate's
    autocast wrappers included); the LM head, log-softmax and gather then run on
    `chunk_tokens` reply tokens at a time, under the autocast state the forward ran in, and
    when gradients are on each chunk is recomputed in the backward pass. So at most one
    chunk's logits exist at once, forward or backward. Models whose head cannot be applied
    apart from their forward (no `get_output_embeddings`/`get_decoder`, scaled or soft-capped
    logits, sharded weights) take the unchunked `response_logits` path, same values.

    Reply columns after every row's last real token (replies that all stopped early) are left
    out of the pass: their log-probs (and entropies) are 0.
    """
    width = response_mask.shape[1]
    used = int(response_mask.any(0).nonzero().max()) + 1 if response_mask.any() else 1
    if used < width:
        kept = context_length + used
        out = token_logprobs(model, input_ids[:, :kept], attention_mask[:, :kept], context_length,
                             response_mask[:, :used], temperature, with_entropy=with_entropy, chunk_tokens=chunk_tokens)
        pad = lambda x: torch.nn.functional.pad(x, (0, width - used))  # noqa: E731
        return tuple(map(pad, out)) if with_entropy else pad(out)
    labels = input_ids[:, context_length:]
    check_logprob_support(model)
    parts = _trunk_and_head(model)
    if parts is not None:
        trunk, head = parts
        hidden, amp, last = _trunk_output(model, trunk, input_ids, attention_mask, context_length)
        if not _head_matches(model, head, last, amp):
            parts = None
    if parts is None:
        logits = response_logits(model, input_ids, attention_mask, context_length)
        return _chunk_scores(logits, labels, response_mask, temperature, with_entropy)
    flat = (hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), response_mask.reshape(-1))

    def scores(h, y, m):
        with torch.autocast(**amp):
            return _chunk_scores(head(h), y, m, temperature, with_entropy)

    outs = []
    for start in range(0, flat[0].shape[0], chunk_tokens):
        chunk = [x[start : start + chunk_tokens] for x in flat]
        if torch.is_grad_enabled():
            outs.append(checkpoint(scores, *chunk, use_reentrant=False))
        else:
            outs.append(scores(*chunk))
    if not with_entropy:
        return torch.cat(outs).view_as(labels)
    logp, entropy = zip(*outs)
    return torch.cat(logp).view_as(labels), torch.cat(entropy).view_as(labels)


def _chunk_scores(logits, labels, mask, temperature: float, with_entropy: bool):
    logp = losses.sequence_logprobs(logits, labels, mask, temperature)
    if not with_entropy:
        return logp
    return logp, losses.entropy_from_logits(logits.float() / temperature)


# Config attributes of models that scale or cap their logits after the LM head (Gemma 2/3, VaultGemma,
# RecurrentGemma, Cohere, Granite, Falcon-H1, xLSTM, ...): `token_logprobs` leaves those to the model's own
# forward. Any other transform is caught at run time (`_head_matches`).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier",
                    "logits_soft_cap", "output_logit_soft_cap", "logit_softcapping")
_UNMATCHED: set[type] = set()  # model classes whose logits are not their LM head's output (found at run time)
# Those TRL's fused LM head (the dpo stage's log-probs, `trl.trainer.utils.add_fused_lm_head`) does not apply:
# it knows final_logit_softcapping and the scales, not these caps.
NOT_FUSED = ("logits_soft_cap", "output_logit_soft_cap", "logit_softcapping")


def check_fused_head(model, stage: str) -> None:
    """Refuse, in one line, a model whose logits TRL's fused LM head would not reproduce (a soft cap it
    does not apply): the stage's log-probs would not be the model's."""
    lm = base_lm(model)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    found = [name for name in NOT_FUSED if getattr(config, name, None) not in (None, 1, 1.0)]
    if found:
        raise RecipeError(
            f"{stage}: {type(lm).__name__} caps its logits ({found[0]}={getattr(config, found[0])}), which TRL's fused "
            f"LM head (the {stage} loss's log-probs) does not apply, so its log-probs would not be the model's; train it "
            "with ppo, grpo or rloo (their log-probs apply the cap), or use another model"
        )


def check_logprob_support(model) -> None:
    """Refuse, in one line, a model whose logits `token_logprobs` cannot reproduce: an encoder-decoder, or
    a forward that takes neither `position_ids` and `logits_to_keep` nor further keywords (the forward
    pass over sampled text passes both, so that left padding never changes a row's logits)."""
    lm = base_lm(model)
    name = type(lm).__name__
    if getattr(lm.config, "is_encoder_decoder", False):
        raise RecipeError(f"{name}: an encoder-decoder model; the toolkit's log-probs need a decoder-only causal LM")
    params = inspect.signature(lm.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in ("position_ids", "logits_to_keep") if k not in params and not takes_any]
    if missing:
        raise RecipeError(f"{name}: its forward takes no {' or '.join(missing)}, so the toolkit cannot compute its "
                          "log-probs as the model's own logits give them; use a causal LM whose forward does")


def _trunk_and_head(model):
    """(trunk, head): the decoder whose output the LM head reads, and the head itself, or None
    when the head cannot be applied apart from the model's forward."""
    lm = base_lm(model)
    get_head, get_trunk = getattr(lm, "get_output_embeddings", None), getattr(lm, "get_decoder", None)
    if get_head is None or get_trunk is None:
        return None
    head, trunk = get_head(), get_trunk()
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if not isinstance(head, torch.nn.Module) or trunk is None or trunk is lm:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS) or type(lm) in _UNMATCHED:
        return None
    weight = getattr(head, "weight", None)
    if weight is None or type(weight) is not torch.nn.Parameter or hasattr(weight, "ds_id"):
        return None  # FSDP / DeepSpeed ZeRO-3 shards: only the model's forward gathers them
    return trunk, head


def _trunk_output(model, trunk, input_ids, attention_mask, context_length: int):
    """The trunk's last hidden state at the positions that predict the tokens after
    `context_length` (B, R, H), captured from the model's own forward (which computes the logits
    of the last position only), the autocast state it ran under, and (hidden state, logits) of the
    last position, for `_head_matches`. Rows that share a prompt: it runs once
    (`shared_prompt_cache`), the rows' replies on top of its cache."""
    seen = {}

    def keep(module, args, output):
        hidden = _hidden_of(output)
        device = hidden.device.type
        seen["hidden"] = hidden
        seen["amp"] = {"device_type": device, "dtype": torch.get_autocast_dtype(device),
                       "enabled": torch.is_autocast_enabled(device)}

    shared = shared_prompt_cache(model, input_ids, attention_mask, context_length)
    positions = position_ids(attention_mask)
    handle = trunk.register_forward_hook(keep)
    try:
        if shared is None:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1,
                        use_cache=False)
        else:
            out = model(input_ids=input_ids[:, context_length:], attention_mask=attention_mask,
                        position_ids=positions[:, context_length:], logits_to_keep=1, use_cache=True,
                        **{cache_keyword(model): shared[0]})
    finally:
        handle.remove()
    last = (seen["hidden"][:, -1].detach(), out.logits[:, -1].detach())
    if shared is None:
        return seen["hidden"][:, context_length - 1 : -1], seen["amp"], last
    _, prompt_last, inverse = shared  # the prompt's last position predicts the first reply token
    return torch.cat([prompt_last[inverse], seen["hidden"][:, :-1]], 1), seen["amp"], last


def _head_matches(model, head, last, amp) -> bool:
    """Whether the LM head applied to the trunk's output gives the model's own logits, checked at the last
    position of the forward that just ran (its logits come with it): a model that transforms its logits in
    a way `LOGIT_TRANSFORMS` does not name (a soft cap, a scale) fails here, is logged once, and its class
    takes the unchunked path from then on. The tolerance is 16 rounding steps of the coarser dtype."""
    hidden, want = last
    with torch.no_grad(), torch.autocast(**amp):
        got = head(hidden)
    eps = max(torch.finfo(got.dtype).eps, torch.finfo(want.dtype).eps)
    got, want = got.float(), want.float()
    if (got - want).abs().max() <= 16 * eps * (1 + want.abs().max()):
        return True
    lm = base_lm(model)
    if type(lm) not in _UNMATCHED:
        _UNMATCHED.add(type(lm))
        logger.warning("%s: its logits are not its LM head's output (a cap or scale the toolkit does not know by "
                       "name); its log-probs come from its own forward, unchunked", type(lm).__name__)
    return False
