"""The one reader of data files: every source the toolkit reads goes through `read_source`.

Sources: a local `.jsonl`, `.jsonl.gz`, `.json`, `.csv` or `.parquet` file, a directory
written by `datasets.save_to_disk` or by `python -m data_prep` / the `prep` stage, or a hub
dataset id (optionally `id:config`). Extensions are matched exactly (lower case), so a JSONL
file named `.txt` or `.JSONL` is an error that says which extensions are read.

Every row comes with its origin (`file:line` for JSONL and CSV, `file row N` otherwise).
A line that cannot be a row (not JSON, a truncated last line, a ragged CSV row) is a `Bad`
item: the caller stops on it or counts it as a drop. Whole-file problems (missing, empty,
binary, not UTF-8, not decompressible) are one-line `DataError`s naming the file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from alignment.errors import RecipeError

try:  # orjson parses JSON lines about 3x faster; the standard library is the fallback
    import orjson

    _loads = orjson.loads
    _JSONError: tuple = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    _JSONError = (json.JSONDecodeError,)

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
READ = ".jsonl, .jsonl.gz, .json, .csv, .parquet, a save_to_disk or data_prep directory, or a hub dataset id"


class DataError(RecipeError):
    """A data source cannot be read or a row breaks a rule under --strict; the message is one line."""


@dataclass
class Bad:
    """A line that is not a row, with the reason it is counted under."""

    reason: str
    detail: str = ""


def _suffix(path: Path) -> str:
    name = path.name
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix


def looks_like_path(source: str) -> bool:
    """A source that names a local file or directory rather than a hub dataset id."""
    return (
        Path(source).exists()
        or source.startswith((".", "/", "~"))
        or any(source.lower().endswith(ext) for ext in (*EXTENSIONS, ".txt", ".gz", ".tsv", ".arrow"))
    )


def split_problem(source: str, split: str) -> str | None:
    """Why `split` cannot be read from `source`: a split other than train names a part of a hub
    dataset or a saved DatasetDict (or a data_prep output's test.jsonl); a file is one split, and a
    split given with one would be ignored. None when it can be read."""
    if split == "train" or (looks_like_path(source) and Path(source).expanduser().is_dir()):
        return None
    if source == "demo" or looks_like_path(source):
        what = "the demo data (generated, one split)" if source == "demo" else f"the file {source} (a file is one split)"
        return (f"'{split}' applies only to a hub dataset or a saved DatasetDict (or a data_prep output directory), "
                f"not to {what}: leave the split out")
    return None


def read_source(source: str, split: str = "train") -> Iterator[tuple[str, dict | Bad]]:
    """Yield (origin, row or Bad) for every row of `source`; raise DataError for whole-file problems
    (a split other than train asked of a file included: see split_problem)."""
    if source != "demo" and (problem := split_problem(source, split)):
        raise DataError(f"split: {problem}")
    if not looks_like_path(source):
        yield from _read_hub(source, split)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _read_directory(path, split)
        return
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = _suffix(path)
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}: unsupported file type '{suffix or path.name}' (read: {READ}; extensions are lower case)")
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    text = read_text(path, gz=suffix == ".jsonl.gz")
    if suffix in (".jsonl", ".jsonl.gz"):
        yield from _read_jsonl_text(path, text)
    elif suffix == ".json":
        yield from _read_json_text(path, text)
    else:
        yield from _read_csv_text(path, text)


def read_text(path: Path, gz: bool = False) -> str:
    """The file's text, with one-line errors for empty, binary, undecompressible or non-UTF-8 files."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if gz:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: cannot decompress, not a complete gzip file ({exc})") from None
    if not raw.strip():
        raise DataError(f"{path}: empty file (no rows)")
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path}: binary file, expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None


def _read_jsonl_text(path: Path, text: str) -> Iterator[tuple[str, dict | Bad]]:
    lines = text.split("\n")
    last = len(lines) - 1  # the text after the final newline ("" when the file ends with one)
    name = str(path)
    for i, line in enumerate(lines):
        if not line or line.isspace():
            continue
        where = f"{name}:{i + 1}"
        try:
            row = _loads(line)
        except _JSONError as exc:
            if i == last:
                yield where, Bad("truncated last line", "the file ends inside a JSON object")
            else:
                yield where, Bad("not valid JSON", str(exc).split(":")[0])
            continue
        yield where, row if isinstance(row, dict) else Bad("row is not a JSON object", type(row).__name__)


def _read_json_text(path: Path, text: str) -> Iterator[tuple[str, dict | Bad]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file, as `datasets` also accepts
            yield from _read_jsonl_text(path, text)
            return
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: columns have different lengths {sorted(lengths)}")
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or an object of column lists, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: empty file (no rows)")
    maybe_surrogates = _SURROGATE.search(text) is not None  # an escape \ud800-\udfff: a lone one is no text
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            row = Bad("row is not a JSON object", type(row).__name__)
        elif maybe_surrogates and _lone_surrogate(row):
            row = Bad("not valid JSON", "a lone surrogate escape, which is no Unicode text")  # as orjson says of a JSONL line
        yield f"{path} row {i + 1}", row


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(row: dict) -> bool:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_csv_text(path: Path, text: str) -> Iterator[tuple[str, dict | Bad]]:
    csv.field_size_limit(2**31 - 1)  # the default 131,072 characters is shorter than many a real reply
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{path}: empty file (no header row)")
    rows = 0
    line = reader.line_num
    for cells in reader:
        where = f"{path}:{line + 1}"
        line = reader.line_num
        if not "".join(cells).strip() and len(cells) < 2:  # an empty line, as between JSONL rows
            continue
        rows += 1
        if not any(c.strip() for c in cells):
            yield where, Bad("blank CSV row", "every cell is empty")
            continue
        if len(cells) != len(header):
            yield where, Bad("ragged CSV row", f"{len(cells)} fields, the header has {len(header)}")
            continue
        yield where, dict(zip(header, (_cell(c) for c in cells)))
    if not rows:
        raise DataError(f"{path}: empty file (a header and no rows)")


def _cell(text: str):
    """CSV cells are text; a cell holding chat messages as JSON (a list of {role, content}) is
    parsed. Any other text stays text, even when it reads as JSON (a reply "[1, 2, 3]"); a
    column that must be a list (ratings, completions, ranked) is parsed where the shape reads it."""
    stripped = text.strip()
    if stripped[:1] == "[":
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            return value
    return text


def _read_parquet(path: Path) -> Iterator[tuple[str, dict | Bad]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...: all mean "not a readable parquet file"
        raise DataError(f"{path}: cannot read as Parquet ({str(exc).splitlines()[0]})") from None
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    for i, row in enumerate(rows):
        yield f"{path} row {i + 1}", row


def _read_directory(path: Path, split: str) -> Iterator[tuple[str, dict | Bad]]:
    """A data_prep output (`<split>.jsonl` beside `summary.json`) or a `save_to_disk` directory."""
    if (path / "summary.json").is_file() and (path / "train.jsonl").is_file():
        target = path / f"{split}.jsonl"
        if not target.is_file():
            raise DataError(f"{path}: data_prep output has no '{split}' split ({target.name} missing)")
        yield from _read_jsonl_text(target, read_text(target))
        return
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError...
        raise DataError(f"{path}: not a data_prep or save_to_disk directory ({str(exc).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path} row {i + 1}", row


def _read_hub(source: str, split: str) -> Iterator[tuple[str, dict | Bad]]:
    import datasets

    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # offline, unknown id, missing config: one line either way
        raise DataError(f"{source}: cannot load hub dataset ({str(exc).splitlines()[0]})") from None
    for i, row in enumerate(ds):
        yield f"{source} row {i + 1}", row
