"""data_prep's reader and row parser on awkward files: long CSV cells, lone surrogates, blank CSV
rows, cells that look like JSON, ratings lists, and transcripts (Human:/Assistant:) written in
the ways real preference datasets write them. A row that cannot be read is a counted bad row."""

from __future__ import annotations

import json

import pytest

from data_prep.read import read_source


# ------------------------------------------------------------------ the reader


def test_csv_cell_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    long = "x" * 200_000
    (tmp_path / "r.csv").write_text(f"prompt,chosen,rejected\nq,{long},b\n")
    [(_, row)] = list(read_source(str(tmp_path / "r.csv")))
    assert row == {"prompt": "q", "chosen": long, "rejected": "b"}


def test_json_file_with_a_lone_surrogate_is_a_counted_bad_row(tmp_path):
    (tmp_path / "r.json").write_text('[{"prompt": "a\\ud800"}, {"prompt": "ok \\ud83d\\ude00"}]')
    (first, bad), (_, good) = read_source(str(tmp_path / "r.json"))
    assert first.endswith("row 1") and bad.reason == "not valid JSON"
    assert good == {"prompt": "ok \U0001F600"}


def test_blank_csv_row_is_counted(tmp_path):
    (tmp_path / "r.csv").write_text("prompt,chosen,rejected\nq,a,b\n , ,\n\nr,c,d\n")
    rows = list(read_source(str(tmp_path / "r.csv")))
    assert [getattr(r, "reason", "row") for _, r in rows] == ["row", "blank CSV row", "row"]
    assert rows[1][0].endswith("r.csv:3")


def test_csv_cell_that_reads_as_json_stays_text_unless_it_is_messages(tmp_path):
    messages = json.dumps([{"role": "user", "content": "hi"}])
    (tmp_path / "r.csv").write_text(f'prompt,chosen,rejected\n"List 1-3","[1, 2, 3]","{{""a"": 1}}"\n"{messages.replace(chr(34), chr(34) * 2)}",x,y\n')
    (_, first), (_, second) = read_source(str(tmp_path / "r.csv"))
    assert first == {"prompt": "List 1-3", "chosen": "[1, 2, 3]", "rejected": '{"a": 1}'}
    assert second["prompt"] == [{"role": "user", "content": "hi"}]


def test_ratings_in_a_csv_cell_are_still_a_list(tmp_path):
    from alignment.config import PrepOptions, PrepSource
    from data_prep.prepare import prepare

    (tmp_path / "r.csv").write_text('prompt,completions,ratings\nq,"[""good"", ""bad""]","[9, 2]"\n')
    got = prepare(PrepOptions(sources=[PrepSource(path=str(tmp_path / "r.csv"))], test_fraction=0), progress=False)
    [row] = got.splits["train"]
    assert row["chosen"][0]["content"] == "good" and row["rejected"][0]["content"] == "bad"


# ------------------------------------------------------------------ the row parser: transcripts


def parse_explicit(row: dict):
    from alignment.config import PrepColumns, PrepOptions
    from data_prep.shapes import make_parser

    return make_parser("explicit", PrepColumns(), PrepOptions())(row)


def test_text_prompt_with_trailing_whitespace_matches_a_transcript_reply():
    [pair] = parse_explicit({"prompt": "What is X? \n", "chosen": "\n\nHuman: What is X?\n\nAssistant: Y",
                             "rejected": "\n\nHuman: What is X?\n\nAssistant: Z"})
    assert pair["chosen"] == [{"role": "assistant", "content": "Y"}] and pair["rejected"][0]["content"] == "Z"


def test_reply_quoting_a_dialogue_is_the_reply_itself():
    quote = "Here is an example:\n\nHuman: hi\n\nAssistant: hello"
    [pair] = parse_explicit({"prompt": "Show me a chat", "chosen": quote, "rejected": "No."})
    assert pair["chosen"] == [{"role": "assistant", "content": quote}]


def test_transcript_with_single_newlines_is_parsed():
    [pair] = parse_explicit({"prompt": "Human: a\nAssistant:", "chosen": "b", "rejected": "c"})
    assert pair["prompt"] == [{"role": "user", "content": "a"}]


def test_a_named_prompt_field_that_is_no_column_is_refused_and_the_implicit_shape_still_reads():
    from alignment.config import FeedbackDataOptions, PreferenceDataOptions
    from alignment.data import Rows, preference_rows, unpaired_rows
    from alignment.errors import RecipeError

    explicit = Rows([{"prompt": "hi", "chosen": "yes", "rejected": "no"}], ["p.jsonl:1"])
    for read, options in [(preference_rows, PreferenceDataOptions), (unpaired_rows, FeedbackDataOptions)]:
        with pytest.raises(RecipeError) as caught:
            read(explicit, options(prompt_field="question"))
        assert str(caught.value) == (
            "data.prompt_field: 'question' names no column of p.jsonl (its columns: chosen, prompt, rejected); "
            "the rows have the default 'prompt' column: drop the key or set data.prompt_field: prompt")
    without = Rows([{"chosen": "yes", "rejected": "no"}], ["p.jsonl:1"])
    with pytest.raises(RecipeError, match=r"^data\.prompt_field: 'question' names no column of p\.jsonl "
                                          r"\(its columns: chosen, rejected\); set data\.prompt_field to the column"):
        preference_rows(without, PreferenceDataOptions(prompt_field="question"))
    # the named column, when there, is the prompt
    named = Rows([{"question": "hi", "chosen": "yes", "rejected": "no"}], ["p.jsonl:1"])
    [pair] = preference_rows(named, PreferenceDataOptions(prompt_field="question")).rows
    assert pair["prompt"] == [{"role": "user", "content": "hi"}]
    # with the default prompt_field, rows of two whole transcripts are still the implicit-prompt shape
    implicit = Rows([{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}],
                    ["p.jsonl:1"])
    [pair] = preference_rows(implicit, PreferenceDataOptions()).rows
    assert pair["prompt"] == [{"role": "user", "content": "hi"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "yes"}]
