"""Shape detection and normalisation: the one parser of preference, SFT and text rows.

Every shape becomes the canonical conversational form:

    pairs: {"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message],
            "score_chosen": float | None, "score_rejected": float | None, "source": str, "id": str}
    sft:   {"messages": [messages...], "source": str, "id": str}
    text:  {"text": str, "source": str, "id": str}

where a message is {"role": "system" | "user" | "assistant", "content": str}. A prompt ends
with a user turn and keeps every earlier turn (system messages included).

Shapes (column names from `PrepColumns`):

* explicit  `prompt`, `chosen`, `rejected`: text or chat messages. A prompt given as text is one
            user message (or, if it is a Human/Assistant transcript, its turns); replies given as
            whole conversations that start with the prompt have that prefix removed.
* implicit  `chosen`, `rejected` only: two whole transcripts (`"\\n\\nHuman: ... \\n\\nAssistant: ..."`)
            or two message lists sharing everything up to the last assistant turn.
* rated     `prompt`, `completions` (text with a parallel `ratings` list, or objects with
            `response`/`rating`): the best against the worst or a random lower-rated one.
* scored    `prompt`, `response_a`, `response_b`, `score_a`, `score_b`: the higher-scored one wins
            when the ratio of the scores clears `min_ratio`.
* ranked    `prompt`, `ranked` (best first): best vs worst, neighbours, or all ordered pairs.
* binary    `prompt`, `completion`, `label`: one judged reply (kind `binary`). The label is true/false, 1/0
            or a word (up/down, thumbs_up/thumbs_down, accept/reject, good/bad, ...), or with
            `threshold` a rating (desirable when at least the threshold).
* sft       `messages` (messages or a transcript);  text: `text`.

Kind `binary` (unpaired rows for KTO) also takes the pair shapes: each pair becomes one desirable
row (chosen) and one undesirable row (rejected); and `rated` lists, each completion one row
labelled by `threshold`. Binary rows are

    {"prompt": [messages...], "completion": [assistant message], "label": bool, "score": float | None,
     "source": str, "id": str}

TRL's unpaired preference format (conversational).

A row whose `generated` column is true holds replies sampled from a model (on-policy data: the
`onpolicy` command, prep's `samples`), and every row made from it carries `"generated": true`. Its
replies may be empty: a model that stops at once writes nothing, and that reply is data (the worst
of a prompt's samples is what DPO and KTO learn to avoid); an empty reply in a row without the mark
is a broken row, dropped as "empty 'chosen'" and the like.

`make_parser(shape, columns, options)` returns a function row -> list of canonical rows, or a
string: the reason the row is dropped. Reasons are short and fixed, so they can be counted.
"""

from __future__ import annotations

import json
import random
import zlib
from typing import Callable

from alignment.config import SHAPES, PrepColumns, PrepOptions

from .read import DataError

PREFERENCE_SHAPES = ("explicit", "implicit", "rated", "scored", "ranked")
KIND_SHAPES = {"pairs": PREFERENCE_SHAPES, "binary": ("binary", *PREFERENCE_SHAPES), "sft": ("sft",), "text": ("text",)}
ROLES = ("system", "user", "assistant")
_ROLE = {"Human": "user", "Assistant": "assistant"}

Parsed = "list[dict] | str"


# --------------------------------------------------------------------------- detection


def _needs(shape: str, c: PrepColumns) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns the shape needs, columns it must not have) for detection."""
    return {
        "explicit": ((c.prompt, c.chosen, c.rejected), ()),
        "implicit": ((c.chosen, c.rejected), (c.prompt,)),
        "rated": ((c.prompt, c.completions), (c.chosen,)),
        "scored": ((c.prompt, c.response_a, c.response_b, c.score_a, c.score_b), ()),
        "ranked": ((c.prompt, c.ranked), ()),
        "binary": ((c.prompt, c.completion, c.label), (c.chosen, c.completions)),
        "sft": ((c.messages,), (c.chosen,)),
        "text": ((c.text,), (c.chosen, c.messages)),
    }[shape]


def detect_shape(columns, c: PrepColumns, allowed: tuple[str, ...], where: str) -> str:
    """The one shape in `allowed` whose columns the rows have; a DataError listing matches otherwise.

    Rows that carry every column of two shapes (explicit pairs plus a rated list) are ambiguous
    even where one shape's rule would exclude the other: the columns one reading leaves unread
    are data too, so the user states the shape. A shape whose columns are all among another
    matching shape's (implicit's chosen/rejected inside explicit's) is not a second reading."""
    columns = set(columns)
    full = [s for s in allowed if all(n in columns for n in _needs(s, c)[0])]
    full = [s for s in full if not any(set(_needs(s, c)[0]) < set(_needs(t, c)[0]) for t in full)]
    matches = full if len(full) > 1 else [s for s in full if not any(x in columns for x in _needs(s, c)[1])]
    if len(matches) == 1:
        return matches[0]
    have = ", ".join(sorted(map(str, columns))) or "none"
    if not matches:
        expected = "; ".join(f"{s}: {', '.join(_needs(s, c)[0])}" for s in allowed)
        raise DataError(f"{where}: no row shape matches the columns ({have}); expected {expected} (column names are settable)")
    raise DataError(f"{where}: the columns ({have}) match several shapes: {', '.join(matches)}; state the shape (--shape)")


# --------------------------------------------------------------------------- messages


def is_transcript(text: str) -> bool:
    """Human/Assistant turns: a line that starts with "Human:" and one that starts with "Assistant:"."""
    start = text.lstrip()
    return (start.startswith("Human:") or "\nHuman:" in start) and "\nAssistant:" in start


def starts_as_transcript(text: str) -> bool:
    """A transcript from its first word: how an explicit prompt or reply given as text is told
    from text that quotes a dialogue (a reply "Here is an example:\\n\\nHuman: ...")."""
    return text.lstrip().startswith("Human:") and "\nAssistant:" in text


def parse_transcript(text: str) -> list[dict]:
    """`"\\n\\nHuman: a\\n\\nAssistant: b"` -> user/assistant messages; text before the first turn is a system message.

    A turn starts at a line that begins with "Human:" or "Assistant:" (after a blank line, as
    in Anthropic's HH data, or a single newline); the lines up to the next turn, stripped, are
    its content.
    """
    lead: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        if line.startswith("Human:"):
            turns.append(("user", [line[6:]]))
        elif line.startswith("Assistant:"):
            turns.append(("assistant", [line[10:]]))
        elif turns:
            turns[-1][1].append(line)
        else:
            lead.append(line)
    system = "\n".join(lead).strip()
    messages = [{"role": "system", "content": system}] if system else []
    messages.extend({"role": role, "content": "\n".join(lines).strip()} for role, lines in turns)
    return messages


def as_messages(value, role: str, name: str, transcript=is_transcript) -> list[dict] | str:
    """Text (one `role` message, or the turns of a transcript, as `transcript(text)` tells), one
    message, or a message list -> messages."""
    if isinstance(value, str):
        return parse_transcript(value) if transcript(value) else [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        return f"'{name}' is not text or a list of chat messages" if value is not None else f"missing '{name}'"
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"'{name}' has a message without a role in {ROLES}"
        if not isinstance(m.get("content"), str):
            return f"'{name}' has a message whose content is not text"
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(row: dict, name: str) -> list[dict] | str:
    if row.get(name) is None:
        return f"missing '{name}'"
    prompt = as_messages(row[name], "user", name, starts_as_transcript)
    if isinstance(prompt, str):
        return prompt
    if len(prompt) > 1 and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"].strip():
        prompt = prompt[:-1]  # a transcript prompt ending in an open "Assistant:" turn
    if prompt[-1]["role"] != "user":
        return f"'{name}' does not end with a user turn"
    return prompt


def _reply(value, name: str, prompt: list[dict]) -> list[dict] | str:
    if value is None:
        return f"missing '{name}'"
    reply = as_messages(value, "assistant", name, starts_as_transcript)
    if isinstance(reply, str):
        return reply
    if len(reply) > len(prompt) and _turns(reply[: len(prompt)]) == _turns(prompt):
        reply = reply[len(prompt) :]  # a whole conversation that repeats the prompt
    if len(reply) != 1 or reply[0]["role"] != "assistant":
        return f"'{name}' is not one assistant reply"
    return reply


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    """Messages compared as a transcript's are parsed: contents stripped."""
    return [(m["role"], m["content"].strip()) for m in messages]


def _as_list(value):
    """A list column as read from a CSV cell (JSON text) or any other file (a list already)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        try:
            return _number(float(value))
        except ValueError:
            return None
    return None


def _pair(prompt, chosen, rejected, score_chosen=None, score_rejected=None, row_id=None) -> dict:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
        "id": None if row_id is None else str(row_id),
    }


# --------------------------------------------------------------------------- shapes


# The columns each shape reads (PrepColumns roles).
SHAPE_ROLES = {
    "explicit": ("prompt", "chosen", "rejected", "id"),
    "implicit": ("chosen", "rejected", "id"),
    "rated": ("prompt", "completions", "ratings", "id"),
    "scored": ("prompt", "response_a", "response_b", "score_a", "score_b", "id"),
    "ranked": ("prompt", "ranked", "id"),
    "binary": ("prompt", "completion", "label", "id"),
    "sft": ("messages", "id"),
    "text": ("text", "id"),
}


def check_columns(shape: str, c: PrepColumns) -> None:
    """Two roles of a shape read from one column (`--column chosen=x --column rejected=x`) would
    make every pair identical: a DataError instead."""
    seen: dict[str, str] = {}
    for role in SHAPE_ROLES[shape]:
        name = getattr(c, role)
        if name in seen:
            raise DataError(f"columns: {seen[name]} and {role} both name the column '{name}' "
                            f"({shape} rows); each role needs a column of its own")
        seen[name] = role


def absent_columns(shape: str, c: PrepColumns, seen, forced: bool, where: str) -> DataError | None:
    """A DataError when the rows lack, in every row, a column they were said to have: a role named
    (--column, a recipe's columns) that the shape reads or whose absence decided the shape (prompt
    for implicit pairs), or, when the shape was stated (--shape) rather than detected, a column the
    shape needs. `seen` is every column of every row: a column no row has is a wrong name or a
    wrong shape, not rows to count as dropped (a column missing from some rows only is a drop)."""
    reads, excludes = set(SHAPE_ROLES[shape]), {r for r in PrepColumns.model_fields if getattr(c, r) in _needs(shape, c)[1]}
    named = [getattr(c, r) for r in PrepColumns.model_fields if r in c.model_fields_set and r in reads | excludes]
    needs = _needs(shape, c)[0] if forced else ()
    missing = [n for n in dict.fromkeys([*named, *needs]) if n not in seen]
    if not seen or not missing:
        return None
    have = ", ".join(sorted(map(str, seen)))
    absent = ", ".join(repr(n) for n in missing)
    if any(n in needs for n in missing):
        fix = (f"shape '{shape}' reads {', '.join(needs)}: check --shape, or name the columns with --column ROLE=COLUMN "
               "(a recipe: prep.sources[].shape / .columns)")
    else:
        roles = [f"{r}={getattr(c, r)}" for r in PrepColumns.model_fields if r in c.model_fields_set and getattr(c, r) in missing]
        fix = f"--column {' '.join(roles)} names a column no row has (a recipe: prep.sources[].columns): check the name"
    return DataError(f"{where}: no column {absent} in its rows (columns: {have}); {fix}")


def make_parser(shape: str, c: PrepColumns, o: PrepOptions) -> Callable[[dict], list[dict] | str]:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    check_columns(shape, c)
    if o.kind == "binary" and shape == "rated":
        return _keep_generated(_rated_binary(c, o))
    parse = {
        "explicit": _explicit,
        "implicit": _implicit,
        "rated": _rated,
        "scored": _scored,
        "ranked": _ranked,
        "binary": _binary,
        "sft": _sft,
        "text": _text,
    }[shape](c, o)
    if shape not in ("sft", "text"):  # rows with replies
        parse = _keep_generated(parse)
    if o.kind == "binary" and shape in PREFERENCE_SHAPES:
        return _keep_generated(_unpaired(parse))  # the unpaired rows of a generated row are marked too
    return parse


def is_generated(row: dict) -> bool:
    """The row's replies were sampled from a model (its `generated` column is true)."""
    return row.get("generated") is True


def _keep_generated(parse):
    """`parse`, with the rows it makes from a generated row marked generated too."""

    def marked(row: dict):
        made = parse(row)
        if is_generated(row) and not isinstance(made, str):
            for item in made:
                item["generated"] = True
        return made

    return marked


def extra_reason(shape: str, kind: str) -> str:
    """What the rows made beyond one per input row are counted as (prepare's `extra`)."""
    if kind == "binary" and shape == "rated":
        return "more rows from one rated list"
    if kind == "binary" and shape in PREFERENCE_SHAPES:
        return "pairs split into a desirable and an undesirable row"
    return "more pairs from one ranked list"


def _explicit(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        prompt = _prompt(row, c.prompt)
        if isinstance(prompt, str):
            return prompt
        chosen = _reply(row.get(c.chosen), c.chosen, prompt)
        if isinstance(chosen, str):
            return chosen
        rejected = _reply(row.get(c.rejected), c.rejected, prompt)
        if isinstance(rejected, str):
            return rejected
        scores = _number(row.get("score_chosen")), _number(row.get("score_rejected"))
        return [_pair(prompt, chosen, rejected, *scores, row.get(c.id))]

    return parse


def _split_conversation(value, name: str) -> tuple[list[dict], dict] | str:
    if value is None:
        return f"missing '{name}'"
    messages = as_messages(value, "assistant", name)
    if isinstance(messages, str):
        return messages
    if isinstance(value, str) and not is_transcript(value):
        return f"'{name}' is not a Human/Assistant transcript"
    if messages[-1]["role"] != "assistant":
        return "transcript does not end with an assistant turn"
    if len(messages) < 2 or messages[-2]["role"] != "user":
        return "no user turn before the last assistant turn"
    return messages[:-1], messages[-1]


_LAST, _HUMAN = "\nAssistant:", "\nHuman:"  # turn markers at a line's start (see parse_transcript)


def _shared_transcript(chosen, rejected) -> tuple[list[dict], dict, dict] | None:
    """Fast path for two transcripts whose text is identical up to the last assistant turn:
    parse the shared part once. None when it does not apply (the general path decides)."""
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return None
    i = chosen.rfind(_LAST)
    if i < 0 or i != rejected.rfind(_LAST) or chosen.find(_HUMAN, i) >= 0 or rejected.find(_HUMAN, i) >= 0:
        return None
    shared = chosen[:i]
    if not rejected.startswith(shared):
        return None
    prompt = parse_transcript(shared)
    if not prompt or prompt[-1]["role"] != "user":
        return None
    k = i + len(_LAST)
    return prompt, {"role": "assistant", "content": chosen[k:].strip()}, {"role": "assistant", "content": rejected[k:].strip()}


def _implicit(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        shared = _shared_transcript(row.get(c.chosen), row.get(c.rejected))
        if shared is not None:
            return [_pair(shared[0], [shared[1]], [shared[2]], row_id=row.get(c.id))]
        chosen = _split_conversation(row.get(c.chosen), c.chosen)
        if isinstance(chosen, str):
            return chosen
        rejected = _split_conversation(row.get(c.rejected), c.rejected)
        if isinstance(rejected, str):
            return rejected
        if chosen[0] != rejected[0]:
            return "transcripts differ before the last assistant turn"
        return [_pair(chosen[0], [chosen[1]], [rejected[1]], row_id=row.get(c.id))]

    return parse


def _rng(prompt: list[dict], seed: int) -> random.Random:
    """A generator fixed by the prompt and the seed, so that reruns pick the same rows."""
    return random.Random(zlib.crc32(repr((seed, prompt)).encode()))


def _rated_completions(row: dict, c: PrepColumns) -> tuple[list, list[float]] | str:
    """(completion texts, their ratings as numbers) of a rated row, as a list of {response, rating}
    objects or as two parallel lists; or why the row has none."""
    completions = _as_list(row.get(c.completions))
    if not isinstance(completions, list):
        return f"'{c.completions}' is not a list"
    if completions and all(isinstance(x, dict) for x in completions):
        texts = [x.get(c.response_key) for x in completions]
        ratings = [x.get(c.rating_key) for x in completions]
    else:
        texts, ratings = completions, _as_list(row.get(c.ratings))
        if not isinstance(ratings, list) or len(ratings) != len(texts):
            return f"'{c.ratings}' is not a list as long as '{c.completions}'"
    ratings = [_number(r) for r in ratings]
    if any(r is None for r in ratings):
        return "a rating is not a number"
    return texts, ratings


def _rated(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        prompt = _prompt(row, c.prompt)
        if isinstance(prompt, str):
            return prompt
        rated = _rated_completions(row, c)
        if isinstance(rated, str):
            return rated
        texts, ratings = rated
        if len(texts) < 2:
            return "fewer than two rated completions"
        best = max(range(len(texts)), key=lambda i: ratings[i])
        lower = [i for i in range(len(texts)) if ratings[i] < ratings[best]]
        if not lower:
            return "all ratings tied"
        lower = [i for i in lower if ratings[best] - ratings[i] >= o.min_margin]
        if not lower:
            return "rating margin below min_margin"
        worse = min(lower, key=lambda i: ratings[i]) if o.rejected_choice == "worst" else _rng(prompt, o.seed).choice(lower)
        chosen = _reply(texts[best], c.completions, prompt)
        rejected = _reply(texts[worse], c.completions, prompt)
        for reply in (chosen, rejected):
            if isinstance(reply, str):
                return reply
        return [_pair(prompt, chosen, rejected, ratings[best], ratings[worse], row.get(c.id))]

    return parse


def _scored(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        prompt = _prompt(row, c.prompt)
        if isinstance(prompt, str):
            return prompt
        a, b = _number(row.get(c.score_a)), _number(row.get(c.score_b))
        if a is None or b is None:
            return f"'{c.score_a}' or '{c.score_b}' is not a number"
        if a == b:
            return "scores tied"
        (hi, win), (lo, lose) = sorted([(a, c.response_a), (b, c.response_b)], reverse=True)
        if lo > 0 and hi / lo < o.min_ratio:  # a lower score <= 0 makes any ratio infinite
            return "score ratio below min_ratio"
        chosen = _reply(row.get(win), win, prompt)
        rejected = _reply(row.get(lose), lose, prompt)
        for reply in (chosen, rejected):
            if isinstance(reply, str):
                return reply
        return [_pair(prompt, chosen, rejected, hi, lo, row.get(c.id))]

    return parse


def _ranked(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        prompt = _prompt(row, c.prompt)
        if isinstance(prompt, str):
            return prompt
        ranked = _as_list(row.get(c.ranked))
        if not isinstance(ranked, list):
            return f"'{c.ranked}' is not a list"
        if len(ranked) < 2:
            return "fewer than two ranked responses"
        replies = [_reply(r, c.ranked, prompt) for r in ranked]
        bad = next((r for r in replies if isinstance(r, str)), None)
        if bad:
            return bad
        n = len(replies)
        if o.ranked_pairs == "best-worst":
            pairs = [(0, n - 1)]
        elif o.ranked_pairs == "adjacent":
            pairs = [(i, i + 1) for i in range(n - 1)]
        else:
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        row_id = row.get(c.id)
        return [
            _pair(prompt, replies[i], replies[j], row_id=None if row_id is None else f"{row_id}-{i}-{j}")
            for i, j in pairs
        ]

    return parse


# --------------------------------------------------------------------------- binary (unpaired) rows

TRUE_WORDS = frozenset({"true", "yes", "1", "+1", "up", "thumbs_up", "thumbsup", "thumbs up", "accept", "accepted",
                        "good", "desirable", "positive", "like", "liked"})
FALSE_WORDS = frozenset({"false", "no", "0", "-1", "down", "thumbs_down", "thumbsdown", "thumbs down", "reject",
                         "rejected", "bad", "undesirable", "negative", "dislike", "disliked"})


def binary_label(value, threshold: float | None, name: str = "label") -> tuple[bool, float | None] | str:
    """(desirable?, the rating if the label was one) or the reason the value is no label.

    true/false and the words of TRUE_WORDS / FALSE_WORDS (any case) are judgements; a number is a
    rating compared with `threshold` (at least it: desirable), and without a threshold only 1 and
    0 (or -1) are judgements."""
    if isinstance(value, bool):
        return value, None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS and (threshold is None or word not in ("1", "0", "-1", "+1")):
            return True, None
        if word in FALSE_WORDS and (threshold is None or word not in ("1", "0", "-1", "+1")):
            return False, None
    number = _number(value)
    if number is None:
        return f"missing '{name}'" if value is None else f"'{name}' is not a judgement (true/false, up/down, accept/reject, ...)"
    if threshold is not None:
        return number >= threshold, number
    if number in (0.0, 1.0, -1.0):
        return number == 1.0, None
    return f"'{name}' is a rating other than 1/0: set a threshold (--threshold, prep.threshold)"


def _unpaired_row(prompt, completion, label: bool, score=None, row_id=None) -> dict:
    return {"prompt": prompt, "completion": completion, "label": label, "score": score,
            "id": None if row_id is None else str(row_id)}


def _binary(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        prompt = _prompt(row, c.prompt)
        if isinstance(prompt, str):
            return prompt
        completion = _reply(row.get(c.completion), c.completion, prompt)
        if isinstance(completion, str):
            return completion
        label = binary_label(row.get(c.label), o.threshold, c.label)
        if isinstance(label, str):
            return label
        return [_unpaired_row(prompt, completion, label[0], label[1], row.get(c.id))]

    return parse


def _unpaired(parse_pairs):
    """A pair parser made to give two unpaired rows per pair: chosen desirable, rejected undesirable."""

    def parse(row: dict):
        made = parse_pairs(row)
        if isinstance(made, str):
            return made
        rows = []
        for pair in made:
            chosen, rejected = pair["chosen"][-1]["content"].strip(), pair["rejected"][-1]["content"].strip()
            # the pair is dropped whole, under the pairs' reason; a generated reply may be empty
            if not chosen and not is_generated(pair):
                return "empty 'chosen'"
            if not rejected and not is_generated(pair):
                return "empty 'rejected'"
            if chosen == rejected:
                return "'chosen' identical to 'rejected'"
            row_id = pair["id"]
            two = [_unpaired_row(pair["prompt"], pair["chosen"], True, pair["score_chosen"],
                                 None if row_id is None else f"{row_id}-chosen"),
                   _unpaired_row(pair["prompt"], pair["rejected"], False, pair["score_rejected"],
                                 None if row_id is None else f"{row_id}-rejected")]
            rows += two
        return rows

    return parse


def _rated_binary(c: PrepColumns, o: PrepOptions):
    """Rated lists to binary rows: each completion desirable when its rating is at least `threshold`."""
    if o.threshold is None:
        raise DataError("rated rows (completions with ratings) become binary rows by a rating threshold: "
                        "set --threshold (prep.threshold)")

    def parse(row: dict):
        prompt = _prompt(row, c.prompt)
        if isinstance(prompt, str):
            return prompt
        rated = _rated_completions(row, c)
        if isinstance(rated, str):
            return rated
        texts, ratings = rated
        if not texts:
            return "no rated completions"
        rows = []
        for i, (text, rating) in enumerate(zip(texts, ratings)):
            reply = _reply(text, c.completions, prompt)
            if isinstance(reply, str):
                return reply
            row_id = row.get(c.id)
            rows.append(_unpaired_row(prompt, reply, rating >= o.threshold, rating,
                                      None if row_id is None else f"{row_id}-{i}"))
        return rows

    return parse


def _sft(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        messages = as_messages(row.get(c.messages), "user", c.messages)
        if isinstance(messages, str):
            return messages
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant turn"
        return [{"messages": messages, "id": None if row.get(c.id) is None else str(row[c.id])}]

    return parse


def _text(c: PrepColumns, o: PrepOptions):
    def parse(row: dict):
        text = row.get(c.text)
        if text is None:
            return f"missing '{c.text}'"
        if not isinstance(text, str):
            return f"'{c.text}' is not text"
        return [{"text": text, "id": None if row.get(c.id) is None else str(row[c.id])}]

    return parse
