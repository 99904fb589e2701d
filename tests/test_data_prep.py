"""data_prep writes the demo datasets in the shapes the stages read, with no bad rows."""

from __future__ import annotations

import json

from alignment.config import DataOptions
from alignment.data import check_rows, load_rows, messages_problem, text_problem
from alignment.demo import world
from data_prep.cli import main


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
