"""Write prepared splits as JSONL and Parquet plus summary.json, all or nothing.

Output directory (`--out` or the prep stage's output):

    train.jsonl, train.parquet     the canonical rows (see shapes.py): pairs, binary rows, conversations or text;
                                   rows of sampled replies also have `generated: true`
    test.jsonl, test.parquet       held-out prompts (when test_fraction > 0)
    summary.json                   the accounting: rows read, kept, dropped by reason, options

`datasets.load_dataset("json" | "parquet", data_files=...)`, TRL's trainers and the toolkit's
stages read these files as they are.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from alignment.paths import keep_foreign, output_problem, replace_dir, user_path

from .read import DataError

try:
    import orjson

    def line_bytes(row: dict) -> bytes:
        return orjson.dumps(row) + b"\n"
except ImportError:  # pragma: no cover - depends on the environment

    def line_bytes(row: dict) -> bytes:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode()


_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMAS = {
    "pairs": pa.schema(
        [
            ("prompt", _MESSAGES),
            ("chosen", _MESSAGES),
            ("rejected", _MESSAGES),
            ("score_chosen", pa.float64()),
            ("score_rejected", pa.float64()),
            ("source", pa.string()),
            ("id", pa.string()),
        ]
    ),
    "binary": pa.schema(
        [
            ("prompt", _MESSAGES),
            ("completion", _MESSAGES),
            ("label", pa.bool_()),
            ("score", pa.float64()),
            ("source", pa.string()),
            ("id", pa.string()),
        ]
    ),
    "sft": pa.schema([("messages", _MESSAGES), ("source", pa.string()), ("id", pa.string())]),
    "text": pa.schema([("text", pa.string()), ("source", pa.string()), ("id", pa.string())]),
}
OUR_FILES = ("train.jsonl", "train.parquet", "test.jsonl", "test.parquet", "summary.json")


def check_out_dir(out: Path, ours_only: bool = True, inputs: tuple[tuple[str, str], ...] = ()) -> None:
    """Fail before any work if `out` cannot be (re)written: a file, a directory of someone else's
    files (with `ours_only`), a place we may not write, or where an input is: `inputs` are
    (flag, path) of what the command reads; an output holding one, or inside one, would replace it."""
    if ours_only and out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise DataError(f"--out {out}: directory is not empty and was not written by data_prep; choose another")
    problem = output_problem(out)
    if problem:
        raise DataError(f"--out {out}: {problem}")
    where = out.resolve()
    for flag, value in inputs:
        path = Path(user_path(value)).resolve() if value and Path(user_path(value)).exists() else None
        if path is not None and (path == where or where in path.parents or path in where.parents):
            raise DataError(f"--out {out}: {'holds' if where in path.parents or path == where else 'lies inside'} "
                            f"the input {flag} {value}; writing there would replace it: choose another --out")


def is_ours(out: Path) -> bool:
    """Whether `out` holds an output of data_prep (its summary.json says so)."""
    try:
        return json.loads((out / "summary.json").read_text()).get("written_by") == "data_prep"
    except (OSError, ValueError, AttributeError):
        return False


def write_files(directory: Path, kind: str, splits: dict[str, list[dict]], summary: dict) -> list[str]:
    """Write every split and summary.json into an existing `directory`; return the file names."""
    names = []
    for split, rows in splits.items():
        lines = [line_bytes(r) for r in rows]
        with open(directory / f"{split}.jsonl", "wb") as fh:
            fh.writelines(lines)
        longest = max(map(len, lines), default=0)
        schema = SCHEMAS[kind]
        if any("generated" in r for r in rows):  # sampled replies: the column marks them (shapes.is_generated)
            schema = schema.append(pa.field("generated", pa.bool_()))
        pq.write_table(_table(directory / f"{split}.jsonl", longest, schema), directory / f"{split}.parquet")
        names += [f"{split}.jsonl", f"{split}.parquet"]
    summary = {**summary, "files": names}
    (directory / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return [*names, "summary.json"]


def _table(jsonl: Path, longest: int, schema: pa.Schema) -> pa.Table:
    """The rows as an Arrow table: the JSONL just written, parsed back by Arrow's C++ reader
    (about twice as fast as converting the Python objects; identical content). A block must
    hold the longest line."""
    if not longest:
        return pa.Table.from_pylist([], schema=schema)
    read = pa_json.ReadOptions(block_size=max(1 << 22, 2 * longest))
    return pa_json.read_json(jsonl, read_options=read, parse_options=pa_json.ParseOptions(explicit_schema=schema))


def write_atomic(out: Path, kind: str, splits: dict[str, list[dict]], summary: dict) -> list[str]:
    """Write into a hidden sibling directory, then swap it with `out` by two renames (old aside,
    new in): a reader, or a crash at any moment, sees the old output whole or the new one whole,
    never a mix. Files in `out` that data_prep did not write are carried into the new one."""
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = write_files(staging, kind, splits, summary)
        keep_foreign(out, staging, OUR_FILES)
        replace_dir(staging, out)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)
