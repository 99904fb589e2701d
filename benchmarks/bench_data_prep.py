"""Rows per second of data_prep on 100k generated transcript-format pairs.

    python benchmarks/bench_data_prep.py [--rows 100000]

Times read -> normalise (split each Human/Assistant transcript into prompt messages and the
final reply) -> clean (empty text, chosen == rejected, exact and normalised dedup, split by
prompt hash) -> write (JSONL + Parquet + summary.json), four ways in one process:

* data_prep, token-length filter off (by default rows are parsed by 2 worker processes)
* data_prep, token-length filter off, in one process (--num-proc 1)
* data_prep, token-length filter on (a BPE tokenizer trained here, max_length 256)
* peer: the same conversion written plainly with `datasets` (load_dataset("json"), map, filter,
  to_json, to_parquet), without dedup, hash split or accounting, so it does less work.

and prints rows/s for each and the ratios. Target: >= 20k rows/s on 2 cores, filter off.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

H, A = "\n\nHuman: ", "\n\nAssistant: "
WORDS = "cat dog sun map pen car red star frog nest bus van hat cup box egg owl fig jam kite".split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n two-turn transcript pairs; a few awkward rows (differing histories, empty replies, duplicates)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            words = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
            history = f"{H}Hello, I have a question {i % 20000}.{A}Sure! Ask away.{H}Please repeat: {words}{A}"
            chosen = f"Sure! {words}"
            rejected = " ".join(rng.sample(words.split(), len(words.split()))) + " and more and more"
            if i % 97 == 0:
                rejected = ""
            other = history if i % 89 else history.replace("Hello", "Hi")
            fh.write(json.dumps({"chosen": history + chosen, "rejected": other + rejected}) + "\n")


def train_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lines = path.read_text().splitlines()[:3000]
    tok.train_from_iterator((json.loads(x)["chosen"] for x in lines), trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def run_data_prep(src: Path, out: Path, tokenizer=None, num_proc: int | None = None) -> dict:
    from alignment.config import PrepOptions, PrepSource
    from data_prep.prepare import prepare
    from data_prep.write import write_atomic

    options = PrepOptions(sources=[PrepSource(path=str(src))], test_fraction=0.05, max_length=256 if tokenizer else None)
    prepared = prepare(options, tokenizer, progress=False, num_proc=num_proc)
    write_atomic(out, prepared.kind, prepared.splits, prepared.summary)
    return prepared.summary


_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _plain_convert(row: dict) -> dict:
    def parse(text):
        parts = _TURN.split(text)
        return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]

    chosen, rejected = parse(row["chosen"]), parse(row["rejected"])
    ok = chosen[:-1] == rejected[:-1] and chosen[-1]["content"] and rejected[-1]["content"]
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:], "ok": bool(ok)}


def run_datasets_peer(src: Path, out: Path, cache: Path) -> int:
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(cache))
    ds = ds.map(_plain_convert, remove_columns=["chosen", "rejected"]).filter(lambda r: r["ok"]).remove_columns("ok")
    out.mkdir(parents=True, exist_ok=True)
    ds.to_json(str(out / "train.jsonl"))
    ds.to_parquet(str(out / "train.parquet"))
    return ds.num_rows


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    try:
        src = work / "pairs.jsonl"
        generate(src, args.rows)
        tok = train_tokenizer(src)
        import datasets  # noqa: F401 - imported before timing, like our own modules
        import data_prep.prepare  # noqa: F401

        t_off, s_off = timed(run_data_prep, src, work / "off")
        t_one, _ = timed(run_data_prep, src, work / "one", None, 1)
        same = all(f.read_bytes() == (work / "one" / f.name).read_bytes() for f in (work / "off").iterdir())
        t_on, s_on = timed(run_data_prep, src, work / "on", tok)
        t_peer, peer_rows = timed(run_datasets_peer, src, work / "peer", work / "cache")
        n = args.rows
        print(f"{n} transcript pairs ({src.stat().st_size / 1e6:.1f} MB JSONL) -> canonical JSONL + Parquet")
        print(f"  data_prep, length filter off: {t_off:6.2f} s  {n / t_off:9,.0f} rows/s  kept {s_off['kept']}, dropped {s_off['dropped']}")
        print(f"  data_prep, filter off, --num-proc 1: {t_one:6.2f} s  {n / t_one:9,.0f} rows/s  output {'identical' if same else 'DIFFERENT'}")
        print(f"  data_prep, length filter on:  {t_on:6.2f} s  {n / t_on:9,.0f} rows/s  kept {s_on['kept']}")
        print(f"  peer: plain datasets map/filter/write: {t_peer:6.2f} s  {n / t_peer:9,.0f} rows/s  kept {peer_rows} (no dedup/split/accounting)")
        print(f"ratio data_prep (filter off) / datasets peer: {t_peer / t_off:.2f}x")
        print(f"ratio data_prep (filter on) / datasets peer: {t_peer / t_on:.2f}x")
        print(f"ratio filter on / filter off (speed): {t_off / t_on:.2f}x")
        print(f"target >= 20,000 rows/s with the filter off: {'met' if n / t_off >= 20_000 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
