"""Dataset loading, row checking and per-stage preparation.

Rows come from the demo world, a local file (.jsonl, .json, .csv, .parquet), a directory
written by `datasets.save_to_disk`, or a hub dataset id. Every row keeps its origin
(`file:line`) so that a malformed one is reported where it is. Depending on the recipe's
`data.on_bad_row`, a malformed row stops the run or is dropped and counted by reason:
no row disappears without a count.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import DataOptions, RecipeError

DemoFactory = Callable[[int, int], list[dict]]


@dataclass
class Rows:
    rows: list[dict]
    origins: list[str]
    dropped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)


def _read_jsonl(path: Path) -> Rows:
    rows, origins = [], []
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            rows.append(row)
            origins.append(f"{path}:{number}")
    return Rows(rows, origins)


def _read_with_datasets(source: str, split: str) -> Rows:
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.suffix in (".json", ".csv", ".parquet"):
            ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many kinds; all mean "cannot read this source"
        raise RecipeError(f"data.source '{source}': cannot load ({str(exc).splitlines()[0]})") from None
    return Rows(list(ds), [f"{source} row {i + 1}" for i in range(len(ds))])


def load_rows(options: DataOptions, demo: DemoFactory, default_examples: int) -> Rows:
    """Read the recipe's data source; `demo(n, seed)` makes rows when the source is 'demo'."""
    if options.source == "demo":
        rows = demo(options.num_examples or default_examples, options.seed)
        return Rows(rows, [f"demo row {i + 1}" for i in range(len(rows))])
    path = Path(options.source)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise RecipeError(f"data.source: no such file {path}")
        found = _read_jsonl(path)
    else:
        found = _read_with_datasets(options.source, options.split)
    if options.num_examples is not None:
        found = Rows(found.rows[: options.num_examples], found.origins[: options.num_examples])
    return found


def check_rows(found: Rows, problem: Callable[[dict], str | None], on_bad_row: str) -> Rows:
    """Keep the rows for which `problem(row)` is None; stop on, or count, the others."""
    kept = Rows([], [], Counter(found.dropped))
    for row, origin in zip(found.rows, found.origins):
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


def preference_problem(
    prompt_field: str, chosen_field: str, rejected_field: str, margin_field: str | None = None
) -> Callable[[dict], str | None]:
    """Check a preference row: three non-empty strings, chosen != rejected, and a numeric margin if asked."""

    def problem(row: dict) -> str | None:
        for name in (prompt_field, chosen_field, rejected_field):
            if name not in row or row[name] is None:
                return f"missing '{name}'"
            if not isinstance(row[name], str):
                return f"'{name}' is not a string"
            if not row[name].strip():
                return f"empty '{name}'"
        if row[chosen_field].strip() == row[rejected_field].strip():
            return f"'{chosen_field}' identical to '{rejected_field}'"
        if margin_field is not None:
            margin = row.get(margin_field)
            if margin is None:
                return f"missing '{margin_field}' (other rows have one)"
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                return f"'{margin_field}' is not a finite number"
        return None

    return problem


def has_column(found: Rows, name: str) -> bool:
    """Whether any row carries `name` (an optional column such as a reward margin)."""
    return any(isinstance(row, dict) and row.get(name) is not None for row in found.rows)


def hold_out(found: Rows, n: int) -> tuple[Rows, Rows]:
    """Split off the last `n` rows as a held-out set: (train, held_out)."""
    if n and n >= len(found):
        raise RecipeError(
            f"data.eval_examples: {n} held-out rows leave none to train on ({len(found)} usable rows); "
            "lower it or add rows"
        )
    cut = len(found) - n
    train = Rows(found.rows[:cut], found.origins[:cut], Counter(found.dropped))
    return train, Rows(found.rows[cut:], found.origins[cut:])


def preference_conversations(found: Rows, prompt_field: str, chosen_field: str, rejected_field: str) -> dict:
    """Columns in the conversational preference format TRL's trainers render with the chat template.

    prompt = [user message], chosen / rejected = [assistant message]; the template closes the
    assistant turn (with EOS for the toolkit's default), so a model learns where replies end.
    """
    return {
        "prompt": [[{"role": "user", "content": r[prompt_field]}] for r in found.rows],
        "chosen": [[{"role": "assistant", "content": r[chosen_field]}] for r in found.rows],
        "rejected": [[{"role": "assistant", "content": r[rejected_field]}] for r in found.rows],
    }


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
