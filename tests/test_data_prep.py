"""data_prep: every source shape into the canonical form, cleaning, the split, and accounting.

Fixture files are written by the tests, one per shape, with the awkward cases people's data has.
Every test that prepares data checks the accounting identity.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from pathlib import Path

import pytest

from alignment.config import DataOptions, PrepOptions, PrepSource
from alignment.errors import RecipeError
from alignment.data import check_rows, load_rows, messages_problem, text_problem
from alignment.demo import world
from data_prep.cli import main
from data_prep.prepare import hold_out_by_prompt, prepare, prompt_key, row_problem, summary_text, unit_hash
from data_prep.read import DataError, read_source

H, A = "\n\nHuman: ", "\n\nAssistant: "


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list, tail: str = "") -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows) + tail)
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit status (argparse's errors included), stdout and stderr of `python -m data_prep ARGS`."""
    try:
        code = main([*map(str, args), *(["--quiet"] if args[0] != "demo" else [])])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def read_out(out: Path, split: str = "train") -> list[dict]:
    path = out / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert_balanced(s)
    return s


def assert_balanced(s: dict) -> None:
    """kept + every drop reason = rows read + extra rows made (ranked lists, weights), per source and in total."""
    for t in [*s["sources"].values(), {"read": s["rows_read"], "kept": s["kept"], "dropped": s["dropped"], "extra": s["extra"]}]:
        assert t["kept"] + sum(t["dropped"].values()) == t["read"] + sum(t["extra"].values()), t
    assert sum(s["splits"].values()) == s["kept"]


def pairs_of(options: PrepOptions, **kw):
    prepared = prepare(options, progress=False, **kw)
    assert_balanced(prepared.summary)
    return prepared


# --------------------------------------------------------------------------- shapes


def test_transcripts_multi_turn_differing_empty_unicode_blank_and_truncated(tmp_path, capsys):
    rows = [
        # 1: a multi-turn transcript: every earlier turn is kept in the prompt
        {"chosen": f"{H}Hi{A}Hello!{H}How are you?{A}Fine, thanks.", "rejected": f"{H}Hi{A}Hello!{H}How are you?{A}Go away."},
        "",  # blank line: not a row
        # 3: the two sides differ before the last assistant turn
        {"chosen": f"{H}Hi{A}Hello!", "rejected": f"{H}Hey{A}Go away."},
        # 4: an empty final reply
        {"chosen": f"{H}Ça va ? 🙂{A}Oui, très bien.", "rejected": f"{H}Ça va ? 🙂{A}"},
        # 5: unicode kept as is
        {"chosen": f"{H}Ça va ? 🙂{A}Oui, très bien.", "rejected": f"{H}Ça va ? 🙂{A}Non 😠"},
        "   ",
    ]
    src = write_jsonl(tmp_path / "hh.jsonl", rows, tail='{"chosen": "\\n\\nHuman: cut')  # truncated last line (8)
    code, out, _ = run_cli(["pairs", src, "--out", tmp_path / "out", "--test-fraction", "0"], capsys)
    assert code == 0
    s = summary(tmp_path / "out")
    assert s["rows_read"] == 5 and s["kept"] == 2
    assert s["dropped"] == {"transcripts differ before the last assistant turn": 1, "empty 'rejected'": 1, "truncated last line": 1}
    first, second = read_out(tmp_path / "out")
    assert first["prompt"] == [user("Hi"), bot("Hello!"), user("How are you?")]
    assert first["chosen"] == [bot("Fine, thanks.")] and first["rejected"] == [bot("Go away.")]
    assert second["prompt"] == [user("Ça va ? 🙂")] and second["rejected"] == [bot("Non 😠")]
    assert {first["source"], second["source"]} == {"hh"} and first["id"] != second["id"]
    assert "check: kept 2 + dropped 3 = read 5 + extra 0" in out

    # --strict: the first drop is an error naming file and line; nothing is written
    code, _, err = run_cli(["pairs", src, "--out", tmp_path / "strict", "--strict"], capsys)
    assert code == 2 and err.strip().endswith(f"{src}:3: transcripts differ before the last assistant turn (strict: no row may be dropped)")
    assert err.count("\n") == 1 and not (tmp_path / "strict").exists()


def test_explicit_strings_and_messages_with_system_and_multi_turn(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "score_chosen": 9, "score_rejected": "2"},
        {"prompt": [system, user("a"), bot("b"), user("c")], "chosen": [bot("yes")], "rejected": [bot("no")], "id": 7},
        # replies given as whole conversations that repeat the prompt
        {"prompt": [user("x")], "chosen": [user("x"), bot("good")], "rejected": [user("x"), bot("bad")]},
        # a transcript prompt ending in an open assistant turn
        {"prompt": f"{H}q{A}", "chosen": "r1", "rejected": "r2"},
        {"prompt": "Hi", "chosen": "same", "rejected": " same "},
        {"prompt": ["not", "messages"], "chosen": "a", "rejected": "b"},
        {"prompt": "  ", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    p = pairs_of(PrepOptions(sources=[PrepSource(path=str(src))], test_fraction=0))
    got = p.splits["train"]
    assert [r["prompt"] for r in got] == [[user("Hi")], [system, user("a"), bot("b"), user("c")], [user("x")], [user("q")]]
    assert (got[0]["score_chosen"], got[0]["score_rejected"]) == (9.0, 2.0) and got[1]["id"] == "7"
    assert got[2]["chosen"] == [bot("good")] and got[3]["rejected"] == [bot("r2")]
    assert p.summary["dropped"] == {
        "'chosen' identical to 'rejected'": 1,
        "'prompt' has a message without a role in ('system', 'user', 'assistant')": 1,
        "empty 'prompt'": 1,
        "missing 'rejected'": 1,
    }


def test_rated_completions_best_against_worst_or_random_lower(tmp_path):
    rows = [
        {"prompt": "a", "completions": ["good", "bad", "meh"], "ratings": [9, 1, 5]},
        {"prompt": "b", "completions": [{"response": "x", "rating": 3}, {"response": "y", "rating": 3}]},  # tie
        {"prompt": "c", "completions": ["p", "q"], "ratings": [5, 4.5]},  # below min_margin 1
        {"prompt": "d", "completions": ["only"], "ratings": [5]},
        {"prompt": "e", "completions": ["p", "q"], "ratings": [5, "n/a"]},
    ]
    src = write_jsonl(tmp_path / "rated.jsonl", rows)
    worst = pairs_of(PrepOptions(sources=[PrepSource(path=str(src))], test_fraction=0, min_margin=1))
    [pair] = worst.splits["train"]
    assert (pair["chosen"], pair["rejected"], pair["score_chosen"], pair["score_rejected"]) == ([bot("good")], [bot("bad")], 9.0, 1.0)
    assert worst.summary["dropped"] == {"all ratings tied": 1, "rating margin below min_margin": 1,
                                        "fewer than two rated completions": 1, "a rating is not a number": 1}
    picks = {
        pairs_of(PrepOptions(sources=[PrepSource(path=str(src), num_examples=1)], test_fraction=0, rejected_choice="random", seed=s))
        .splits["train"][0]["rejected"][0]["content"]
        for s in range(12)
    }
    assert picks == {"bad", "meh"}  # random among the lower-rated; never the best


def test_scored_pairs_ratio_threshold_and_csv_with_ragged_row(tmp_path, capsys):
    src = tmp_path / "shp.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["history", "human_ref_A", "human_ref_B", "score_A", "score_B"])
        w.writerow(["Which?", "A is better", "B", "10", "2"])  # ratio 5: kept, A chosen
        w.writerow(["Other?", "a", "B wins", "3", "4"])  # ratio 1.33 < 2: dropped
        w.writerow(["Tie?", "a", "b", "3", "3"])
        w.writerow(["Ragged", "a", "b", "1"])  # a missing field (line 5)
        w.writerow([])
        w.writerow(["Multi\nline prompt", "x", "y", "0", "7"])  # lower score 0: any ratio, B chosen
    cols = ["prompt=history", "response_a=human_ref_A", "response_b=human_ref_B", "score_a=score_A", "score_b=score_B"]
    args = ["pairs", src, *[a for c in cols for a in ("--column", c)], "--min-ratio", "2", "--test-fraction", "0"]
    code, _, _ = run_cli([*args, "--out", tmp_path / "out"], capsys)
    assert code == 0
    s = summary(tmp_path / "out")
    assert s["dropped"] == {"score ratio below min_ratio": 1, "scores tied": 1, "ragged CSV row": 1}
    a, b = read_out(tmp_path / "out")
    assert (a["chosen"], a["rejected"], a["score_chosen"]) == ([bot("A is better")], [bot("B")], 10.0)
    assert a["prompt"] == [user("Which?")] and b["prompt"] == [user("Multi\nline prompt")] and b["chosen"] == [bot("y")]
    code, _, err = run_cli([*args, "--strict", "--out", tmp_path / "strict"], capsys)
    assert code == 2 and f"{src}:3: score ratio below min_ratio" in err


def test_ranked_lists_expand_and_the_accounting_counts_the_extra_pairs(tmp_path):
    src = write_jsonl(tmp_path / "ranked.jsonl", [{"prompt": "p", "ranked": ["1st", "2nd", "3rd"]},
                                                  {"prompt": "q", "ranked": ["a", "a", "b"]}, {"prompt": "r", "ranked": ["x"]}])
    expected = {"best-worst": [("1st", "3rd"), ("a", "b")], "adjacent": [("1st", "2nd"), ("2nd", "3rd"), ("a", "b")],
                "all": [("1st", "2nd"), ("1st", "3rd"), ("2nd", "3rd"), ("a", "b"), ("a", "b")]}
    for mode, want in expected.items():
        p = pairs_of(PrepOptions(sources=[PrepSource(path=str(src))], test_fraction=0, ranked_pairs=mode, dedup="none"))
        assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in p.splits["train"]] == want, mode
        assert p.summary["dropped"]["fewer than two ranked responses"] == 1
    assert p.summary["extra"] == {"more pairs from one ranked list": 4}
    assert p.summary["dropped"]["'chosen' identical to 'rejected'"] == 1  # ("a", "a") of row q


def test_sft_conversations_and_raw_text(tmp_path, capsys):
    sft = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [user("hi"), bot("hello")]},
        {"messages": f"{H}one{A}1{H}two{A}2{H}three{A}3"},  # a transcript, three user turns
        {"messages": [user("hi"), bot("   ")]},
        {"messages": [user("no reply")]},
    ])
    code, _, _ = run_cli(["sft", sft, "--max-turns", "2", "--test-fraction", "0", "--out", tmp_path / "sft"], capsys)
    assert code == 0
    s = summary(tmp_path / "sft")
    assert s["dropped"] == {"more than 2 turns": 1, "empty assistant turn": 1, "no assistant turn": 1}
    assert read_out(tmp_path / "sft")[0]["messages"] == [user("hi"), bot("hello")]
    text = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Some words."}, {"text": "some   WORDS."}, {"text": ""}, {"text": 3}])
    code, _, _ = run_cli(["text", text, "--test-fraction", "0", "--out", tmp_path / "text"], capsys)
    assert code == 0 and summary(tmp_path / "text")["dropped"] == {
        "duplicate after normalisation": 1, "empty 'text'": 1, "'text' is not text": 1}
    # the outputs are what the sft and pretrain stages read
    never = lambda n, seed: []  # noqa: E731
    rows = check_rows(load_rows(DataOptions(source=str(tmp_path / "sft" / "train.jsonl")), never, 0), messages_problem("messages"), "error")
    assert len(rows) == 1
    assert len(check_rows(load_rows(DataOptions(source=str(tmp_path / "text")), never, 0), text_problem("text"), "error")) == 1


def test_shape_detection_names_the_matches(tmp_path, capsys):
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "ranked": ["a", "b"]}])
    code, _, err = run_cli(["pairs", both, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "match several shapes: explicit, ranked; state the shape (--shape)" in err
    code, _, _ = run_cli(["pairs", both, "--shape", "ranked", "--out", tmp_path / "o"], capsys)
    assert code == 0
    # explicit pairs plus a rated list: rated's rule excludes rows with `chosen`, which used to
    # make explicit win without a word while the ratings went unread
    rated = write_jsonl(tmp_path / "rated.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b",
                                                    "completions": ["a", "b"], "ratings": [5, 1]}])
    code, _, err = run_cli(["pairs", rated, "--out", tmp_path / "o3"], capsys)
    assert code == 2 and "match several shapes: explicit, rated; state the shape (--shape)" in err
    assert not (tmp_path / "o3").exists()
    code, _, _ = run_cli(["pairs", rated, "--shape", "rated", "--out", tmp_path / "o3"], capsys)
    assert code == 0 and summary(tmp_path / "o3")["kept"] == 1
    # implicit's columns inside explicit's are one reading, not two
    implicit = write_jsonl(tmp_path / "explicit.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    code, _, _ = run_cli(["pairs", implicit, "--out", tmp_path / "o4"], capsys)
    assert code == 0
    none = write_jsonl(tmp_path / "none.jsonl", [{"question": "p", "answer": "a"}])
    code, _, err = run_cli(["pairs", none, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "no row shape matches the columns (answer, question); expected explicit: prompt, chosen, rejected" in err


# --------------------------------------------------------------------------- cleaning


def test_exact_and_normalised_dedup(tmp_path):
    rows = [{"prompt": "Hi there", "chosen": "Hello!", "rejected": "No."},
            {"prompt": "Hi there", "chosen": "Hello!", "rejected": "No."},
            {"prompt": "hi  THERE", "chosen": "hello!", "rejected": "no."},
            {"prompt": "Ｈｉ there", "chosen": "Hello!", "rejected": "No."}]  # full-width: equal after NFKC
    src = write_jsonl(tmp_path / "dup.jsonl", rows)
    counts = {}
    for mode in ("none", "exact", "normalised"):
        p = pairs_of(PrepOptions(sources=[PrepSource(path=str(src))], test_fraction=0, dedup=mode))
        counts[mode] = (len(p.splits["train"]), p.summary["dropped"])
    assert counts["none"] == (4, {})
    assert counts["exact"] == (3, {"exact duplicate": 1})
    assert counts["normalised"] == (1, {"exact duplicate": 1, "duplicate after normalisation": 2})


def test_split_is_deterministic_disjoint_by_prompt_and_independent_of_order(tmp_path):
    pairs = world.preference_pairs(600, seed=1)  # the demo pairs repeat prompts
    src = write_jsonl(tmp_path / "a.jsonl", pairs)
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    src2 = write_jsonl(tmp_path / "b.jsonl", shuffled)
    opts = lambda path, **kw: PrepOptions(sources=[PrepSource(path=str(path), name="x")], test_fraction=0.2, **kw)  # noqa: E731
    a, again, b = pairs_of(opts(src)), pairs_of(opts(src)), pairs_of(opts(src2))
    ids = lambda p, split: sorted(r["id"] for r in p.splits[split])  # noqa: E731
    assert ids(a, "test") == ids(again, "test") == ids(b, "test") and ids(a, "train") == ids(b, "train")
    train_prompts = {prompt_key(r) for r in a.splits["train"]}
    test_prompts = {prompt_key(r) for r in a.splits["test"]}
    assert not train_prompts & test_prompts and len(train_prompts) > len(test_prompts) > 0
    assert 0.1 < len(a.splits["test"]) / a.summary["kept"] < 0.3
    assert ids(pairs_of(opts(src, split_seed=1)), "test") != ids(a, "test")  # another seed, another split


def test_hold_out_by_prompt_takes_whole_prompts_up_to_n():
    keys = ["a", "a", "b", "c", "c", "c", "d"] * 3
    held = hold_out_by_prompt(keys, 9)
    held_keys = {k for k, h in zip(keys, held) if h}
    assert sum(held) <= 9 and all(h == (k in held_keys) for k, h in zip(keys, held))
    order = sorted(set(keys), key=lambda k: unit_hash(k, "eval"))
    assert order[0] in held_keys  # whole prompts in hash order
    assert hold_out_by_prompt(list(reversed(keys)), 9) == list(reversed(held))


def test_weighted_mixing_of_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "y", "rejected": "n"} for i in range(400)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "y", "rejected": "n"} for i in range(100)])
    p = pairs_of(PrepOptions(sources=[PrepSource(path=str(a), weight=0.25), PrepSource(path=str(b), weight=2)], test_fraction=0))
    by = {name: t for name, t in p.summary["sources"].items()}
    assert 60 < by["a"]["kept"] < 140 and by["a"]["dropped"] == {"not sampled (weight 0.25)": 400 - by["a"]["kept"]}
    assert by["b"]["kept"] == 200 and by["b"]["extra"] == {"repeated (weight 2)": 100}
    again = pairs_of(PrepOptions(sources=[PrepSource(path=str(a), weight=0.25), PrepSource(path=str(b), weight=2)], test_fraction=0))
    assert [r["id"] for r in again.splits["train"]] == [r["id"] for r in p.splits["train"]]
    assert len({r["id"] for r in p.splits["train"]}) == len(p.splits["train"])  # copies get their own ids


def test_token_limits_with_a_given_tokenizer(tmp_path):
    class Words:  # one token per word: the rule the limits count with
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    rows = [{"prompt": "one two", "chosen": "a b c", "rejected": "d"},  # 2 + 3 = 5
            {"prompt": "one two three four", "chosen": "a", "rejected": "b"},  # prompt 4
            {"prompt": "one", "chosen": "a b c d e f", "rejected": "g"}]  # 1 + 6 = 7
    src = write_jsonl(tmp_path / "len.jsonl", rows)
    p = pairs_of(PrepOptions(sources=[PrepSource(path=str(src))], test_fraction=0, max_prompt_tokens=3, max_length=5), tokenizer=Words())
    assert [r["prompt"][0]["content"] for r in p.splits["train"]] == ["one two"]
    assert p.summary["dropped"] == {"prompt longer than 3 tokens": 1, "longer than 5 tokens": 1}
    with pytest.raises(DataError, match="count tokens"):
        prepare(PrepOptions(sources=[PrepSource(path=str(src))], max_length=5), progress=False)


def test_worker_processes_give_the_same_bytes_and_accounting_as_one_process(tmp_path, capsys, monkeypatch):
    """Rows parsed in worker processes, 3 per chunk, so duplicates and drops fall in other chunks
    than their first occurrence: the same files, byte for byte, and the same summary."""
    import data_prep.prepare as prepare_module

    worker_pool = prepare_module._worker_pool
    hh = [
        {"chosen": f"{H}Hi{A}Hello!{H}How are you?{A}Fine.", "rejected": f"{H}Hi{A}Hello!{H}How are you?{A}Go away."},
        {"chosen": f"{H}Hi{A}Hello!", "rejected": f"{H}Hey{A}Go away."},  # differ before the last turn
        {"chosen": f"{H}Ça va ? 🙂{A}Oui.", "rejected": f"{H}Ça va ? 🙂{A}"},  # empty reply
        "{not json",
        {"chosen": f"{H}Hi{A}Hello!{H}How are you?{A}Fine.", "rejected": f"{H}Hi{A}Hello!{H}How are you?{A}Go away."},
        {"chosen": f"{H}hi{A}hello!{H}HOW are  you?{A}fine.", "rejected": f"{H}hi{A}hello!{H}HOW are  you?{A}go away."},
        "",
        *[{"chosen": f"{H}q{i}{A}yes {i}", "rejected": f"{H}q{i}{A}no"} for i in range(20)],
        {"chosen": f"{H}q3{A}yes 3", "rejected": f"{H}q3{A}no"},  # a duplicate six chunks later
    ]
    ranked = [{"prompt": f"p{i}", "ranked": ["best", "mid", "worst"][: 1 + i % 3]} for i in range(9)]
    sources = [PrepSource(path=str(write_jsonl(tmp_path / "hh.jsonl", hh, tail='{"chosen": "cut'))),
               PrepSource(path=str(write_jsonl(tmp_path / "ranked.jsonl", ranked)), weight=1.5)]
    options = PrepOptions(sources=sources, test_fraction=0.3, ranked_pairs="adjacent")
    one = pairs_of(options)
    pools = []
    monkeypatch.setattr(prepare_module, "_worker_pool", lambda *a: pools.append(a) or worker_pool(*a))
    many = pairs_of(options, num_proc=2, chunk_rows=3)
    assert len(pools) == 2  # one pool of workers per source
    monkeypatch.setattr(prepare_module, "PARALLEL_ROWS", 10)  # by default, workers only for long sources
    assert pairs_of(options, chunk_rows=3).splits == one.splits and len(pools) == 3  # hh (29 rows) yes, ranked (9) no
    assert many.splits == one.splits and many.summary == one.summary
    assert one.summary["dropped"]["exact duplicate"] == 2 and one.summary["dropped"]["duplicate after normalisation"] == 1
    assert one.summary["extra"]["more pairs from one ranked list"] == 3 and len(one.splits["test"]) > 0

    # the command writes the same files with --num-proc (the default chunk holds all the rows)
    outs = {}
    for n in ("1", "2"):
        code, _, _ = run_cli(["pairs", tmp_path / "hh.jsonl", "--num-proc", n, "--out", tmp_path / n], capsys)
        assert code == 0
        outs[n] = {f.name: f.read_bytes() for f in sorted((tmp_path / n).iterdir())}
    assert outs["1"] == outs["2"] and len(outs["1"]) == 5

    # --strict stops at the same first drop, however the rows are shared out
    strict = options.model_copy(update={"strict": True})
    with pytest.raises(DataError, match=r"hh\.jsonl:2: transcripts differ before the last assistant turn"):
        prepare(strict, progress=False, num_proc=2, chunk_rows=3)


# --------------------------------------------------------------------------- reading and errors


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "empty file"),
        ("blank.jsonl", b"\n  \n", "empty file"),
        ("empty.json", b"", "empty file"),
        ("list.json", b"[]", "empty file"),
        ("empty.csv", b"", "empty file"),
        ("header.csv", b"prompt,chosen,rejected\n", "a header and no rows"),
        ("binary.jsonl", bytes(range(256)) * 4, "binary file, expected UTF-8 text"),
        ("latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"), "latin1.jsonl:1: not UTF-8 text"),
        ("broken.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 50, mtime=0)[:30], "cannot decompress"),
        ("notgzip.jsonl.gz", b'{"a": 1}\n', "cannot decompress"),
        ("rows.txt", b'{"prompt": "p"}\n', "unsupported file type '.txt' (read: .jsonl, .jsonl.gz, .json, .csv, .parquet"),
        ("ROWS.JSONL", b'{"prompt": "p"}\n', "unsupported file type '.JSONL'"),
        ("bad.parquet", b"PAR1 not really", "cannot read as Parquet"),
        ("bad.json", b'{"prompt": ', "bad.json:1: not valid JSON"),
    ],
)
def test_whole_file_problems_are_one_line_errors_naming_the_file(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=None) as err:
        list(read_source(str(path)))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    # the same error, as a one-line exit-2 message, from the command and from a recipe's data source
    code, out, errtext = run_cli(["pairs", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and errtext.count("\n") == 1 and message in errtext and not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="^" + str(path).replace(".", r"\.")):
        load_rows(DataOptions(source=str(path)), lambda n, s: [], 0)


def test_json_csv_parquet_gz_and_saved_directories_read_alike(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "c", "rejected": "d"}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with (tmp_path / "r.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("r.json", "cols.json", "lines.json", "r.jsonl.gz", "r.csv", "r.parquet", "saved"):
        got = [row for _, row in read_source(str(tmp_path / name))]
        assert got == rows, name
    origins = [o for o, _ in read_source(str(tmp_path / "r.csv"))]
    assert origins == [f"{tmp_path / 'r.csv'}:2", f"{tmp_path / 'r.csv'}:3"]


def test_malformed_line_is_an_error_naming_file_and_line_or_a_counted_drop(tmp_path, capsys):
    src = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "{not json", "[1, 2]",
                                               {"prompt": "q", "chosen": "a", "rejected": "b"}])
    code, _, _ = run_cli(["pairs", src, "--test-fraction", "0", "--out", tmp_path / "out"], capsys)
    assert code == 0 and summary(tmp_path / "out")["dropped"] == {"not valid JSON": 1, "row is not a JSON object": 1}
    code, _, err = run_cli(["pairs", src, "--strict", "--out", tmp_path / "strict"], capsys)
    assert code == 2 and f"{src}:2: not valid JSON" in err
    with pytest.raises(RecipeError, match=r"m\.jsonl:2: not valid JSON"):
        check_rows(load_rows(DataOptions(source=str(src)), lambda n, s: [], 0), text_problem("prompt"), "error")


def test_bad_command_lines_are_one_line_errors_with_nothing_written(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [
        (["pairs", src, "--out", a_file], "is a file"),
        (["pairs", src, "--out", theirs], "not written by data_prep"),
        (["demo", "--out", tmp_path / "d", "--pairs", "-3"], "argument --pairs: expected a positive integer, got -3"),
        (["pairs", src, "--max-turns", "0", "--out", tmp_path / "o"], "expected a positive integer, got 0"),
        (["pairs", src, "--max-length", "10", "--out", tmp_path / "o"], "give --tokenizer"),
        (["pairs", src, src, "--weights", "1", "--out", tmp_path / "o"], "--weights: 1 values for 2 sources"),
        (["pairs", src, "--column", "nope=x", "--out", tmp_path / "o"], "expected ROLE=COLUMN"),
    ]
    if os.geteuid() != 0:  # root may write anywhere
        cases.append((["pairs", src, "--out", locked / "out"], "permission denied"))
    for args, message in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2, args
        assert message in err and err.count("\n") == 1, (args, err)
    assert a_file.read_text() == "mine" and sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists() and not list(locked.iterdir())
    locked.chmod(0o700)


def test_output_is_read_by_datasets_and_rewrites_only_its_own_files(tmp_path, capsys):
    import datasets

    src = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": f"{H}q{i}{A}good", "rejected": f"{H}q{i}{A}bad"} for i in range(40)])
    out = tmp_path / "out"
    assert run_cli(["pairs", src, "--test-fraction", "0.25", "--out", out], capsys)[0] == 0
    for kind in ("json", "parquet"):
        ext = "jsonl" if kind == "json" else kind
        ds = datasets.load_dataset(kind, data_files={s: str(out / f"{s}.{ext}") for s in ("train", "test")})
        assert ds["train"].num_rows + ds["test"].num_rows == 40 and ds["test"].num_rows > 0
        assert ds["train"][0]["prompt"] == [user(read_out(out)[0]["prompt"][0]["content"])]
        assert set(ds["train"].column_names) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "source", "id"}
    # rerun into the same directory with no test split: its old test files go, nothing else is touched
    (out / "mine.txt").write_text("x")
    assert run_cli(["pairs", src, "--test-fraction", "0", "--out", out], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "summary.json", "train.jsonl", "train.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_help_shows_an_example_of_every_shape(capsys):
    with pytest.raises(SystemExit):
        main(["pairs", "--help"])
    text = capsys.readouterr().out
    for word in ("explicit", "implicit", "rated", "scored", "ranked", "sft", "text", "\\n\\nHuman:", "--strict", "examples:"):
        assert word in text, word


def test_demo_files_round_trip_through_the_stage_loaders(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--pretrain", "50", "--sft", "20", "--pairs", "30", "--eval", "10"]) == 0
    never = lambda n, seed: []  # noqa: E731 - files only, the demo factory must not be used
    text = check_rows(load_rows(DataOptions(source=str(tmp_path / "pretrain.jsonl")), never, 0), text_problem("text"), "error")
    chats = check_rows(load_rows(DataOptions(source=str(tmp_path / "sft.jsonl")), never, 0), messages_problem("messages"), "error")
    assert (len(text), len(chats)) == (50, 20) and not text.dropped and not chats.dropped
    assert chats.origins[3].endswith("sft.jsonl:4")
    pairs = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    assert len(pairs) == 30
    assert all(world.gold_score(p["prompt"], p["chosen"]) > world.gold_score(p["prompt"], p["rejected"]) for p in pairs)
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 10 and all(world.is_heldout(p) for p in prompts)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_parquet_equals_jsonl_even_with_a_row_longer_than_a_read_block(tmp_path, capsys):
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": "long " * 1_000_000, "rejected": "short"}, {"prompt": "q", "chosen": "é", "rejected": "🙂"}]
    src = write_jsonl(tmp_path / "big.jsonl", rows)
    assert run_cli(["pairs", src, "--test-fraction", "0", "--out", tmp_path / "out"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "out" / "train.parquet").to_pylist() == read_out(tmp_path / "out")


def test_chosen_identical_to_rejected_compares_every_message():
    """Replies of several messages are identical only when every message is (whitespace aside)."""
    prompt = [{"role": "user", "content": "q"}]
    two = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    same = [{"role": "assistant", "content": "a "}, {"role": "assistant", "content": " b"}]
    other_first = [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "b"}]
    assert row_problem({"prompt": prompt, "chosen": two, "rejected": same}) == "'chosen' identical to 'rejected'"
    assert row_problem({"prompt": prompt, "chosen": two, "rejected": other_first}) is None


def test_hub_dataset_id_with_config_and_split(tmp_path, monkeypatch, capsys):
    """`id:config` with --split: the hub loader is asked for exactly that dataset, config and split
    (stood in for by one serving a JSONL file this test writes; no network), and its rows go
    through the same shape parsing, cleaning and accounting as a local file's."""
    import datasets

    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    served = write_jsonl(tmp_path / "served.jsonl", [*rows, {**rows[0]}])  # one exact duplicate
    asked = []

    def hub(name, config=None, split=None, **kwargs):
        asked.append((name, config, split))
        if (name, config, split) != ("someone/prefs", "cleaned", "test"):
            raise FileNotFoundError(f"no {name} {config} {split}")
        return datasets.Dataset.from_json(str(served))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    code, _, err = run_cli(["pairs", "someone/prefs:cleaned", "--split", "test", "--test-fraction", "0",
                            "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert asked == [("someone/prefs", "cleaned", "test")]
    got = read_out(tmp_path / "out")
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"]) for r in got] == [(r["prompt"], r["chosen"]) for r in rows]
    counts = summary(tmp_path / "out")
    assert counts["rows_read"] == 6 and counts["kept"] == 5 and sum(counts["dropped"].values()) == 1


def test_hub_dataset_id_that_cannot_be_loaded_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^nobody/no-such-set:cfg: cannot load hub dataset \(") as err:
        list(read_source("nobody/no-such-set:cfg"))
    assert "\n" not in str(err.value)


def test_a_source_with_no_readable_row_is_all_counted_drops(tmp_path, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "[1]"] * 60)
    code, _, _ = run_cli(["pairs", src, "--test-fraction", "0", "--out", tmp_path / "out"], capsys)
    assert code == 0 and summary(tmp_path / "out")["dropped"] == {"not valid JSON": 60, "row is not a JSON object": 60}


def test_an_empty_sampled_reply_is_kept_and_counted_an_empty_reply_in_a_users_file_is_dropped(tmp_path):
    """The same pair, once sampled (given rows marked generated, as the on-policy builder makes them)
    and once from a user's file: the sampled one with its empty rejected reply is kept and counted under
    empty_replies; the file's is dropped as "empty 'rejected'". Written, the generated column survives
    in JSONL and Parquet, and the stages' reader (alignment.data) accepts the pair."""
    import pyarrow.parquet as pq

    from alignment.data import check_rows, preference_rows
    from data_prep.write import write_files

    pair = {"prompt": "repeat: cat dog", "chosen": "Sure! cat dog", "rejected": "", "score_chosen": 1.0,
            "score_rejected": 0.0}
    users = write_jsonl(tmp_path / "users.jsonl", [{**pair, "prompt": "repeat: sun moon"}])
    options = PrepOptions(sources=[PrepSource(path="prompts", name="sampled", shape="explicit"),
                                   PrepSource(path=str(users), name="users")], test_fraction=0)
    prepared = prepare(options, progress=False, given={"sampled": [("prompt 1", {**pair, "generated": True})]})
    s = prepared.summary
    assert s["sources"]["sampled"]["kept"] == 1 and s["sources"]["users"]["dropped"] == {"empty 'rejected'": 1}
    assert s["empty_replies"] == {"sampled": 1}
    [row] = prepared.splits["train"]
    assert row["rejected"] == [bot("")] and row["generated"] is True and row["source"] == "sampled"

    out = tmp_path / "out"
    out.mkdir()
    write_files(out, prepared.kind, prepared.splits, s)
    assert pq.read_table(out / "train.parquet").column("generated").to_pylist() == [True]
    options = DataOptions(source=str(out))
    [read_back] = check_rows(preference_rows(load_rows(options, None), options), lambda r: None, "error").rows
    assert read_back["rejected"] == [bot("")] and read_back["chosen"] == [bot("Sure! cat dog")]
    # without the mark, the same written row is a broken one
    unmarked = load_rows(options, None)
    unmarked.rows[0].pop("generated")
    with pytest.raises(RecipeError, match=r"train\.jsonl:1: empty 'rejected'"):
        check_rows(preference_rows(unmarked, options), lambda r: None, "error")


def test_empty_sampled_replies_make_binary_rows_too():
    """Kind binary: a generated rated list (its empty reply rated lowest) and a generated pair give their
    empty reply as an undesirable row; both identical (empty) sides still drop the pair."""
    rated = {"prompt": "first: a b", "completions": ["Sure! a", ""], "ratings": [1.0, 0.0], "generated": True}
    pair = {"prompt": "last: c d", "chosen": "Sure! d", "rejected": "", "generated": True}
    both_empty = {"prompt": "last: e f", "chosen": "", "rejected": " ", "generated": True}
    made = {}
    for name, row, shape in (("rated", rated, "rated"), ("pair", pair, "explicit"), ("tie", both_empty, "explicit")):
        options = PrepOptions(kind="binary", threshold=0.5, test_fraction=0,
                              sources=[PrepSource(path="prompts", name=name, shape=shape)])
        made[name] = prepare(options, progress=False, given={name: [("prompt 1", row)]})
    for name, good in (("rated", "Sure! a"), ("pair", "Sure! d")):
        rows = made[name].splits["train"]
        assert [(r["completion"][0]["content"], r["label"], r["generated"]) for r in rows] == [
            (good, True, True), ("", False, True)]
        assert made[name].summary["empty_replies"] == {name: 1}
    assert made["tie"].summary["dropped"] == {"'chosen' identical to 'rejected'": 1}


def test_a_reply_sampled_twice_is_kept_twice_a_users_duplicate_row_is_dropped():
    """Kind binary from rated lists: a generated list whose two samples are the same reply keeps both
    (the policy said it twice), each with an id of its own, counted as repeated_samples; the same list
    unmarked (a user's file) keeps one and counts the other as an exact duplicate."""
    rated = {"prompt": "first: a b", "completions": ["Sure! a", "Sure! a", "b"], "ratings": [1.0, 1.0, 0.0]}
    made = {}
    for name, row in (("sampled", {**rated, "generated": True}), ("users", rated)):
        options = PrepOptions(kind="binary", threshold=0.5, test_fraction=0,
                              sources=[PrepSource(path="prompts", name=name, shape="rated")])
        made[name] = prepare(options, progress=False, given={name: [("prompt 1", row)]})
    sampled = made["sampled"].splits["train"]
    assert [(r["completion"][0]["content"], r["label"]) for r in sampled] == [("Sure! a", True), ("Sure! a", True), ("b", False)]
    assert len({r["id"] for r in sampled}) == 3
    assert made["sampled"].summary["repeated_samples"] == {"sampled": 1} and made["sampled"].summary["dropped"] == {}
    assert "repeated samples kept: sampled 1 rows" in summary_text(made["sampled"].summary)
    users = made["users"].splits["train"]
    assert [r["completion"][0]["content"] for r in users] == ["Sure! a", "b"]
    assert made["users"].summary["dropped"] == {"exact duplicate": 1} and made["users"].summary["repeated_samples"] == {}


def test_onpolicy_prompts_refuse_a_column_no_row_has(tmp_path):
    """A prompt column missing from every row is a wrong name (one DataError naming the file, the column
    and the columns there), not rows to drop; missing from some rows, those are counted drops."""
    from data_prep.onpolicy import read_prompts

    src = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "hello", "answer": "hi"}), json.dumps({"text": "x"})])
    with pytest.raises(DataError, match=r"p\.jsonl: no column 'promt' in its rows \(columns: answer, prompt, text\)"):
        read_prompts(str(src), "promt", None, 0)
    found = read_prompts(str(src), "prompt", None, 0)
    assert found[0][1] == "hello" and found[1][1].reason == "missing 'prompt'"


def test_a_column_missing_from_every_row_is_refused_from_some_rows_dropped(tmp_path):
    """A stated shape whose column no row has, or a named column no row has, is a wrong shape or name:
    one DataError naming the file, the column and the columns there (also when the rows past the
    first DETECT_ROWS are read before it is known). Missing from some rows only, those rows are drops."""
    from alignment.config import PrepColumns

    rows = [{"chosen": f"a{i}", "rejected": f"b{i}"} for i in range(150)]
    src = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    ranked = PrepOptions(kind="pairs", sources=[PrepSource(path=str(src), shape="ranked")], test_fraction=0)
    with pytest.raises(DataError, match=r"p\.jsonl: no column 'prompt', 'ranked' in its rows \(columns: chosen, rejected\); "
                       r"shape 'ranked' reads prompt, ranked"):
        prepare(ranked, progress=False, num_proc=1)
    named = PrepOptions(kind="pairs", sources=[PrepSource(path=str(src), columns=PrepColumns(id="uid"))], test_fraction=0)
    with pytest.raises(DataError, match=r"p\.jsonl: no column 'uid' in its rows .*--column id=uid names a column no row has"):
        prepare(named, progress=False, num_proc=1)
    # the last row has a prompt: the column is not a wrong name, the 149 rows without it are drops
    rows[-1]["prompt"] = "q"
    src = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    explicit = PrepOptions(kind="pairs", sources=[PrepSource(path=str(src), shape="explicit")], test_fraction=0)
    done = prepare(explicit, progress=False, num_proc=1)
    assert len(done.splits["train"]) == 1
    assert done.summary["sources"]["p"]["dropped"] == {"missing 'prompt'": 149}


def test_a_split_of_a_file_or_the_demo_data_is_refused(tmp_path):
    """A split other than train names a part of a hub dataset or a saved DatasetDict; a file's rows
    (or the demo data) are one split, so it would be ignored: refused, naming the split."""
    src = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})])
    with pytest.raises(DataError, match=r"^split: 'test' applies only to a hub dataset or a saved DatasetDict"):
        list(read_source(str(src), "test"))
    for path in (str(src), "demo"):
        options = PrepOptions(kind="pairs", sources=[PrepSource(path=path, split="test")], test_fraction=0)
        with pytest.raises(DataError, match=rf"^{path}: split 'test' applies only to a hub dataset"):
            prepare(options, progress=False, num_proc=1)
    assert len(list(read_source(str(src), "train"))) == 1
