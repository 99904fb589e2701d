"""`compare_models` and its statistics: win rates, KL, seeds, gold parts, bad input.
Tiny random models built in code and saved to temporary directories."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from alignment import cli, evaluation, report
from alignment.evaluation import CompareError, Generation, win_rate
from alignment.config import GenerationOptions, PromptOptions
from alignment.demo import world
from alignment.report_html import render_html
from alignment.stages.init import train_tokenizer

from .test_compare import forced_lm, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = world.eval_prompts(6, seed=0)
SAMPLED = GenerationOptions(max_new_tokens=6, temperature=1.0, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(world.pretrain_corpus(300, seed=0), vocab_size=320)


def save_lm(tok, directory, seed):
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(tok)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def dirs(tok, tmp_path_factory):
    """Model directories: a, a_copy (the same weights), b (other weights), rm (a reward model),
    rm2 (a two-label classifier), other_tok (a model on a different tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    out = {"a": save_lm(tok, root / "a", 0), "a_copy": save_lm(tok, root / "a_copy", 0), "b": save_lm(tok, root / "b", 1)}
    torch.manual_seed(2)
    LlamaForSequenceClassification(tiny_config(tok, num_labels=1)).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    out["rm"] = str(root / "rm")
    LlamaForSequenceClassification(tiny_config(tok, num_labels=2)).save_pretrained(root / "rm2")
    tok.save_pretrained(root / "rm2")
    out["rm2"] = str(root / "rm2")
    other = train_tokenizer(world.pretrain_corpus(300, seed=1), vocab_size=300)
    out["other_tok"] = save_lm(other, root / "other_tok", 3)
    return out


# ---------------------------------------------------------------- arithmetic on hand-made scores

def test_win_rate_counts_ties_half():
    a = [1.0, 0.0, 0.5, 0.5, 0.75]
    b = [0.0, 0.25, 0.5, 0.5, 0.25]
    r = win_rate(a, b)
    assert (r["win"], r["tie"], r["loss"]) == (0.4, 0.4, 0.2)
    assert r["win_rate"] == pytest.approx(0.4 + 0.4 / 2)
    assert r["lo"] <= r["win_rate"] <= r["hi"]
    mirror = win_rate(b, a)
    assert mirror["win_rate"] == pytest.approx(1 - r["win_rate"])


def test_win_rate_of_a_model_that_always_wins_has_zero_width():
    assert win_rate([1, 1, 1, 1], [0, 0, 0, 0]) == {
        "win": 1.0, "tie": 0.0, "loss": 0.0, "win_rate": 1.0, "lo": 1.0, "hi": 1.0}
    all_ties = win_rate([0.5] * 6, [0.5] * 6)
    assert (all_ties["win_rate"], all_ties["lo"], all_ties["hi"]) == (0.5, 0.5, 0.5)


def test_win_rate_resamples_prompts_not_replies():
    """Two samples per prompt: prompt 1 is won twice, prompt 2 lost twice. Per-prompt outcomes are
    1 and 0; a bootstrap over 2 prompts gives means in {0, 0.5, 1} only."""
    r = win_rate([1, 1, 0, 0], [0, 0, 1, 1], samples_per_prompt=2)
    assert r["win_rate"] == 0.5 and r["lo"] == 0.0 and r["hi"] == 1.0


def test_per_prompt_means_are_prompt_major():
    assert evaluation.per_prompt([1, 3, 5, 7, 0, 2], 2).tolist() == [2.0, 6.0, 1.0]


def test_summary_on_hand_made_scores():
    gens = {label: [Generation(p, "x", True, n) for p, n in zip(PROMPTS[:4], lengths)]
            for label, lengths in (("base", [2, 4, 6, 8]), ("sft", [2, 2, 2, 2]))}
    scores = {"gold": {"base": [0.0, 0.25, 0.5, 0.25], "sft": [0.5, 0.25, 1.0, 0.75]}}
    summary = evaluation.summarize(gens, scores, {"sft": [1.0, 2.0, 3.0, 6.0], "base": [0.0] * 4},
                                {"samples_per_prompt": 1, "seed": 0}, baseline="base")
    sft = summary["models"]["sft"]
    assert sft["gold_mean"] == pytest.approx(0.625) and sft["kl_mean"] == pytest.approx(3.0)
    assert sft["kl_lo"] < 3.0 < sft["kl_hi"]
    assert summary["models"]["base"]["length_mean"] == 5.0 and summary["models"]["base"]["length_max"] == 8
    assert summary["models"]["base"]["length_score_corr"] == pytest.approx(np.corrcoef([2, 4, 6, 8], [0, .25, .5, .25])[0, 1])
    assert sft["length_score_corr"] is None  # constant length
    [w] = summary["win_rates"]
    assert (w["a"], w["b"], w["win"], w["tie"], w["loss"]) == ("sft", "base", 0.75, 0.25, 0.0)
    [d] = summary["differences"]
    assert (d["a"], d["b"]) == ("sft", "base") and d["mean"] == pytest.approx(0.375)


# ---------------------------------------------------------------- gold parts

def test_gold_parts_sum_to_the_gold_score():
    prompt = PROMPTS[0]
    good = world.good_response(world.parse_prompt(prompt))
    gens = [Generation(prompt, good, True, 5), Generation(prompt, good, False, 9), Generation(prompt, "Ugh. " + good[6:], True, 4),
            Generation(prompt, "Sure! nope nope nope nope", True, 6), Generation(prompt, "", True, 1)]
    parts = evaluation.gold_parts(gens)
    assert list(parts) == ["polite", "content", "concise"]
    assert [sum(p) for p in zip(*parts.values())] == evaluation.gold_scores(gens)
    assert parts["polite"] == [0.25, 0.25, 0.0, 0.25, 0.0] and parts["content"][:3] == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------- generation, KL, seeds

def test_kl_is_exactly_zero_for_identical_models_and_positive_for_different_ones(dirs):
    result = evaluation.compare_models({"a": dirs["a"], "same": dirs["a_copy"], "b": dirs["b"]}, PROMPTS, SAMPLED,
                                    baseline="a", progress=False)
    models = result.summary["models"]
    assert (models["same"]["kl_mean"], models["same"]["kl_lo"], models["same"]["kl_hi"]) == (0.0, 0.0, 0.0)
    assert all(row["replies"]["same"]["logratio"] == 0.0 for row in result.samples)
    assert models["b"]["kl_mean"] > 1.0 and models["b"]["kl_lo"] > 0
    assert models["a"]["kl_mean"] == 0.0  # the baseline itself
    # identical seeds: the same weights give the same replies
    assert all(row["replies"]["same"]["text"] == row["replies"]["a"]["text"] for row in result.samples)
    assert any(row["replies"]["b"]["text"] != row["replies"]["a"]["text"] for row in result.samples)


def test_reply_logprob_sums_match_a_per_row_forward_pass(tok, dirs):
    """The batched, left-padded pass gives each reply the log-prob a single-row pass gives it."""
    model = LlamaForCausalLM.from_pretrained(dirs["b"]).eval()
    _, [batch] = evaluation.generate_with_samples(model, tok, PROMPTS[:4], max_new_tokens=5, temperature=1.0,
                                               progress=False)
    for temperature in (1.0, 2.0):
        together = evaluation.reply_logprob_sums(model, batch, temperature)
        for i in range(4):
            keep = batch.prompt_mask[i].bool()
            prompt, reply = batch.prompt_ids[i][keep][None], batch.response_ids[i][None]
            with torch.no_grad():
                logits = model(torch.cat([prompt, reply], 1)).logits[0, prompt.shape[1] - 1 : -1].float()
            logp = torch.log_softmax(logits / temperature, -1).gather(-1, reply[0, :, None])[:, 0]
            assert together[i].item() == pytest.approx((logp * batch.response_mask[i]).sum().item(), abs=1e-4)


def test_generation_stops_at_every_eos_id_of_the_generation_config(tok):
    """A model whose generation config lists a second EOS id (as Qwen's does) stops there too."""
    word_id = tok.encode(" cat", add_special_tokens=False)[0]
    model = forced_lm(tok, word_id)
    assert evaluation.generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False)[0].finished is False
    model.generation_config.eos_token_id = [tok.eos_token_id, word_id]
    for g in evaluation.generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False):
        assert (g.finished, g.num_tokens) == (True, 1)


def test_checkpoint_generation_settings_are_not_applied_and_the_report_says_so(tok, dirs, tmp_path):
    """A copy of `a` whose generation_config asks for no repeats and a min-p cut samples
    exactly what `a` samples (KL 0), and the report lists what was set aside."""
    path = save_lm(tok, tmp_path / "a_settings", 0)
    config = LlamaForCausalLM.from_pretrained(path).generation_config
    config.do_sample, config.no_repeat_ngram_size, config.min_p = True, 1, 0.5
    config.save_pretrained(path)
    result = evaluation.compare_models({"a": dirs["a"], "set": path}, PROMPTS, SAMPLED, baseline="a", progress=False)
    assert all(row["replies"]["set"]["text"] == row["replies"]["a"]["text"] for row in result.samples)
    assert result.summary["models"]["set"]["kl_mean"] == 0.0
    settings = result.summary["settings"]
    assert settings["decoding"] == {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert settings["checkpoint_settings_not_applied"] == {"set": {"min_p": 0.5, "no_repeat_ngram_size": 1}}
    report.write_outputs(result, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "'set': its generation_config's min_p=0.5, no_repeat_ngram_size=1 not applied" in md
    assert "top_k=0" in md
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["checkpoint_settings_not_applied"]


def test_same_seed_same_samples_other_seed_other_samples(dirs):
    def texts(seed):
        gen = SAMPLED.model_copy(update={"seed": seed, "samples_per_prompt": 2})
        result = evaluation.compare_models({"a": dirs["a"], "b": dirs["b"]}, PROMPTS[:3], gen, baseline="a", progress=False)
        return [(row["prompt"], row["sample"], row["replies"]["b"]["text"]) for row in result.samples]

    first = texts(0)
    assert first == texts(0)
    assert first != texts(1)
    assert [(p, s) for p, s, _ in first] == [(p, s) for p in PROMPTS[:3] for s in (0, 1)]
    assert first[0][2] != first[1][2]  # two samples of one prompt differ


def test_reward_model_scores_and_per_part_means(dirs):
    result = evaluation.compare_models({"a": dirs["a"], "b": dirs["b"]}, PROMPTS, SAMPLED, baseline="a",
                                    reward_model=dirs["rm"], progress=False)
    s = result.summary
    assert s["score_kinds"] == ["gold", "reward"] and s["parts"] == ["polite", "content", "concise"]
    for m in s["models"].values():
        assert m["gold_mean"] == pytest.approx(m["polite_mean"] + m["content_mean"] + m["concise_mean"])
        assert m["reward_lo"] <= m["reward_mean"] <= m["reward_hi"]
    assert {w["score"] for w in s["win_rates"]} == {"gold", "reward"}
    assert len({row["replies"]["b"]["reward"] for row in result.samples}) > 1


def test_different_tokenizers_compare_text_but_not_kl(dirs):
    result = evaluation.compare_models({"a": dirs["a"], "other": dirs["other_tok"]}, PROMPTS[:3], SAMPLED,
                                    baseline="a", progress=False)
    other = result.summary["models"]["other"]
    assert other["kl_mean"] is None and other["gold_mean"] is not None
    assert any("'other'" in n and "tokenizer differs" in n for n in result.summary["notes"])


def test_no_gold_for_prompts_outside_the_demo_world(dirs, tmp_path):
    (tmp_path / "p.txt").write_text("Tell me a story\nWhat is 2+2?\n")
    prompts, source = evaluation.load_prompts(PromptOptions(source=str(tmp_path / "p.txt")))
    assert prompts == ["Tell me a story", "What is 2+2?"] and source.endswith("p.txt")
    result = evaluation.compare_models({"a": dirs["a"], "b": dirs["b"]}, prompts, SAMPLED, baseline="a",
                                    prompt_source=source, progress=False)
    assert result.summary["score_kinds"] == [] and result.summary["win_rates"] == []
    assert result.summary["models"]["b"]["kl_mean"] > 0
    table = report.text_table(result.summary)
    assert table.splitlines()[0].split() == ["model", "EOS", "tokens", "KL", "to", "a", "[95%", "CI]"]
    assert "note: no gold scores" in table
    assert report.title(result.summary).startswith("Scores on 2 prompts from ")
    assert "Tell me a story" in report.markdown(result.summary, result.samples)
    assert "Tell me a story" in render_html(result.summary, result.samples)


# ---------------------------------------------------------------- prompts

def test_prompt_files(tmp_path):
    rows = [{"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert evaluation.load_prompts(PromptOptions(source=str(tmp_path / "p.jsonl"), num_prompts=2))[0] == ["one", "two"]
    from datasets import Dataset

    Dataset.from_dict({"question": ["a?", "b?"]}).save_to_disk(str(tmp_path / "saved"))
    assert evaluation.load_prompts(PromptOptions(source=str(tmp_path / "saved"), field="question"))[0] == ["a?", "b?"]
    demo, what = evaluation.load_prompts(PromptOptions(num_prompts=5))
    assert demo == world.eval_prompts(5, 0) and what == "held-out demo prompts"


@pytest.mark.parametrize("name, text, expected", [
    ("empty.txt", "", "empty.txt: empty file"),
    ("gap.txt", "one\n\nthree\n", "gap.txt:2: empty line"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
    ("field.jsonl", '{"prompt": "ok"}\n{"question": "x"}\n', "field.jsonl:2: missing 'prompt'"),
    ("empty.jsonl", "", "empty.jsonl: empty file"),
])
def test_bad_prompt_files_name_the_line(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(CompareError) as err:
        evaluation.load_prompts(PromptOptions(source=str(tmp_path / name)))
    assert err.value.arg == "prompts" and expected in err.value.message


@pytest.mark.parametrize("name", ["p.jsonl", "p.txt", "demo"])
def test_a_split_of_a_prompt_file_is_refused(tmp_path, name):
    """prompts.split names a part of a hub dataset or a saved DatasetDict: with a file (or the demo
    prompts) it would be ignored, so it is refused, naming the split and the source."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "one"}) + "\n")
    (tmp_path / "p.txt").write_text("one\n")
    source = name if name == "demo" else str(tmp_path / name)
    with pytest.raises(CompareError) as err:
        evaluation.load_prompts(PromptOptions(source=source, split="test"))
    assert err.value.arg == "split" and err.value.message.startswith("'test' applies only to a hub dataset")
    assert ("demo data" if name == "demo" else f"the file {source} ") in err.value.message
    assert evaluation.load_prompts(PromptOptions(source=str(tmp_path / "p.jsonl"), split="train"))[0] == ["one"]


# ---------------------------------------------------------------- the command's bad input

def run_cli(args, capsys):
    code = cli.main(["compare", "--no-progress", "--num-prompts", "3", "--max-new-tokens", "4", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


# The whole message: {a}, {b}, {rm2}, {tmp} are filled in; "..." stands for what depends on
# the machine (why the hub cannot be reached).
@pytest.mark.parametrize("args, expected", [
    (["{a}"], "MODEL: need at least two models to compare, got 1"),
    (["{a}", "{tmp}/nope"], "MODEL: cannot load model config '{tmp}/nope': not a local directory, and the hub cannot be "
                            "reached (...) and it is not in the local cache. Pass a local path or download it first."),
    (["{a}", "{rm2}"], "MODEL: rm2: {rm2} is a sequence classifier (a reward model), its config says "
                       "LlamaForSequenceClassification; expected a causal language model (a policy)"),
    (["{a}", "{b}", "--reward-model", "{a}"], "--reward-model: {a} is a causal language model, its config says "
     "LlamaForCausalLM; expected a one-label sequence classifier (a reward model; train one with the reward stage)"),
    (["{a}", "{b}", "--reward-model", "{rm2}"], "--reward-model: {rm2} is a sequence classifier with 2 label(s), its "
     "config says LlamaForSequenceClassification; expected a one-label sequence classifier (a reward model; train "
     "one with the reward stage)"),
    (["{a}", "{b}", "--baseline", "c"], "--baseline: 'c' is not a model label (a, b)"),
    (["{a}", "{b}", "--prompts", "{tmp}/missing.txt"], "--prompts: {tmp}/missing.txt: no such file"),
    (["{a}", "{b}", "--prompts", "{tmp}/empty.txt"], "--prompts: {tmp}/empty.txt: empty file (no rows)"),
    (["{a}", "{b}", "--temperature", "-1"], "--temperature: Input should be greater than or equal to 0"),
    (["{a}", "{b}", "--greedy", "--samples-per-prompt", "2"],
     "--samples-per-prompt: samples_per_prompt > 1 needs temperature > 0 (greedy replies are all the same)"),
    (["x={a}", "x={b}"], "MODEL: two models are labelled 'x'; name them LABEL=PATH"),
    (["{a}", "{tmp}/absent.yaml"], "MODEL: {tmp}/absent.yaml: no such recipe"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(dirs, tmp_path, capsys, args, expected):
    (tmp_path / "empty.txt").write_text("")
    fill = {"a": dirs["a"], "b": dirs["b"], "rm2": dirs["rm2"], "tmp": tmp_path}
    code, lines = run_cli([a.format(**fill) for a in args] + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2
    message = ".+".join(re.escape(part.format(**fill)) for part in expected.split("..."))
    assert len(lines) == 1 and re.fullmatch("error: " + message, lines[0]), lines
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]  # no temporary directory left either


def test_an_output_directory_not_ours_is_never_replaced(dirs, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("precious")
    code, lines = run_cli([dirs["a"], dirs["b"], "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and lines == [f"error: --out: {tmp_path / 'out'} exists and was not written by alignment compare; choose another"]
    assert (tmp_path / "out" / "mine.txt").read_text() == "precious"
