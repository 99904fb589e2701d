"""Write prepared splits as JSONL and Parquet plus summary.json, all or nothing.

Output directory (`--out` or the prep stage's output):

    train.jsonl, train.parquet     the canonical rows (see shapes.py)
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
    "sft": pa.schema([("messages", _MESSAGES), ("source", pa.string()), ("id", pa.string())]),
    "text": pa.schema([("text", pa.string()), ("source", pa.string()), ("id", pa.string())]),
}
OUR_FILES = ("train.jsonl", "train.parquet", "test.jsonl", "test.parquet", "summary.json")


def check_out_dir(out: Path, ours_only: bool = True) -> None:
    """Fail before any work if `out` cannot be (re)written: a file, a directory of someone else's
    files (with `ours_only`), or a place we may not write."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; expected a directory to write into")
    if ours_only and out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "summary.json").read_text()).get("written_by") == "data_prep"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(f"--out {out}: directory is not empty and was not written by data_prep; choose another")
    parent = out if out.is_dir() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: cannot write in {parent} (permission denied)")


def write_files(directory: Path, kind: str, splits: dict[str, list[dict]], summary: dict) -> list[str]:
    """Write every split and summary.json into an existing `directory`; return the file names."""
    names = []
    for split, rows in splits.items():
        lines = [line_bytes(r) for r in rows]
        with open(directory / f"{split}.jsonl", "wb") as fh:
            fh.writelines(lines)
        longest = max(map(len, lines), default=0)
        pq.write_table(_table(directory / f"{split}.jsonl", longest, SCHEMAS[kind]), directory / f"{split}.parquet")
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
    """Write into a hidden sibling directory, then move the files into `out`: a reader never
    sees a half-written output, and files data_prep did not write are never touched."""
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = write_files(staging, kind, splits, summary)
        if not out.exists():
            staging.rename(out)
            return names
        for stale in set(OUR_FILES) - set(names):
            (out / stale).unlink(missing_ok=True)
        for name in names:
            os.replace(staging / name, out / name)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)
