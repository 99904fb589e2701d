"""data_prep's output and shapes in the toolkit's stages and in TRL's trainers, on micro settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from alignment.recipe_file import load_recipe
from alignment.demo import world
from alignment.pipeline import plan, run
from alignment.stages.common import preference_datasets
from data_prep.cli import main
from data_prep.prepare import prompt_key

from .conftest import RECIPES

H, A = "\n\nHuman: ", "\n\nAssistant: "
STEPS = ["training.max_steps=2", "training.per_device_train_batch_size=8", "training.logging_steps=1"]


def transcripts(n: int, long_every: int = 0) -> list[dict]:
    """Demo pairs as two-turn Human/Assistant transcripts; every `long_every`-th chosen reply is long."""
    rows = []
    for i, p in enumerate(world.preference_pairs(n, seed=3)):
        history = f"{H}hello {i}{A}Sure! hello{H}{p['prompt']}{A}"
        chosen = p["chosen"] + (" word" * 80 if long_every and i % long_every == 0 else "")
        rows.append({"chosen": history + chosen, "rejected": history + p["rejected"]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def summary_of(node) -> dict:
    return json.loads((node.out_dir / "run_info.json").read_text())["summary"]


def test_demo_held_out_pairs_share_no_prompt_with_training():
    """Before: the last 200 rows were held out and 19 of their prompts were also trained on."""
    recipe = load_recipe(RECIPES / "dpo.yaml")
    train, held, counts = preference_datasets(recipe, {}, world.preference_pairs)
    keys = lambda ds: {prompt_key({"prompt": p}) for p in ds["prompt"]}  # noqa: E731
    assert not keys(train) & keys(held)
    assert 190 <= len(held) <= recipe.data.eval_examples and len(train) + len(held) == recipe.data.num_examples
    assert train[0]["prompt"][0]["role"] == "user" and train[0]["chosen"][0]["role"] == "assistant"


def test_prep_stage_feeds_dpo_by_reference_and_is_cached(in_tmp, tiny_base):
    write_jsonl(in_tmp / "hh.jsonl", transcripts(120) + [{"chosen": f"{H}a{A}b", "rejected": f"{H}c{A}d"}])
    (in_tmp / "prep.yaml").write_text(
        "stage: prep\nprep:\n  sources: [{path: hh.jsonl}]\n  test_fraction: 0.2\noutput_dir: out/prep\n")
    (in_tmp / "dpo.yaml").write_text(
        f"stage: dpo\nmodel: {tiny_base}\ndata: {{source: {{from: prep.yaml}}}}\noutput_dir: out/dpo\n"
        "dpo: {loss_type: sigmoid}\ntraining: {max_length: 64}\n")
    prep_node, dpo_node = run(in_tmp / "dpo.yaml", STEPS)
    assert (prep_node.recipe.stage, dpo_node.recipe.stage) == ("prep", "dpo")
    prepared = json.loads((prep_node.out_dir / "summary.json").read_text())
    assert prepared["dropped"] == {"transcripts differ before the last assistant turn": 1}
    assert prepared["kept"] + 1 == prepared["rows_read"] == 121
    s = summary_of(dpo_node)
    assert s["train_pairs"] == prepared["splits"]["train"] and s["steps"] == 2
    assert s["eval_pairs"] + s["dropped/held-out, prompt fills max_length"] == prepared["splits"]["test"] > 0
    assert "eval_rewards/accuracies" in s
    assert json.loads((dpo_node.out_dir / "run_info.json").read_text())["inputs"]["data"] == str(prep_node.out_dir)

    # Unchanged: both skipped. A changed source file reruns prep and dpo.
    assert all(n.hash == m.hash for n, m in zip(plan(in_tmp / "dpo.yaml", STEPS), (prep_node, dpo_node)))
    with (in_tmp / "hh.jsonl").open("a") as fh:
        fh.write(json.dumps({"chosen": f"{H}new{A}yes", "rejected": f"{H}new{A}no"}) + "\n")
    again = plan(in_tmp / "dpo.yaml", STEPS)
    assert [n.hash != m.hash for n, m in zip(again, (prep_node, dpo_node))] == [True, True]


def test_reward_reads_transcripts_directly_and_counts_held_out_after_filtering(in_tmp, tiny_base):
    """Long pairs are dropped by the trainer's length filter on both sides; eval_pairs counts what is scored."""
    src = write_jsonl(in_tmp / "hh.jsonl", transcripts(160, long_every=4))
    [node] = run(RECIPES / "reward.yaml", [f"model={tiny_base}", f"data.source={src}", "data.eval_examples=40",
                                           "training.max_length=48", "output_dir=out/r", *STEPS])
    s = summary_of(node)
    assert s["eval_pairs"] + s["dropped/held-out, longer than max_length"] == 40
    assert 0 < s["dropped/held-out, longer than max_length"] < 40 and s["dropped/longer than max_length"] > 0
    assert s["train_pairs"] + s["dropped/longer than max_length"] == 120


def test_dpo_reads_conversational_pairs_and_every_pair_too_long_is_one_line(in_tmp, tiny_base):
    system = {"role": "system", "content": "Be polite."}
    rows = [{"prompt": [system, {"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in world.preference_pairs(48, seed=5)]
    src = write_jsonl(in_tmp / "conv.jsonl", rows)
    base = [f"model={tiny_base}", f"data.source={src}", "data.eval_examples=8", *STEPS]
    [node] = run(RECIPES / "dpo.yaml", [*base, "output_dir=out/d"])
    assert summary_of(node)["train_pairs"] == 40 and summary_of(node)["steps"] == 2
    from alignment.errors import RecipeError

    with pytest.raises(RecipeError, match=r"training.max_length: 4: all 40 training pairs were dropped"):
        run(RECIPES / "dpo.yaml", [*base, "training.max_length=4", "output_dir=out/short"])
    assert not (in_tmp / "out" / "short").exists()


def test_trl_trainers_read_the_output_unchanged(tmp_path, tiny_base):
    """TRL's DPOTrainer and RewardTrainer take `load_dataset("json", ...)` of our files as they are."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    src = write_jsonl(tmp_path / "hh.jsonl", transcripts(40))
    assert main(["pairs", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    ds = load_dataset("json", data_files=str(tmp_path / "out" / "train.jsonl"), split="train")
    assert {"score_chosen", "source", "id"} <= set(ds.column_names)

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    common = dict(max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True, max_length=96,
                  logging_steps=1, save_strategy="no", disable_tqdm=True)
    policy = LlamaForCausalLM(config)
    dpo = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
                     train_dataset=ds, processing_class=tok)
    assert dpo.train().global_step == 2
    rm = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1}))
    reward = RewardTrainer(model=rm, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common),
                           train_dataset=ds, processing_class=tok)
    assert reward.train().global_step == 2


def test_onpolicy_command_end_to_end(tmp_path, tiny_base, reward_dir):
    """A tiny real policy samples 3 replies to each of 12 demo prompts, a tiny real reward model
    scores them, and the pairs that clear the margin are written."""
    out = tmp_path / "onpolicy"
    code = main(["onpolicy", "--model", str(tiny_base), "--prompts", "demo", "--num-prompts", "12", "--k", "3",
                 "--reward-model", str(reward_dir), "--max-new-tokens", "6", "--test-fraction", "0", "--quiet",
                 "--out", str(out)])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rows_read"] == 12 and s["kept"] > 0 and s["kept"] + sum(s["dropped"].values()) == 12
    pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    prompts = {c["messages"][0]["content"] for c in world.sft_conversations(12, 0)}
    assert len(pairs) == s["kept"]
    for pair in pairs:
        assert pair["prompt"][0]["content"] in prompts and pair["chosen"] != pair["rejected"]
        assert pair["score_chosen"] > pair["score_rejected"]


def test_onpolicy_command_scores_with_a_reward_function_given_the_prompt_columns(tmp_path, tiny_base):
    """--reward-fn: the function is given each prompt row's other columns (here a target length) as
    the RL stages give them, and every pair is the reply it scores highest against the lowest."""
    (tmp_path / "score.py").write_text(
        "def near(completions, target, **kwargs):\n    return [-abs(len(c) - t) for c, t in zip(completions, target)]\n")
    targets = {f"repeat: w{i} v{i}": 3 * i for i in range(8)}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "target": t} for p, t in targets.items()])
    out = tmp_path / "onpolicy"
    assert main(["onpolicy", "--model", str(tiny_base), "--prompts", str(prompts), "--k", "3", "--reward-fn",
                 f"{tmp_path}/score.py:near", "--max-new-tokens", "6", "--test-fraction", "0", "--quiet",
                 "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert pairs
    for pair in pairs:
        target = targets[pair["prompt"][0]["content"]]
        chosen, rejected = (len(pair[side][0]["content"]) for side in ("chosen", "rejected"))
        assert (pair["score_chosen"], pair["score_rejected"]) == (-abs(chosen - target), -abs(rejected - target))
        assert pair["score_chosen"] > pair["score_rejected"] and pair["generated"] is True


def test_onpolicy_keeps_best_against_worst_when_the_margin_clears(tiny_base, reward_dir):
    """k=3 replies per prompt from a tiny real policy, scored by a tiny real reward model: each
    prompt's pair is its best reply against its worst, kept when the gap clears min_margin; a bad
    prompt passes through with its reason; identical samples tie."""
    from alignment import evaluation
    from alignment.models import load_causal_lm, load_classifier, load_tokenizer
    from data_prep.onpolicy import onpolicy_rows
    from data_prep.read import Bad

    texts = world.eval_prompts(6, 0)
    prompts = [("f:1", texts[0]), ("f:2", Bad("not valid JSON")), *((f"f:{i + 3}", t) for i, t in enumerate(texts[1:]))]
    sampling = {"max_new_tokens": 6, "temperature": 1.0, "seed": 0, "progress": False}
    # What onpolicy_rows sees: the toolkit's seeded sampler (same seed, same replies) and reward model.
    tok = load_tokenizer(str(tiny_base))
    replies = evaluation.generate(load_causal_lm(str(tiny_base), tok), tok, [t for t in texts for _ in range(3)], **sampling)
    rm_tok = load_tokenizer(str(reward_dir))
    scores = evaluation.reward_scores(load_classifier(str(reward_dir), rm_tok), rm_tok, replies)
    groups = [sorted(zip(scores[3 * i : 3 * i + 3], (r.text for r in replies[3 * i : 3 * i + 3]))) for i in range(len(texts))]
    gaps = sorted(group[-1][0] - group[0][0] for group in groups)
    min_margin = (gaps[2] + gaps[3]) / 2  # half the prompts clear it

    rows = onpolicy_rows(prompts, str(tiny_base), k=3, reward_model=str(reward_dir), min_margin=min_margin, **sampling)
    assert [o for o, _ in rows] == [o for o, _ in prompts]
    assert rows[1][1].reason == "not valid JSON"
    made = [row for _, row in rows[:1] + rows[2:]]
    for text, group, row in zip(texts, groups, made):
        (low, worst), (high, best) = group[0], group[-1]
        if high - low >= min_margin:
            assert row == {"prompt": text, "chosen": best, "rejected": worst, "generated": True,
                           "score_chosen": pytest.approx(high), "score_rejected": pytest.approx(low)}
        else:
            assert row.reason == "score margin below min_margin"
    assert sum(isinstance(row, dict) for row in made) == 3

    # Nucleus sampling at top_p near 0 draws the most likely token every time: the k replies are
    # the same, and so are their gold scores.
    [(_, tie)] = onpolicy_rows(prompts[:1], str(tiny_base), k=3, reward_model=None, min_margin=0.1, top_p=1e-6, **sampling)
    assert tie.reason == "all samples scored the same"


def test_token_limits_count_with_the_given_tokenizer(tmp_path, tiny_base):
    """Counts from the Rust backend (each distinct text once) equal the tokenizer's own, and the
    command's --tokenizer/--max-length drop exactly the rows over the limit."""
    from transformers import AutoTokenizer

    from data_prep.prepare import token_lengths

    tok = AutoTokenizer.from_pretrained(tiny_base)
    texts = ["repeat: cat dog", "Sure! cat dog", "Ça va ? 🙂", "repeat: cat dog", ""]
    assert token_lengths(tok, texts) == [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]

    rows = [{"prompt": "repeat: cat dog", "chosen": "Sure! cat dog" + " dog" * n, "rejected": "Ugh."} for n in range(0, 40, 4)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    limit = 20
    lengths = [sum(token_lengths(tok, [r["prompt"]])) + max(token_lengths(tok, [r["chosen"], r["rejected"]])) for r in rows]
    assert main(["pairs", str(src), "--tokenizer", str(tiny_base), "--max-length", str(limit), "--test-fraction", "0",
                 "--quiet", "--out", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["kept"] == sum(n <= limit for n in lengths) and s["dropped"] == {f"longer than {limit} tokens": sum(n > limit for n in lengths)}
    assert 0 < s["kept"] < len(rows)


@pytest.mark.parametrize("kind, stage, trained", [("pairs", "dpo", "train_pairs"), ("binary", "kto", "train_rows")])
def test_an_empty_sampled_reply_that_scored_worst_is_kept_and_trains(in_tmp, tiny_base, monkeypatch, kind, stage, trained):
    """A stand-in sampler answers each prompt with a good reply and an empty one (the model stopped at
    once), the empty one scored worst: every pair (kind pairs) or undesirable row (kind binary) with the
    empty reply is kept, counted, and the dpo / kto stage trains a step on it, the empty reply being the
    chat template's empty assistant turn."""
    from data_prep import onpolicy

    def sampler(prompts, model_path, *, k, stats=None, **_):
        if stats is not None:
            stats.update(samples=k * len(prompts), mean_score=0.5)
        return [[(1.0, "Sure! " + p.split(": ", 1)[-1]), (0.0, "")] for p in prompts]

    monkeypatch.setattr(onpolicy, "sample_and_score", sampler)
    threshold = "  threshold: 0.5\n" if kind == "binary" else ""
    (in_tmp / "prep.yaml").write_text(
        f"stage: prep\nmodel: {tiny_base}\nprep:\n  kind: {kind}\n{threshold}  test_fraction: 0\n"
        "  sources: [{path: demo, name: sampled, num_examples: 6, samples: {k: 2}}]\n")
    (in_tmp / "train.yaml").write_text(
        f"stage: {stage}\nmodel: {tiny_base}\ndata: {{source: {{from: prep.yaml}}, eval_examples: 0}}\n"
        "training: {max_length: 64, max_steps: 1, per_device_train_batch_size: 4, logging_steps: 1}\n")
    prep_node, node = run(in_tmp / "train.yaml")
    rows = [json.loads(line) for line in (prep_node.out_dir / "train.jsonl").read_text().splitlines()]
    prompts = {r["prompt"][0]["content"] for r in rows}
    empty = [r for r in rows if not (r.get("rejected") or r.get("completion"))[0]["content"]]
    assert len(rows) == len(prompts) * (2 if kind == "binary" else 1) and len(prompts) >= 5
    assert len(empty) == len(prompts) and all(r["generated"] for r in rows)
    assert summary_of(prep_node)["samples/sampled/empty_replies"] == len(prompts)
    assert summary_of(node)[trained] == len(rows)
    losses = [json.loads(line)["loss"] for line in (node.out_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and "summary" not in line]
    assert len(losses) == 1 and losses[0] == losses[0]  # one step, a number (not NaN)
