"""Chat rendering: the one place that decides how text reaches a model.

Every stage (sft, reward, dpo, the RL loop, compare) renders prompts and exchanges here, so a
model family's chat template is handled once: what a prompt looks like, how an exchange is shown
to a reward model and where its score is read, which tokens an SFT conversation trains on, and
what happens to a role the template refuses.
"""

from __future__ import annotations


def render_prompt(tok, prompt: str) -> str:
    """A user prompt in `tok`'s chat template, ready for the assistant's reply."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- reward-model input
#
# How an exchange (prompt, reply, finished) reaches a reward model, and so where its score is read.
# The reward stage trains on these ids, the RL loop and `compare` score these ids with the model's
# own forward: one form on every path, so a reward model is read where it was trained.
#
# Chat form (the reward model's tokenizer has a chat template): the prompt rendered with the
# generation prompt, then the reply's own text unchanged, then, if the reply finished, the text the
# template closes an assistant turn with (`<|im_end|>\n`, `<end_of_turn>\n`, `<|end|>\n<|endoftext|>`,
# `<|eot_id|>`, EOS), found by rendering a sentinel reply. A reply cut off at the length limit gets no
# closing text. A decoder classifier pools at the last token: the closing text's last token when the
# reply finished, the reply's last token when it did not.
#
# Plain form (no chat template: hub DeBERTa/RoBERTa reward classifiers): the tokenizer's text-pair
# encoding of the prompt's text and the reply, `tok(prompt, reply)`, with the special tokens it adds
# ([CLS] ... [SEP] ... [SEP], <s> ... </s></s> ... </s>), the form such classifiers are trained on.
# It carries no end-of-turn, so a finished and a cut-off reply read alike (`missing_eos_penalty`
# is how to penalise a cut-off reply then).

_SENTINEL = "<<reply-sentinel-7f3a>>"
_CLOSES: dict[tuple, str] = {}  # (template, bos, eos) -> the text after an assistant reply


def reward_form(tok) -> str:
    """'chat' when `tok` has a chat template, 'plain' when it has none (load the reward model's
    tokenizer with `models.load_tokenizer(..., fallback_template=False)` so that it knows)."""
    return "chat" if tok.chat_template else "plain"


def as_messages(prompt) -> list[dict]:
    """A prompt given as text (one user turn) or as a list of chat messages, as messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def turn_close(tok) -> str:
    """The text `tok`'s template writes after an assistant reply's content, found by rendering a
    sentinel reply; EOS when the template writes nothing there (so that a finished reply still reads
    differently from a cut-off one)."""
    key = (tok.chat_template, tok.bos_token, tok.eos_token)
    if key not in _CLOSES:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        full = tok.apply_chat_template(messages, tokenize=False)
        if full.count(_SENTINEL) != 1:
            from .config import RecipeError

            raise RecipeError(
                f"chat template of '{tok.name_or_path}': an assistant reply is not rendered as its own text once "
                "(cannot tell what closes a turn); set model_options.chat_template: FILE"
            )
        _CLOSES[key] = full.split(_SENTINEL, 1)[1] or tok.eos_token
    return _CLOSES[key]


def reward_text(tok, prompt, reply: str, finished: bool = True) -> str:
    """The chat form of an exchange as text (see the section's comment)."""
    opened = tok.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    return opened + reply + (turn_close(tok) if finished else "")


def _plain_prompt(prompt) -> str:
    return "\n\n".join(m["content"] for m in as_messages(prompt))


def reward_ids(tok, prompt, reply: str, finished: bool = True) -> list[int]:
    """Token ids of an exchange as a reward model reads it: the chat form, with the special tokens
    the tokenizer adds (its BOS, [CLS]...) unless the template already wrote BOS (exactly one BOS);
    or the plain form. `prompt` is the user prompt or the conversation before the reply."""
    if reward_form(tok) == "plain":
        return tok(_plain_prompt(prompt), reply)["input_ids"]
    text = reward_text(tok, prompt, reply, finished)
    wrote_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
    return tok(text, add_special_tokens=not wrote_bos)["input_ids"]


def reward_batch(tok, prompts: list, replies: list[str], finished: list[bool]) -> dict:
    """`reward_ids` of each exchange, right-padded with the tokenizer's pad: input_ids and
    attention_mask tensors (B, T)."""
    import torch

    rows = [reward_ids(tok, p, r, f) for p, r, f in zip(prompts, replies, finished)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reward_pair_ids(tok, row: dict) -> dict:
    """A preference pair (prompt, chosen, rejected: canonical messages or text) as the reward stage
    trains on it: {'chosen_ids', 'rejected_ids'}, both replies finished, each after the turns that
    precede it."""
    out = {}
    for side in ("chosen", "rejected"):
        turns = [{"role": "assistant", "content": row[side]}] if isinstance(row[side], str) else list(row[side])
        out[f"{side}_ids"] = reward_ids(tok, as_messages(row["prompt"]) + turns[:-1], turns[-1]["content"])
    return out
