"""Chat rendering: the one place that decides how text reaches a model.

Every stage (sft, reward, dpo, the RL loop, compare) renders prompts and exchanges here, so a
model family's chat template is handled once: what a prompt looks like, how an exchange is shown
to a reward model and where its score is read, which tokens an SFT conversation trains on, and
what happens to a role the template refuses.
"""

from __future__ import annotations

import weakref

from .errors import RecipeError


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
# is how to penalise a cut-off reply then). A tokenizer that marks nothing in a pair (GPT-2's) gets
# the two texts separated by a blank line, and EOS after a finished reply, for a decoder to read.

_SENTINEL = "<<reply-sentinel-7f3a>>"
_CLOSES: dict[tuple, str] = {}  # (template, bos, eos) -> the text after an assistant reply


def reward_form(tok) -> str:
    """'chat' when `tok` has a chat template, 'plain' when it has none (load the reward model's
    tokenizer with `models.load_reward_tokenizer` so that it knows)."""
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
    """Token ids of an exchange as a reward model reads it: the chat form tokenised as every rendered
    text is (`encode`: the special tokens the tokenizer puts in front, BOS or [CLS], unless the template
    already wrote them, so exactly one BOS; nothing appended, so a cut-off reply stays open); or the plain
    form with every special token the tokenizer adds to a text pair. `prompt` is the user prompt or the
    conversation before the reply."""
    if reward_form(tok) == "plain":
        if tok.num_special_tokens_to_add(pair=True):
            return tok(_plain_prompt(prompt), reply)["input_ids"]
        return tok(_plain_prompt(prompt) + "\n\n" + reply)["input_ids"] + ([tok.eos_token_id] if finished else [])
    return encode(tok, reward_text(tok, prompt, reply, finished))


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


# --------------------------------------------------------------------------- SFT conversations: roles, tokens, the assistant mask
# (sections below this one's functions belong to other concerns; keep these together)

SYSTEM_MESSAGE_POLICIES = ("merge", "drop", "refuse")


def template_complaint(tok, messages: list[dict], add_generation_prompt: bool = False) -> str | None:
    """Why `tok`'s chat template refuses to render `messages` (its own message, e.g. 'System role not
    supported'), or None when it renders them. Refusal is found by rendering, not by knowing families."""
    from jinja2 import TemplateError

    try:
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def merge_system_turns(messages: list[dict]) -> list[dict] | None:
    """Each system turn's text put in front of the user turn that follows it (separated by a blank line,
    as Gemma-3's own template does); None when a system turn has no user turn after it."""
    out, pending = [], []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
        elif m["role"] == "user" and pending:
            out.append({**m, "content": "\n\n".join([*pending, m["content"]])})
            pending = []
        else:
            out.append(m)
    return None if pending else out


def fit_roles(tok, messages: list[dict], system_message: str) -> tuple[list[dict], str | None, str | None]:
    """`messages` as `tok`'s chat template takes them: (messages, change, problem).

    A conversation the template renders is left as it is (change None). One it refuses that has system
    turns gets `system_message`'s treatment: 'merge' (into the next user turn), 'drop', or 'refuse' (a
    problem). `change` names what was done, for the stage summary's counts; `problem` says why the row
    still cannot be rendered (non-alternating turns, say), for the data check to report with its origin.
    The conversation is checked both whole and up to each assistant turn with the generation prompt (how
    the SFT mask and inference render it)."""

    def complaint(msgs):
        found = template_complaint(tok, msgs)
        for i, m in enumerate(msgs):
            if found is None and m["role"] == "assistant" and i > 0:
                found = template_complaint(tok, msgs[:i], add_generation_prompt=True)
        return found

    problem = complaint(messages)
    if problem is None:
        return messages, None, None
    if any(m["role"] == "system" for m in messages):
        if system_message == "refuse":
            return messages, None, (f"the chat template refuses this conversation ({problem}) and it has a system turn; "
                                    "set data.system_message: merge or drop")
        fitted = merge_system_turns(messages) if system_message == "merge" else [m for m in messages if m["role"] != "system"]
        if fitted is not None and (fitted_problem := complaint(fitted)) is None:
            return fitted, f"system turn {'merged into the next user turn' if system_message == 'merge' else 'dropped'}", None
        problem = fitted_problem if fitted is not None else "a system turn with no user turn after it"
    return messages, None, f"the chat template cannot render this conversation ({problem})"


def encode(tok, text: str) -> list[int]:
    """Token ids of text a chat template rendered, with exactly one BOS where the model expects one.

    A template that writes BOS itself (Llama-3, Gemma, Mistral) must not get a second from the
    tokenizer's `add_special_tokens`; a tokenizer that adds BOS to plain text while its template does not
    write it gets it once. What the tokenizer puts in front of text is found by encoding a letter with and
    without special tokens; tokens it would append (a classifier's SEP/EOS) are not added here."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    lead = leading_special_ids(tok)
    return ids if not lead or ids[: len(lead)] == lead else lead + ids


_LEADING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def leading_special_ids(tok) -> list[int]:
    """The special tokens `tok` puts in front of encoded text (BOS, CLS), often none; found once per
    tokenizer (and BOS), since every rendered text asks."""
    key = (tok.bos_token_id, tok.cls_token_id)
    cached = _LEADING.get(tok)
    if cached is not None and cached[0] == key:
        return cached[1]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    found = next((full[:start] for start in range(len(full) - len(plain) + 1)
                  if full[start : start + len(plain)] == plain), [])
    _LEADING[tok] = (key, found)
    return found


def generation_stop_ids(name_or_path: str, tok, options=None) -> list[int]:
    """The ids generation stops at for the checkpoint: the tokenizer's EOS and the generation config's EOS
    list (Llama-3's `<|eot_id|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`), read without loading weights;
    a checkpoint without a generation config stops where its config.json's EOS says, as transformers does."""
    from transformers import AutoConfig, GenerationConfig

    from .config import ModelOptions
    from .models import _load

    options = options or ModelOptions()
    try:
        config = _load(GenerationConfig.from_pretrained, name_or_path, "generation config", revision=options.revision)
    except RecipeError:
        try:
            config = _load(AutoConfig.from_pretrained, name_or_path, "model config", revision=options.revision,
                           trust_remote_code=options.trust_remote_code)
        except RecipeError:
            config = None
    ids = {tok.eos_token_id}
    found = getattr(config, "eos_token_id", None)
    if found is not None:
        ids.update([found] if isinstance(found, int) else found)
    return sorted(i for i in ids if i is not None)


class TemplateUnfit(Exception):
    """A chat template that cannot be trained on with an assistant-token mask (the message says why)."""


def assistant_mask(tok, messages: list[dict], stops: list[int]) -> tuple[list[int], list[int]]:
    """(token ids of the whole conversation, 1 on the tokens the SFT loss learns, else 0).

    Each assistant turn is located by rendering the conversation turn by turn: the conversation before
    it with the generation prompt (what the model is shown at inference) must tokenise to a prefix of
    the whole conversation's ids, and the conversation ending with this turn must agree with the whole
    through the turn's first stop token (a token generation stops at: EOS or the generation config's
    list). The turn's tokens from the end of the generation prompt through that stop token are labelled:
    the reply and the token that ends it, so that the model learns to stop. What a template writes after
    the stop token (ChatML's '\\n' after `<|im_end|>`, Gemma's after `<end_of_turn>`, Phi-3's final
    `<|endoftext|>`) is not labelled: generation has stopped before it, so the model never produces it,
    and at the next turn it is part of the prompt the template writes. Rendering prefixes this way needs
    no `{% generation %}` markers, so any template that renders its prefixes consistently trains.

    Raises TemplateUnfit when the template does not preserve prefixes (it rewrites earlier turns once
    later ones follow, as Qwen3's drops earlier reasoning) or closes an assistant turn with no stop token.
    """
    whole = encode(tok, tok.apply_chat_template(messages, tokenize=False))
    mask = [0] * len(whole)
    turn_number = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:  # a turn opening the conversation answers nothing: context only
            continue
        turn_number += 1
        prompt = encode(tok, tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        start = len(prompt)
        if whole[:start] != prompt:
            raise TemplateUnfit(f"the conversation before assistant turn {turn_number}, with the generation prompt, "
                                "does not tokenise to a prefix of the whole conversation (the template renders "
                                "earlier turns differently once later ones follow)")
        ending = whole if i == len(messages) - 1 else encode(tok, tok.apply_chat_template(messages[: i + 1], tokenize=False))
        stop = next((k for k in range(start, len(ending)) if ending[k] in stops), None)
        if stop is None:
            raise TemplateUnfit(f"assistant turn {turn_number} ends with no token generation stops at (ids {stops}): "
                                "a model trained on it would not learn to stop")
        if whole[start : stop + 1] != ending[start : stop + 1]:
            raise TemplateUnfit(f"assistant turn {turn_number} renders differently once later turns follow (the "
                                "template rewrites earlier turns, e.g. drops their reasoning)")
        mask[start : stop + 1] = [1] * (stop + 1 - start)
    return whole, mask
