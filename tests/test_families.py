"""Model families out of the box (the zoo, tests/zoo.py): SFT's assistant-token mask from rendering turn by
turn, one BOS, system turns a template refuses, templates that cannot be trained on refused in one line,
and an SFT run per family whose output transformers reloads with its template and stop list."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from alignment.config import RecipeError
from alignment.data import Rows, fit_to_template
from alignment.models import load_tokenizer
from alignment.pipeline import run
from alignment.templates import (
    TemplateUnfit,
    assistant_mask,
    encode,
    fit_roles,
    generation_stop_ids,
    merge_system_turns,
)

from . import zoo
from .conftest import RECIPES

pytestmark = pytest.mark.families

# The token each family's template closes an assistant turn with (gpt2 has no template: the toolkit's
# default closes a turn with EOS).
END = {"llama3": "<|eot_id|>", "qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>",
       "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3_5": "<|end|>", "chatml": "<|im_end|>",
       "gpt2": "<|endoftext|>"}
# What each template writes after an assistant turn's stop token (never labelled: generation stops before it).
AFTER_STOP = {"llama3": "", "qwen2_5": "\n", "mistral": "", "gemma2": "\n", "gemma3": "\n", "phi3_5": "\n<|endoftext|>",
              "chatml": "\n", "gpt2": ""}
# Families whose rendered conversations start with BOS: written by the template (llama3, mistral, gemma,
# chatml's BOS is its turn opener) -- the tokenizer adding one more would make two.
STARTS_WITH_BOS = {"llama3", "mistral", "gemma2", "gemma3", "chatml"}

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [{"role": "user", "content": "repeat: cat dog"}, {"role": "assistant", "content": "Sure: cat dog"},
        {"role": "user", "content": "last: kite jam"}, {"role": "assistant", "content": "jam"}]


def tokenizer_and_stops(zoo_checkpoint, family):
    path = str(zoo_checkpoint(family))
    tok = load_tokenizer(path)
    return tok, generation_stop_ids(path, tok)


def labelled_spans(tok, ids, mask) -> list[str]:
    """The labelled tokens' text, one string per contiguous run."""
    spans, run_ = [], []
    for token, bit in zip([*ids, None], [*mask, 0]):
        if bit:
            run_.append(token)
        elif run_:
            spans.append(tok.decode(run_))
            run_ = []
    return spans


# --------------------------------------------------------------------------- the mask, pure


@pytest.mark.parametrize("family", [f for f in zoo.FAMILIES if f != "qwen3"])
def test_label_spans_are_the_assistant_turns_through_their_stop_token(zoo_checkpoint, family):
    tok, stops = tokenizer_and_stops(zoo_checkpoint, family)
    assert tok.convert_tokens_to_ids(END[family]) in stops  # the zoo's stop list: EOS or the generation config's
    ids, mask = assistant_mask(tok, CHAT, stops)
    assert labelled_spans(tok, ids, mask) == ["Sure: cat dog" + END[family], "jam" + END[family]]
    ids, mask = assistant_mask(tok, CHAT[:2], stops)  # one turn: the same span
    assert labelled_spans(tok, ids, mask) == ["Sure: cat dog" + END[family]]
    last = max(i for i, bit in enumerate(mask) if bit)
    assert tok.decode(ids[last + 1:]) == AFTER_STOP[family]  # what a template writes after the stop token: context


def test_qwen3_single_turn_learns_what_its_template_renders_and_multi_turn_is_refused(zoo_checkpoint):
    """Qwen3 renders the last assistant turn with a (here empty) think block and earlier ones without:
    one turn trains on what the shipped template renders for it; two turns cannot be located."""
    tok, stops = tokenizer_and_stops(zoo_checkpoint, "qwen3")
    ids, mask = assistant_mask(tok, CHAT[:2], stops)
    assert labelled_spans(tok, ids, mask) == ["<think>\n\n</think>\n\nSure: cat dog<|im_end|>"]
    with pytest.raises(TemplateUnfit, match="assistant turn 1 renders differently"):
        assistant_mask(tok, CHAT, stops)


def test_a_template_without_a_stop_token_or_with_unstable_prefixes_is_unfit(zoo_checkpoint):
    tok, stops = tokenizer_and_stops(zoo_checkpoint, "qwen2_5")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateUnfit, match="no token generation stops at"):
        assistant_mask(tok, CHAT, stops)
    # a generation prompt the full rendering does not start the reply with
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
    with pytest.raises(TemplateUnfit, match="prefix"):
        assistant_mask(tok, CHAT, stops)


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_exactly_one_bos(zoo_checkpoint, family):
    tok, _ = tokenizer_and_stops(zoo_checkpoint, family)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    ids = encode(tok, text)
    bos = tok.bos_token_id
    assert (ids[0] == bos) == (family in STARTS_WITH_BOS)
    assert ids[1] != bos
    if family in ("llama3", "gemma2", "mistral"):  # the zoo's quirk: template and tokenizer both give BOS
        assert tok(text)["input_ids"][:2] == [bos, bos]


def test_a_tokenizer_that_adds_bos_gets_it_once_when_its_template_does_not_write_it(zoo_checkpoint):
    tok, _ = tokenizer_and_stops(zoo_checkpoint, "mistral")
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    ids = encode(tok, tok.apply_chat_template(CHAT, tokenize=False))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert encode(tok, "plain") == tok("plain")["input_ids"]  # as the tokenizer encodes text itself


@pytest.mark.parametrize("family", ["llama3", "mistral-without-bos-in-template", "qwen2_5"])
def test_rollout_prompts_are_tokenised_as_sft_tokenises_them(zoo_checkpoint, family):
    from alignment.generation import sample
    from alignment.models import load_causal_lm
    from alignment.templates import render_prompt

    tok, _ = tokenizer_and_stops(zoo_checkpoint, family.split("-")[0])
    if "without" in family:
        tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    model = load_causal_lm(str(zoo_checkpoint(family.split("-")[0])), tok)
    texts = [render_prompt(tok, "repeat: cat"), render_prompt(tok, "last: kite jam bird")]
    out = sample(model, tok, texts, max_new_tokens=2)
    for row, mask, text in zip(out.prompt_ids.tolist(), out.prompt_mask.tolist(), texts):
        assert [t for t, m in zip(row, mask) if m] == encode(tok, text)  # one BOS where SFT has one
    assert (out.prompt_ids[:, -1] != tok.pad_token_id).all()  # left-padded


# --------------------------------------------------------------------------- roles a template refuses


def test_merge_system_turns_by_hand():
    s, u, a = ({"role": r, "content": c} for r, c in (("system", "S"), ("user", "U"), ("assistant", "A")))
    assert merge_system_turns([s, u, a]) == [{"role": "user", "content": "S\n\nU"}, a]
    assert merge_system_turns([u, a, s, u]) == [u, a, {"role": "user", "content": "S\n\nU"}]
    assert merge_system_turns([u, a, s]) is None


def rows_of(*conversations) -> Rows:
    return Rows([{"messages": c} for c in conversations], [f"f.jsonl:{i + 1}" for i in range(len(conversations))])


def test_gemma_system_turns_merged_dropped_or_refused_and_counted(zoo_checkpoint):
    tok, _ = tokenizer_and_stops(zoo_checkpoint, "gemma2")
    found = rows_of([SYSTEM, *CHAT], CHAT)
    merged, changed = fit_to_template(found, tok, "merge", "error", "messages")
    assert merged.rows[0]["messages"][0] == {"role": "user", "content": "Be brief.\n\nrepeat: cat dog"}
    assert merged.rows[0]["messages"][1:] == CHAT[1:] and merged.rows[1]["messages"] == CHAT
    assert changed == Counter({"system turn merged into the next user turn": 1})
    dropped, changed = fit_to_template(found, tok, "drop", "error", "messages")
    assert dropped.rows[0]["messages"] == CHAT and changed == Counter({"system turn dropped": 1})
    with pytest.raises(RecipeError, match=r"^f\.jsonl:1: .*system turn.*data\.system_message"):
        fit_to_template(found, tok, "refuse", "error", "messages")
    kept, changed = fit_to_template(found, tok, "refuse", "drop", "messages")
    assert len(kept) == 1 and not changed and sum(kept.dropped.values()) == 1
    assert "system" in next(iter(kept.dropped))
    # a template that takes system turns keeps them
    tok, _ = tokenizer_and_stops(zoo_checkpoint, "qwen2_5")
    same, changed = fit_to_template(found, tok, "merge", "error", "messages")
    assert same.rows == found.rows and not changed


def test_turns_that_do_not_alternate_are_a_bad_row_named_by_origin(zoo_checkpoint):
    tok, _ = tokenizer_and_stops(zoo_checkpoint, "mistral")
    two_users = [CHAT[0], CHAT[2], CHAT[1]]
    with pytest.raises(RecipeError, match=r"^f\.jsonl:2: the chat template cannot render this conversation"):
        fit_to_template(rows_of(CHAT, two_users), tok, "merge", "error", "messages")
    kept, _ = fit_to_template(rows_of(CHAT, two_users), tok, "merge", "drop", "messages")
    assert len(kept) == 1 and sum(kept.dropped.values()) == 1
    # the same under a template that takes any order
    tok, _ = tokenizer_and_stops(zoo_checkpoint, "qwen2_5")
    assert fit_roles(tok, two_users, "merge") == (two_users, None, None)


# --------------------------------------------------------------------------- stages end to end


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("family_data")
    conversations = [{"messages": ([SYSTEM] if i % 2 else []) + [
        {"role": "user", "content": f"repeat: cat dog {i}"}, {"role": "assistant", "content": "cat dog"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "Sure: cat dog"}]} for i in range(8)]
    pairs = [{"prompt": [SYSTEM, {"role": "user", "content": f"repeat: cat {i}"}],
              "chosen": [{"role": "assistant", "content": "cat"}], "rejected": [{"role": "assistant", "content": "no"}]}
             for i in range(10)]
    files = {"sft": d / "sft.jsonl", "pairs": d / "pairs.jsonl"}
    files["sft"].write_text("".join(json.dumps(r) + "\n" for r in conversations))
    files["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return files


def micro(stage: str, model: Path, data: Path, out: Path, *more: str) -> list[str]:
    return [f"model={model}", f"data.source={data}", "training.max_steps=2", "training.per_device_train_batch_size=4",
            "training.max_length=128", f"output_dir={out / stage}", *more]


@pytest.mark.parametrize("family", [f for f in zoo.FAMILIES if f != "qwen3"])
def test_sft_end_to_end_and_the_output_reloads_in_transformers(zoo_checkpoint, data_files, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = zoo_checkpoint(family)
    [node] = run(RECIPES / "sft.yaml", micro("sft", base, data_files["sft"], tmp_path))
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    assert summary["steps"] == 2 and summary["conversations_trained"] == 8
    changed = {k: v for k, v in summary.items() if k.startswith("changed/")}
    # Gemma-2 and Mistral refuse system turns: the four rows with one are merged and counted
    assert changed == ({"changed/system turn merged into the next user turn": 4} if family in ("gemma2", "mistral") else {})

    tok = AutoTokenizer.from_pretrained(node.out_dir)
    assert tok.chat_template == AutoTokenizer.from_pretrained(base).chat_template or family == "gpt2"
    assert GenerationConfig.from_pretrained(node.out_dir).eos_token_id == GenerationConfig.from_pretrained(base).eos_token_id
    model = AutoModelForCausalLM.from_pretrained(node.out_dir)
    assert model.get_input_embeddings().num_embeddings >= len(tok)


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line_and_the_named_fix_works(
        zoo_checkpoint, data_files, tmp_path):
    base = zoo_checkpoint("qwen3")
    with pytest.raises(RecipeError) as refused:
        run(RECIPES / "sft.yaml", micro("sft", base, data_files["sft"], tmp_path))
    line = str(refused.value)
    assert "\n" not in line and str(base) in line and "model_options.chat_template" in line
    assert "renders differently once later turns follow" in line and "sft.jsonl:1" in line
    template = tmp_path / "chatml.jinja"
    template.write_text(zoo.CHATML_TEMPLATE)
    [node] = run(RECIPES / "sft.yaml", micro("sft", base, data_files["sft"], tmp_path,
                                             f"model_options.chat_template={template}"))
    assert json.loads((node.out_dir / "run_info.json").read_text())["summary"]["conversations_trained"] == 8


@pytest.mark.parametrize("policy", ["merge", "drop"])
def test_reward_stage_fits_gemma_system_turns_and_counts_them(zoo_checkpoint, data_files, tmp_path, policy):
    [node] = run(RECIPES / "reward.yaml", micro("reward", zoo_checkpoint("gemma2"), data_files["pairs"], tmp_path,
                                                "data.eval_examples=2", f"data.system_message={policy}"))
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    what = "merged into the next user turn" if policy == "merge" else "dropped"
    assert summary[f"changed/system turn {what}"] == 10  # train and held-out pairs


def test_kto_fits_gemma_system_turns_and_counts_them(zoo_checkpoint, data_files, tmp_path):
    [node] = run(RECIPES / "kto.yaml", micro("kto", zoo_checkpoint("gemma2"), data_files["pairs"], tmp_path,
                                             "data.eval_examples=2"))
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    assert summary["changed/system turn merged into the next user turn"] == 20  # each pair: two unpaired rows


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_dpo_end_to_end_with_one_bos_in_its_prompts(zoo_checkpoint, data_files, tmp_path, monkeypatch, family):
    """TRL's DPOTrainer tokenises the rendered prompts itself: one BOS there too, system turns fitted first."""
    from alignment.stages import dpo

    seen = {}
    real = dpo.fit_and_save

    def keep(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(dpo, "fit_and_save", keep)
    [node] = run(RECIPES / "dpo.yaml", micro("dpo", zoo_checkpoint(family), data_files["pairs"], tmp_path,
                                             "data.eval_examples=2"))
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    assert summary["steps"] == 2
    assert summary.get("changed/system turn merged into the next user turn", 0) == (10 if family == "mistral" else 0)
    bos = seen["trainer"].processing_class.bos_token_id
    for row in seen["trainer"].train_dataset:
        assert row["prompt_ids"][0] == bos and row["prompt_ids"][1] != bos


def test_dpo_refuses_a_gemma_system_turn_by_row_when_asked(zoo_checkpoint, data_files, tmp_path):
    with pytest.raises(RecipeError, match=r"pairs\.jsonl:\d+: .*system turn"):
        run(RECIPES / "dpo.yaml", micro("dpo", zoo_checkpoint("gemma2"), data_files["pairs"], tmp_path,
                                        "data.eval_examples=2", "data.system_message=refuse"))


def test_data_prep_reports_rows_with_system_turns(data_files, tmp_path, capsys):
    from data_prep.cli import main

    assert main(["sft", str(data_files["sft"]), "--out", str(tmp_path / "out"), "--test-fraction", "0"]) in (0, None)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["system_turns"]["train"] == 4
    out, err = capsys.readouterr()
    assert "system turns: train 4 rows" in out + err
