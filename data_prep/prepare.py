"""Read, normalise, clean, mix and split sources into the canonical form; account for every row.

`prepare(options)` runs the whole chain and returns the splits and a summary:

    read (read.py) -> parse the shape (shapes.py) -> row checks -> deduplicate -> token lengths
    -> (binary) keep_desirable -> weighted sampling -> split by prompt hash

Every row read is either kept (in train or test) or dropped under a named reason, so for each
source and in total:  kept + sum(dropped) = rows read + sum(extra), where `extra` counts rows
made beyond one per input row (several pairs from one ranked list, copies from a weight > 1).
With `strict`, the first drop is an error naming the row's file and line.

Parsing, the row checks and the keys need no other row, so for a long source worker processes
do them (`num_proc`); deduplication and the accounting stay in this process, in input order.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import unicodedata
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path

from tqdm.auto import tqdm

from alignment.config import PrepColumns, PrepOptions, PrepSource

from .read import Bad, DataError, read_source, split_problem
from .shapes import KIND_SHAPES, absent_columns, check_columns, detect_shape, extra_reason, is_generated, make_parser

try:  # orjson serialises about 5x faster; the standard library is the fallback
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(value) -> bytes:
        return json.dumps(value, ensure_ascii=False).encode()


DEMO_ROWS = 4000
DETECT_ROWS = 100  # shape detection looks at the columns of the first rows
CHUNK_ROWS = 2_000  # rows sent to a worker process at a time (num_proc > 1)
PARALLEL_ROWS = 20_000  # num_proc None: a source this long is parsed by worker processes
AUTO_PROCS = 2  # num_proc None: at most this many workers (the main process is then the bottleneck)


@dataclass
class Tally:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)

    def balanced(self) -> bool:
        return self.kept + sum(self.dropped.values()) == self.read + sum(self.extra.values())

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "extra": dict(self.extra)}


@dataclass
class Prepared:
    kind: str
    splits: dict[str, list[dict]]
    summary: dict


# --------------------------------------------------------------------------- pure pieces


def normalise_text(text: str) -> str:
    """Unicode NFKC, case folded, whitespace collapsed: what 'the same text' means for dedup and splits."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split())


def messages_key(messages: list[dict]) -> str:
    """Messages as one normalised string. The separators are surrounded by spaces, which the
    whitespace collapsing makes canonical, so one normalisation covers every message."""
    return normalise_text(" \x00 ".join([m["role"] + " \x01 " + m["content"] for m in messages]))


def prompt_key(row: dict) -> str:
    """The normalised prompt a row belongs to: pairs' prompt, a conversation up to its first
    assistant turn, or the text itself. Rows with the same key go to the same split."""
    if "prompt" in row:
        return messages_key(row["prompt"])
    if "messages" in row:
        msgs = row["messages"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
        return messages_key(msgs[:first])
    return normalise_text(row["text"])


def unit_hash(key: str, salt: int | str = 0) -> float:
    """A fixed number in [0, 1) for a key: the same on every machine and Python run."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def exact_key(row: dict) -> bytes:
    """The row's content (not its id or scores) as bytes: equal bytes, exact duplicates."""
    if "completion" in row:
        return _dumps((row["prompt"], row["completion"], row["label"]))
    if "prompt" in row:
        return _dumps((row["prompt"], row["chosen"], row["rejected"]))
    return _dumps(row["messages"] if "messages" in row else row["text"])


_BETWEEN = [{"role": "\x03", "content": ""}]  # between chosen and rejected in normalised_key


def normalised_key(row: dict, prompt: str) -> str:
    """`prompt` (its prompt_key) plus the rest of the row, normalised (a binary row's label included:
    the same reply judged both ways is two rows)."""
    if "completion" in row:
        return prompt + " \x02 " + messages_key(row["completion"]) + (" \x04 up" if row["label"] else " \x04 down")
    if "prompt" in row:
        return prompt + " \x02 " + messages_key(row["chosen"] + _BETWEEN + row["rejected"])
    return messages_key(row["messages"]) if "messages" in row else prompt


def row_problem(row: dict, max_turns: int | None = None) -> str | None:
    """Empty text, chosen identical to rejected, too many turns: the checks every canonical row gets.
    A generated row's replies may be empty (`shapes.is_generated`: the model stopped at once); its
    prompt may not."""
    may_be_empty = is_generated(row)
    if "completion" in row:
        for m in row["prompt"]:
            if m["role"] != "system" and not m["content"].strip():
                return "empty 'prompt'"
        if not row["completion"][-1]["content"].strip() and not may_be_empty:
            return "empty 'completion'"
        turns = row["prompt"]
    elif "prompt" in row:
        for m in row["prompt"]:
            if m["role"] != "system" and not m["content"].strip():
                return "empty 'prompt'"
        chosen, rejected = row["chosen"][-1]["content"].strip(), row["rejected"][-1]["content"].strip()
        if not chosen and not may_be_empty:
            return "empty 'chosen'"
        if not rejected and not may_be_empty:
            return "empty 'rejected'"
        if chosen == rejected and [m["content"].strip() for m in row["chosen"][:-1]] == [
            m["content"].strip() for m in row["rejected"][:-1]
        ]:
            return "'chosen' identical to 'rejected'"
        turns = row["prompt"]
    elif "messages" in row:
        if any(m["role"] == "assistant" and not m["content"].strip() for m in row["messages"]):
            return "empty assistant turn"
        turns = row["messages"]
    else:
        return "empty 'text'" if not row["text"].strip() else None
    if max_turns is not None and sum(m["role"] == "user" for m in turns) > max_turns:
        return f"more than {max_turns} turns"
    return None


def hold_out_by_prompt(keys: list[str], n: int, salt: int | str = "eval") -> list[bool]:
    """Which rows to hold out: whole prompts in the order of their hash until the next would pass `n` rows.

    Independent of row order; a prompt's rows are all on one side.
    """
    sizes = Counter(keys)
    held: set[str] = set()
    total = 0
    for key in sorted(sizes, key=lambda k: unit_hash(k, salt)):
        if total + sizes[key] <= n:
            held.add(key)
            total += sizes[key]
        if total == n:
            break
    return [k in held for k in keys]


def token_lengths(tokenizer, texts: list[str], batch_size: int = 8192) -> list[int]:
    """Token count of each text (no special tokens). Each distinct text is encoded once, by the
    Rust tokenizer directly when there is one (in parallel, without building Python id lists)."""
    unique = list(dict.fromkeys(texts))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: half the time
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    counts: list[int] = []
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        if backend is not None:
            counts.extend(len(e) for e in encode(batch, add_special_tokens=False))
        else:
            counts.extend(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    found = dict(zip(unique, counts))
    return [found[t] for t in texts]


# --------------------------------------------------------------------------- sources


def source_name(source: PrepSource) -> str:
    if source.name:
        return source.name
    if source.path == "demo":
        return "demo"
    name = Path(source.path).name or source.path
    for ext in (".jsonl.gz", ".jsonl", ".json", ".csv", ".parquet"):
        name = name.removesuffix(ext)
    return name


def source_rows(source: PrepSource, kind: str, seed: int, world_name: str = "default"):
    """(origin, row or Bad) of a source; 'demo' generates the rows of the kind of the demo world's
    preset `world_name`. A split other than train asked of a file or of 'demo' is refused (a split
    names a part of a hub dataset or a saved DatasetDict; a file's rows are one)."""
    if problem := split_problem(source.path, source.split):
        raise DataError(f"{source.path}: split {problem}")
    if source.path != "demo":
        rows = read_source(source.path, source.split)
        return islice(rows, source.num_examples) if source.num_examples else rows
    from alignment.demo import world

    n, w = source.num_examples or DEMO_ROWS, world.preset(world_name)
    made = {
        "pairs": lambda: w.preference_pairs(n, seed),
        "binary": lambda: w.preference_pairs(n, seed),  # each pair: one desirable and one undesirable row
        "sft": lambda: w.sft_conversations(n, seed),
        "text": lambda: [{"text": t} for t in w.pretrain_corpus(n, seed)],
    }[kind]()
    return ((f"demo row {i + 1}", row) for i, row in enumerate(made))


# --------------------------------------------------------------------------- the chain


class _Run:
    """State of one prepare() call: rows so far, where they came from, and the tallies."""

    def __init__(self, options: PrepOptions):
        self.o = options
        self.rows: list[dict] = []
        self.origins: list[str] = []
        self.owner: list[str] = []  # source name of each row
        self.places: list[float] = []  # unit_hash of each row's prompt_key: the split (test below test_fraction)
        self.tallies: dict[str, Tally] = {}
        self.repeats: dict[bytes, int] = {}  # a generated row's exact key -> its earlier copies
        self.repeated: Counter = Counter()  # source -> generated rows repeating an earlier one (kept)

    def drop(self, name: str, origin: str, reason: str, detail: str = "") -> None:
        if self.o.strict:
            raise DataError(f"{origin}: {reason}{f' ({detail})' if detail else ''} (strict: no row may be dropped)")
        self.tallies[name].dropped[reason] += 1

    def keep_only(self, keep: list[bool], reason_of) -> None:
        """Remove the rows whose `keep` is False, each counted under `reason_of(i)`."""
        for i, ok in enumerate(keep):
            if not ok:
                self.drop(self.owner[i], self.origins[i], reason_of(i))
        self.rows = [r for r, ok in zip(self.rows, keep) if ok]
        self.origins = [r for r, ok in zip(self.origins, keep) if ok]
        self.owner = [r for r, ok in zip(self.owner, keep) if ok]
        self.places = [r for r, ok in zip(self.places, keep) if ok]


def prepare(
    options: PrepOptions,
    tokenizer=None,
    progress: bool = True,
    given: dict | None = None,
    num_proc: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    world: str = "default",
) -> Prepared:
    """Run the chain; `tokenizer` (a transformers tokenizer) is needed for the token limits.
    `world` is the demo-world preset 'demo' sources are drawn from.
    `given` maps a source name to rows already made, (origin, row or Bad) (on-policy pairs).
    With `num_proc` > 1, that many worker processes parse and check the rows, `chunk_rows` at a
    time; deduplication, accounting and the split stay here, in input order, so the output is the
    same byte for byte. None: AUTO_PROCS workers (fewer on fewer CPUs) for a source of at least
    PARALLEL_ROWS rows, this process alone for a shorter one (starting workers would cost more)."""
    with _gc_paused():
        return _prepare(options, tokenizer, progress, given, num_proc, chunk_rows, world)


def _prepare(o: PrepOptions, tokenizer, progress: bool, given: dict | None, num_proc: int | None, chunk_rows: int,
             world: str = "default") -> Prepared:
    if (o.max_prompt_tokens or o.max_length) and tokenizer is None:
        raise DataError("max_prompt_tokens / max_length count tokens: give a tokenizer (--tokenizer PATH)")
    run = _Run(o)
    seen_exact: dict[bytes, str] = {}  # digest of a kept row's key -> its origin
    seen_norm: dict[bytes, str] = {}
    names = [source_name(s) for s in o.sources]
    if len(set(names)) != len(names):
        raise DataError(f"two sources are named the same ({', '.join(names)}); give them names")

    for source, name in zip(o.sources, names):
        run.tallies[name] = Tally()
        ours = bool(given and name in given)  # rows made here (sampled), not read from the user's file
        rows = iter(given[name] if ours else source_rows(source, o.kind, o.seed, world))
        head = []  # the first DETECT_ROWS rows, and on until one is readable
        whole = True  # the head holds every row of the source
        for item in rows:
            head.append(item)
            if len(head) >= DETECT_ROWS and any(isinstance(r, dict) for _, r in head):
                whole = False
                break
        columns = set().union(*(r.keys() for _, r in head if isinstance(r, dict)))
        where = source.path if source.path != "demo" else "demo"
        shape = source.shape
        if not columns:  # no readable row at all: each is counted under its reason
            shape = shape if shape != "auto" else KIND_SHAPES[o.kind][0]
        elif shape == "auto":
            shape = detect_shape(columns, source.columns, KIND_SHAPES[o.kind], where)
        elif shape not in KIND_SHAPES[o.kind]:
            raise DataError(f"{where}: shape '{shape}' does not make {o.kind} (expected {', '.join(KIND_SHAPES[o.kind])})")
        check_columns(shape, source.columns)  # here, before any worker process parses with them
        forced = source.shape != "auto"
        if whole and not ours and (absent := absent_columns(shape, source.columns, columns, forced, where)):
            raise absent  # before parsing (and before --strict stops on the first row without them)
        seen = set(columns)  # every column of every row: checked again once all are read
        procs = num_proc
        if procs is None:  # enough rows to pay for starting processes?
            head.extend(islice(rows, max(0, PARALLEL_ROWS - len(head))))
            procs = min(AUTO_PROCS, usable_cpus()) if len(head) >= PARALLEL_ROWS else 1
        with _normaliser(procs, chunk_rows, shape, source.columns, name, o) as normalise:
            results = normalise(_noting_columns(chain(head, rows), seen))
            with tqdm(results, desc=f"read {name}", unit=" rows", disable=not progress, mininterval=0.5) as bar:
                _keep_or_drop(run, name, bar, seen_exact, seen_norm, extra_reason(shape, o.kind))
        if not whole and not ours and (absent := absent_columns(shape, source.columns, seen, forced, where)):
            raise absent

    if o.max_prompt_tokens or o.max_length:
        _token_limits(run, tokenizer)
    if o.kind == "binary" and o.keep_desirable < 1:
        keep = [not row["label"] or unit_hash(row["id"], f"keep-{o.seed}") < o.keep_desirable for row in run.rows]
        run.keep_only(keep, lambda i: f"desirable not kept (keep_desirable {o.keep_desirable:g})")
    weights = {name: s.weight for s, name in zip(o.sources, names)}
    if any(w != 1.0 for w in weights.values()):
        _sample_by_weight(run, weights)

    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for row, owner, place in zip(run.rows, run.owner, run.places):
        side = "test" if place < o.test_fraction else "train"
        splits[side].append(row)
        run.tallies[owner].kept += 1
    if not o.test_fraction:
        del splits["test"]
    return Prepared(o.kind, splits, _summary(o, run, names, splits))


def _noting_columns(items, seen: set):
    """The (origin, row) items, each readable row's columns added to `seen` as it passes."""
    for item in items:
        if isinstance(item[1], dict):
            seen.update(item[1])
        yield item


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused: a run makes millions of small objects without
    cycles (reference counting frees them), and the collector's passes over the growing heap
    took a quarter to a third of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------- per-row work, in one or several processes


def _row_results(parse, name: str, o: PrepOptions, row: dict | Bad) -> Bad | str | list:
    """What one input row becomes before deduplication (which is the only step that needs the
    other rows): the Bad or the parser's drop reason, or for each canonical row made from it
    either its problem or (row, unit_hash of its prompt key for the split, digest of its exact key,
    digest of its normalised key or None). Digests (128-bit) keep what crosses between processes,
    and the memory of what was seen, small."""
    if isinstance(row, Bad):
        return row
    made = parse(row)
    if isinstance(made, str):
        return made
    results = []
    for item in made:
        problem = row_problem(item, o.max_turns)
        if problem:
            results.append(problem)
            continue
        key = prompt_key(item)
        exact = exact_key(item)
        item["source"] = name
        if item["id"] is None:
            item["id"] = hashlib.blake2b(exact, digest_size=8).hexdigest()
        norm = _digest(normalised_key(item, key).encode()) if o.dedup == "normalised" else None
        results.append((item, unit_hash(key, o.split_seed), _digest(exact), norm))
    return results


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _row_work(shape: str, columns: PrepColumns, name: str, o: PrepOptions):
    """_row_results for one source: a function row -> results."""
    return partial(_row_results, make_parser(shape, columns, o), name, o)


_work = None  # a worker process's _row_work, set by _start_worker


def _start_worker(*args) -> None:
    global _work
    gc.disable()  # as in the parent (see _gc_paused); the process ends with the pool
    _work = _row_work(*args)


def _work_chunk(chunk: list) -> list:
    return [(origin, _work(row)) for origin, row in chunk]


def _chunks(rows, size: int):
    while chunk := list(islice(rows, size)):
        yield chunk


@contextmanager
def _normaliser(num_proc: int, chunk_rows: int, *work_args):
    """A function (origin, row) pairs -> (origin, _row_results) pairs in input order: worked out
    here when num_proc is 1, else by `num_proc` worker processes, `chunk_rows` rows at a time."""
    if num_proc <= 1:
        work = _row_work(*work_args)
        yield lambda rows: ((origin, work(row)) for origin, row in rows)
        return
    with _worker_pool(num_proc, work_args) as pool:
        yield lambda rows: chain.from_iterable(pool.imap(_work_chunk, _chunks(rows, chunk_rows)))


def _worker_pool(num_proc: int, work_args: tuple):
    """Worker processes, forked where the platform can (nothing is imported again). They never
    tokenize, so a tokenizer's thread pool in this process is no concern (tokenizers 0.23 neither
    warns nor disables its parallelism here after a fork; checked)."""
    fork = "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if fork else None).Pool(num_proc, _start_worker, work_args)


def _keep_or_drop(run: _Run, name: str, results, seen_exact: dict, seen_norm: dict,
                  extra: str = "more pairs from one ranked list") -> None:
    """Count one source's rows, deduplicate, and keep the rest in `run`, in input order; rows made
    beyond one per input row are counted as `extra`."""
    dedup = run.o.dedup
    tally = run.tallies[name]
    for origin, result in results:
        tally.read += 1
        if isinstance(result, Bad):
            run.drop(name, origin, result.reason, result.detail)
            continue
        if isinstance(result, str):
            run.drop(name, origin, result)
            continue
        if len(result) > 1:
            tally.extra[extra] += len(result) - 1
        for entry in result:
            if isinstance(entry, str):
                run.drop(name, origin, entry)
                continue
            item, place, exact, norm = entry
            if is_generated(item):
                # a reply the model sampled again is not a copy of a row: how often the policy says it is part of
                # the data (KTO's expectation is over the policy's outputs; deduplicating would weigh a rare reply
                # like a frequent one). Kept, with an id of its own, and counted.
                repeat = run.repeats[exact] = run.repeats.get(exact, -1) + 1
                if repeat:
                    item["id"] = f"{item['id']}-{repeat}"
                    run.repeated[name] += 1
            elif dedup != "none":
                if exact in seen_exact:
                    run.drop(name, origin, "exact duplicate", f"of {seen_exact[exact]}")
                    continue
                seen_exact[exact] = origin
            if norm is not None and not is_generated(item):
                if norm in seen_norm:
                    run.drop(name, origin, "duplicate after normalisation", f"of {seen_norm[norm]}")
                    continue
                seen_norm[norm] = origin
            run.places.append(place)
            run.rows.append(item)
            run.origins.append(origin)
            run.owner.append(name)


def _token_limits(run: _Run, tokenizer) -> None:
    o = run.o
    texts, spans = [], []
    for row in run.rows:
        start = len(texts)
        if "completion" in row:
            texts.extend(m["content"] for m in row["prompt"])
            spans.append((start, len(texts), len(texts) + 1))
            texts.append(row["completion"][-1]["content"])
        elif "prompt" in row:
            texts.extend(m["content"] for m in row["prompt"])
            spans.append((start, len(texts), len(texts) + 2))
            texts += [row["chosen"][-1]["content"], row["rejected"][-1]["content"]]
        else:
            texts.extend([m["content"] for m in row["messages"]] if "messages" in row else [row["text"]])
            spans.append((start, len(texts), len(texts)))
    lengths = token_lengths(tokenizer, texts)
    reasons = []
    for a, b, c in spans:
        prompt = sum(lengths[a:b])
        total = prompt + max(lengths[b:c], default=0)
        if o.max_prompt_tokens and b < c and prompt > o.max_prompt_tokens:
            reasons.append(f"prompt longer than {o.max_prompt_tokens} tokens")
        elif o.max_length and total > o.max_length:
            reasons.append(f"longer than {o.max_length} tokens")
        else:
            reasons.append(None)
    run.keep_only([r is None for r in reasons], lambda i: reasons[i])


def _sample_by_weight(run: _Run, weights: dict[str, float]) -> None:
    """Weight w: each row is written floor(w) times, plus once more with probability w - floor(w),
    decided by a fixed hash of its id, so that reruns give the same mix."""
    rows, origins, owner, places = [], [], [], []
    for row, origin, name, place in zip(run.rows, run.origins, run.owner, run.places):
        w = weights[name]
        copies = int(w) + (unit_hash(row["id"], f"weight-{run.o.seed}") < w - int(w))
        if copies == 0:
            run.drop(name, origin, f"not sampled (weight {w:g})")
        elif copies > 1:
            run.tallies[name].extra[f"repeated (weight {w:g})"] += copies - 1
        for k in range(copies):
            rows.append(row if k == 0 else {**row, "id": f"{row['id']}#{k + 1}"})
            origins.append(origin)
            owner.append(name)
            places.append(place)
    run.rows, run.origins, run.owner, run.places = rows, origins, owner, places


def _summary(o: PrepOptions, run: _Run, names: list[str], splits: dict) -> dict:
    total = Tally()
    for t in run.tallies.values():
        total.read += t.read
        total.kept += t.kept
        total.dropped.update(t.dropped)
        total.extra.update(t.extra)
    for name, t in [*run.tallies.items(), ("total", total)]:
        if not t.balanced():  # a bug, never the data's fault
            raise AssertionError(f"accounting of {name} does not balance: {t.as_dict()}")
    return {
        "written_by": "data_prep",
        "kind": o.kind,
        "rows_read": total.read,
        "kept": total.kept,
        "dropped": dict(total.dropped.most_common()),
        "extra": dict(total.extra),
        "splits": {k: len(v) for k, v in splits.items()},
        **({"labels": {k: label_counts(v) for k, v in splits.items()}} if o.kind == "binary" else {}),
        "system_turns": {k: system_turn_rows(v) for k, v in splits.items()},
        "empty_replies": empty_replies([row for rows in splits.values() for row in rows]),
        "repeated_samples": dict(run.repeated),
        "sources": {name: run.tallies[name].as_dict() for name in names},
        "options": o.model_dump(mode="json"),
    }


def system_turn_rows(rows: list[dict]) -> int:
    """Rows with a system turn: a model whose chat template refuses system turns (Gemma-2, Mistral-Instruct)
    gets them merged into the next user turn, dropped or refused at training (`data.system_message`)."""
    def turns(row):
        found = row.get("messages") or row.get("prompt") or []
        return found if isinstance(found, list) else []

    return sum(any(isinstance(m, dict) and m.get("role") == "system" for m in turns(r)) for r in rows)


def empty_replies(rows: list[dict]) -> dict[str, int]:
    """Source -> kept rows with an empty reply (chosen, rejected or completion), which only generated
    rows may have: sampled replies where the model stopped at once."""
    found: Counter = Counter()
    for row in rows:
        replies = [row[k] for k in ("chosen", "rejected", "completion") if k in row]
        if any(not reply[-1]["content"].strip() for reply in replies):
            found[row["source"]] += 1
    return dict(found)


def label_counts(rows: list[dict]) -> dict:
    """Desirable and undesirable binary rows (the KTO balance)."""
    desirable = sum(bool(r["label"]) for r in rows)
    return {"desirable": desirable, "undesirable": len(rows) - desirable}


def summary_text(summary: dict) -> str:
    """The summary as a few readable lines (what the command prints)."""
    lines = [
        f"rows read {summary['rows_read']}, kept {summary['kept']} "
        + "(" + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()) + ")"
    ]
    lines += [f"  labels   {split}: {c['desirable']} desirable, {c['undesirable']} undesirable"
              for split, c in summary.get("labels", {}).items()]
    systems = {k: v for k, v in summary.get("system_turns", {}).items() if v}
    if systems:
        lines.append("  system turns: " + ", ".join(f"{k} {v} rows" for k, v in systems.items())
                     + " (a chat template that refuses them: data.system_message merges, drops or refuses them)")
    lines += [f"  empty replies kept: {name} {n} rows (sampled replies where the model stopped at once)"
              for name, n in summary.get("empty_replies", {}).items()]
    lines += [f"  repeated samples kept: {name} {n} rows (a reply the model sampled more than once)"
              for name, n in summary.get("repeated_samples", {}).items()]
    lines += [f"  dropped  {v:>7}  {k}" for k, v in summary["dropped"].items()]
    lines += [f"  extra   +{v:>7}  {k}" for k, v in summary["extra"].items()]
    if len(summary["sources"]) > 1:
        for name, t in summary["sources"].items():
            lines.append(f"  source {name}: read {t['read']}, kept {t['kept']}, dropped {sum(t['dropped'].values())}")
    dropped = sum(summary["dropped"].values())
    extra = sum(summary["extra"].values())
    lines.append(f"  check: kept {summary['kept']} + dropped {dropped} = read {summary['rows_read']} + extra {extra}")
    return "\n".join(lines)
