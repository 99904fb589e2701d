"""Dataset loading, row checking and per-stage preparation.

Rows come from the demo world or from data_prep's reader (`data_prep.read`: .jsonl, .jsonl.gz,
.json, .csv, .parquet files, `save_to_disk` or data_prep directories, hub dataset ids);
preference rows go through data_prep's shape parser. Every row keeps its origin (`file:line`)
so that a malformed one is reported where it is. Depending on the recipe's
`data.on_bad_row`, a malformed row stops the run or is dropped and counted by reason:
no row disappears without a count.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_prep.prepare import hold_out_by_prompt, prompt_key, row_problem
from data_prep.read import Bad, read_source
from data_prep.shapes import detect_shape, make_parser

from .config import DataOptions, PrepColumns, PrepOptions
from .errors import RecipeError
from .templates import fit_roles

DemoFactory = Callable[[int, int], list[dict]]


@dataclass
class Rows:
    rows: list[dict]
    origins: list[str]
    dropped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)


def load_rows(options: DataOptions, demo: DemoFactory, demo_examples: int | None = None, source: str | None = None,
              split: str | None = None) -> Rows:
    """Read the recipe's data source through data_prep's reader (the one reader of data files);
    `demo(n, seed)` makes `options.num_examples` rows when the source is 'demo' (the schema fills in
    each stage's number; `demo_examples` for options whose schema has none: init's corpus). `source`
    replaces `options.source` (a prep stage's output directory when the recipe says {from: prep.yaml}).

    Lines that cannot be rows (malformed JSON, a truncated last line, a ragged CSV row) stay in
    the rows as `Bad` items, so that `check_rows` stops on them or counts them.
    """
    source = source if source is not None else options.source
    if source == "demo":
        rows = demo(options.num_examples or demo_examples, options.seed)
        return Rows(rows, [f"demo row {i + 1}" for i in range(len(rows))])
    found = Rows([], [])
    for origin, row in read_source(source, split or options.split):
        if options.num_examples is not None and len(found) >= options.num_examples:
            break
        found.rows.append(row)
        found.origins.append(origin)
    return found


def check_rows(found: Rows, problem: Callable[[dict], str | None], on_bad_row: str) -> Rows:
    """Keep the rows for which `problem(row)` is None; stop on, or count, the others."""
    kept = Rows([], [], Counter(found.dropped))
    for row, origin in zip(found.rows, found.origins):
        if isinstance(row, (Bad, str)):  # a line that is not a row, or a reason found by the parser
            reason = row if isinstance(row, str) else row.reason
        else:
            reason = problem(row) if isinstance(row, dict) else "row is not a JSON object"
        if reason is None:
            kept.rows.append(row)
            kept.origins.append(origin)
        elif on_bad_row == "error":
            raise RecipeError(f"{origin}: {reason} (set data.on_bad_row: drop to skip such rows)")
        else:
            kept.dropped[reason] += 1
    if not kept.rows:
        raise RecipeError(f"data.source '{found.origins[0].rsplit(':', 1)[0] if found.origins else '?'}': no usable rows")
    return kept


def text_problem(text_field: str) -> Callable[[dict], str | None]:
    def problem(row: dict) -> str | None:
        if text_field not in row:
            return f"missing '{text_field}'"
        if not isinstance(row[text_field], str):
            return f"'{text_field}' is not a string"
        if not row[text_field].strip():
            return f"empty '{text_field}'"
        return None

    return problem


ROLES = ("system", "user", "assistant")


def messages_problem(messages_field: str) -> Callable[[dict], str | None]:
    def problem(row: dict) -> str | None:
        messages = row.get(messages_field)
        if messages is None:
            return f"missing '{messages_field}'"
        if not isinstance(messages, list) or not messages:
            return f"'{messages_field}' is not a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                return f"a message has no role in {ROLES}"
            if not isinstance(m.get("content"), str):
                return "a message content is not a string"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return "no non-empty assistant message"
        return None

    return problem


def fit_to_template(found: Rows, tok, system_message: str, on_bad_row: str, field: str,
                    replies: tuple[str, ...] = ()) -> tuple[Rows, Counter]:
    """Each checked row's conversation as the model's chat template takes it (templates.fit_roles), before
    anything trains: a system turn the template refuses is merged or dropped (`data.system_message`)
    and the row counted by what was done; a row the template still cannot render (turns that do not
    alternate, a system turn under 'refuse') is a bad row, reported with its origin or dropped and counted
    (`on_bad_row`). `field` holds the messages (sft) or the prompt's messages, which `replies` (chosen,
    rejected) continue; the changes go to the prompt. Returns (rows, changed rows by change)."""
    changed: Counter = Counter()
    if not tok.chat_template:  # a classifier's plain text form: no roles to fit
        return found, changed
    fitted = Rows([], list(found.origins), Counter(found.dropped))
    for row in found.rows:
        if not isinstance(row[field], list):  # text, not messages: nothing a template could refuse
            fitted.rows.append(row)
            continue
        reply = row[replies[0]] if replies else []
        messages, change, problem = fit_roles(tok, row[field] + reply, system_message)
        if problem is None and change is not None:
            row = {**row, field: messages[: len(messages) - len(reply)]}
        for other in replies[1:]:
            problem = problem or fit_roles(tok, row[field] + row[other], system_message)[2]
        if problem is None and change is not None:
            changed[change] += 1
        fitted.rows.append(row if problem is None else problem)
    return check_rows(fitted, lambda row: None, on_bad_row), changed


def preference_rows(found: Rows, options: DataOptions, margin_field: str | None = None) -> Rows:
    """Parse preference rows into the canonical form with data_prep's parser (the one parser):
    explicit rows (prompt/chosen/rejected as text or chat messages) or implicit-prompt rows
    (two whole transcripts or conversations). Each result is a canonical pair, or the reason
    the row cannot be one (a string), for `check_rows`; with `margin_field`, the row's margin
    is kept as `margin` and must be a finite number.
    """
    columns = PrepColumns(prompt=options.prompt_field, chosen=options.chosen_field, rejected=options.rejected_field)
    keys = set().union(*(r.keys() for r in found.rows[:100] if isinstance(r, dict)))
    where = found.origins[0].rsplit(":", 1)[0] if found.origins else str(options.source)
    _check_prompt_field(keys, options, where)
    shape = detect_shape(keys, columns, ("explicit", "implicit"), f"data.source {where}")
    parse = make_parser(shape, columns, PrepOptions())
    out = Rows([], list(found.origins), Counter(found.dropped))
    for row in found.rows:
        made = row if isinstance(row, Bad) or not isinstance(row, dict) else parse(row)
        if isinstance(made, list):
            pair = made[0]
            problem = row_problem(pair)
            if problem is None and margin_field is not None:
                pair["margin"] = row.get(margin_field)
                problem = _margin_problem(pair["margin"], margin_field)
            made = pair if problem is None else problem
        out.rows.append(made)
    return out


def unpaired_rows(found: Rows, options) -> Rows:
    """Parse unpaired feedback rows (kto) with data_prep's parser: `prompt` / `completion` / `label` rows
    (label true/false, 1/0 or a word such as up/down or accept/reject), or preference pairs (explicit or
    implicit), each of which becomes one desirable and one undesirable row. Each result is a canonical
    binary row, or the reason the row cannot be one, for `check_rows`."""
    columns = PrepColumns(prompt=options.prompt_field, chosen=options.chosen_field, rejected=options.rejected_field,
                          completion=options.completion_field, label=options.label_field)
    keys = set().union(*(r.keys() for r in found.rows[:100] if isinstance(r, dict)))
    where = found.origins[0].rsplit(":", 1)[0] if found.origins else str(options.source)
    _check_prompt_field(keys, options, where)
    shape = detect_shape(keys, columns, ("binary", "explicit", "implicit"), f"data.source {where}")
    parse = make_parser(shape, columns, PrepOptions(kind="binary"))
    out = Rows([], [], Counter(found.dropped))
    for row, origin in zip(found.rows, found.origins):
        made = row if isinstance(row, Bad) or not isinstance(row, dict) else parse(row)
        if not isinstance(made, list):
            out.rows.append(made)
            out.origins.append(origin)
            continue
        problems = [row_problem(item) for item in made]
        problem = next((p for p in problems if p), None)
        for item in ([problem] if problem else made):  # a pair with one bad side is dropped whole
            out.rows.append(item)
            out.origins.append(origin)
    return out


def _check_prompt_field(keys: set, options: DataOptions, where: str) -> None:
    """A prompt column the recipe names (data.prompt_field other than its default) must be in the rows.
    Without this, rows lacking it would be read as implicit-prompt pairs (two whole transcripts), and
    fail as 'not a transcript' or, worse, be read in the wrong shape. With the default, rows without
    a prompt column are the implicit shape, as before."""
    name, default = options.prompt_field, type(options).model_fields["prompt_field"].default
    if not keys or name == default or name in keys:
        return
    have = ", ".join(sorted(map(str, keys)))
    hint = (f"the rows have the default '{default}' column: drop the key or set data.prompt_field: {default}"
            if default in keys else "set data.prompt_field to the column that holds the prompt")
    raise RecipeError(f"data.prompt_field: '{name}' names no column of {where} (its columns: {have}); {hint}")


def _margin_problem(margin, name: str) -> str | None:
    if margin is None:
        return f"missing '{name}' (other rows have one)"
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return f"'{name}' is not a finite number"
    return None


def has_column(found: Rows, name: str) -> bool:
    """Whether any row carries `name` (an optional column such as a reward margin)."""
    return any(isinstance(row, dict) and row.get(name) is not None for row in found.rows)


def hold_out(found: Rows, n: int) -> tuple[Rows, Rows]:
    """Split off about `n` rows as a held-out set by prompt: (train, held_out).

    Whole prompts are held out, in the order of a fixed hash of the normalised prompt
    (data_prep.prepare.hold_out_by_prompt), so no prompt is on both sides and the choice does
    not depend on row order.
    """
    if n and n >= len(found):
        raise RecipeError(
            f"data.eval_examples: {n} held-out rows leave none to train on ({len(found)} usable rows); "
            "lower it or add rows"
        )
    held = hold_out_by_prompt([prompt_key(r) for r in found.rows], n) if n else [False] * len(found)
    train = Rows([], [], Counter(found.dropped))
    out = Rows([], [])
    for row, origin, is_held in zip(found.rows, found.origins, held):
        side = out if is_held else train
        side.rows.append(row)
        side.origins.append(origin)
    return train, out


def pack_blocks(docs: list[list[int]], block_size: int, eos_id: int) -> tuple[list[list[int]], int]:
    """Concatenate documents, each followed by EOS, and cut fixed blocks of `block_size`.

    Returns (blocks, leftover) where leftover counts the tokens of the final partial block,
    which is dropped.
    """
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        if not ids or ids[-1] != eos_id:
            stream.append(eos_id)
    n = len(stream) // block_size
    return [stream[i * block_size : (i + 1) * block_size] for i in range(n)], len(stream) - n * block_size
