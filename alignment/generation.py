"""Batched sampling and the forward pass over sampled text: what PPO rollouts, `alignment
compare`, the closing report and on-policy preference pairs share.

`sample` answers a batch of already-rendered prompts (left-padded, KV cache) and returns the
token ids and masks, so that callers can score or train on exactly what was sampled.
`position_ids` gives the positions a left-padded row must use in any later forward pass, so
that padding never changes a row's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def truncate_after_stop(response_ids: torch.Tensor, stops: list[int], pad_id: int):
    """(ids, mask, finished): tokens after the first stop token become pad, the stop token stays."""
    is_stop = torch.isin(response_ids, torch.tensor(stops, device=response_ids.device))
    # number of stop tokens strictly before each position: > 0 means the reply already ended
    before = is_stop.long().cumsum(-1) - is_stop.long()
    mask = (before == 0).long()
    return response_ids.masked_fill(mask == 0, pad_id), mask, is_stop.any(-1)


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

    Decoding settings are passed explicitly, so that two models are sampled under the same
    rule whatever their own generation configs say (e.g. a repetition penalty). No position
    ids are passed to `generate`: it derives them from the attention mask.
    """
    stops = stop_ids(model, tok)
    decoding = {"do_sample": False}
    if temperature > 0:
        decoding = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tok.padding_side = old_side
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            repetition_penalty=1.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=stops,
            **decoding,
        )
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
