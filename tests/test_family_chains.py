"""Every stage end to end on each family of the zoo (tests/zoo.py), at the smallest size: one chain per
family, built once per module -- sft -> reward, dpo, kto; sft -> ppo (the family's reward model), grpo (its
reward model and a reward function), rloo (a reward function); `alignment compare` of the family's sft
against its base with its reward model; `python -m data_prep` with its tokenizer, and `data_prep onpolicy`
sampling from its sft and scoring with its reward model. The tests read what
the chain left: replies stop at the family's stop tokens, every output reloads in plain transformers with
the chat template and the stop list. Where the reward model is read is tested in test_reward_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.pipeline import run

from . import zoo
from .conftest import RECIPES
from .test_families import END

pytestmark = pytest.mark.families

SYSTEM = {"role": "system", "content": "Be brief."}
STAGES = ("sft", "reward", "dpo", "kto", "ppo", "grpo", "rloo")
REWARD_FN = "def score(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"


def conversations(multi_turn: bool) -> list[dict]:
    """Short replies, so that a few SFT steps teach the stop token (rollouts then finish)."""
    rows = []
    for i in range(8):
        turns = [{"role": "user", "content": f"repeat: cat {i}"}, {"role": "assistant", "content": "cat"}]
        if multi_turn and i % 4 < 2:
            turns += [{"role": "user", "content": "again"}, {"role": "assistant", "content": "dog"}]
        rows.append({"messages": ([SYSTEM] if i % 2 else []) + turns})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chain_data")
    earlier = [{"role": "user", "content": "first: dog"}, {"role": "assistant", "content": "dog"}]
    pairs = [{"prompt": [SYSTEM, *(earlier if i % 3 == 0 else []), {"role": "user", "content": f"repeat: cat {i}"}],
              "chosen": [{"role": "assistant", "content": "cat"}], "rejected": [{"role": "assistant", "content": "no"}]}
             for i in range(6)]  # a system turn in each, two of them multi-turn
    (d / "rewards.py").write_text(REWARD_FN)
    return {
        "sft": write_jsonl(d / "sft.jsonl", conversations(multi_turn=True)),
        # Qwen3's template renders earlier turns' reasoning differently: multi-turn SFT on it is refused in one
        # line (test_families.py); its chain learns single-turn chats
        "sft_single": write_jsonl(d / "sft_single.jsonl", conversations(multi_turn=False)),
        "pairs": write_jsonl(d / "pairs.jsonl", pairs),
        # for data_prep: one row far over its token limit
        "prep": write_jsonl(d / "prep.jsonl", conversations(multi_turn=True) + [{"messages": [
            {"role": "user", "content": "say a lot"}, {"role": "assistant", "content": "cat dog kite jam " * 40}]}]),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": f"repeat: cat {i}"} for i in range(4)]),
        "reward_fn": d / "rewards.py",
    }


def rl(stage: str, *more: str) -> list[str]:
    return [f"{stage}.total_episodes=4", f"{stage}.batch_size=4", f"{stage}.num_minibatches=1",
            f"{stage}.response_length=8", "report.models={}", *more]


@pytest.fixture(scope="module", params=list(zoo.FAMILIES))
def chain(request, files, tmp_path_factory, zoo_checkpoint):
    """The family's chain: {'base', stage: output dir, 'rollouts': [(response ids, finished)], 'compare': dir,
    'data_prep': dir}. A stage that raises fails every test of the family."""
    from alignment.stages import rl as loop

    family = request.param
    base = zoo_checkpoint(family)
    out = tmp_path_factory.mktemp(f"chain_{family}")
    got: dict = {"base": base, "rollouts": {}, "said": []}

    def stage(name: str, model: Path, data: Path, *more: str) -> Path:
        [node] = run(RECIPES / f"{name}.yaml", [f"model={model}", f"data.source={data}", f"output_dir={out / name}",
                                                "training.per_device_train_batch_size=4", "training.max_length=128",
                                                *more])
        got[name] = node.out_dir
        return node.out_dir

    sft = stage("sft", base, files["sft_single" if family == "qwen3" else "sft"], "training.max_steps=8",
                "training.learning_rate=3e-2")  # enough for replies to stop within 6 tokens
    rm = stage("reward", sft, files["pairs"], "training.max_steps=1", "data.eval_examples=2")
    stage("dpo", sft, files["pairs"], "training.max_steps=1", "data.eval_examples=2", "report.models={}")
    stage("kto", sft, files["pairs"], "training.max_steps=1", "data.eval_examples=2", "report.models={}")

    real_rollout = loop.rollout

    def keep(*args, **kwargs):
        r = real_rollout(*args, **kwargs)
        got["rollouts"].setdefault(current, []).append((r.response_ids.clone(), r.response_mask.clone(), r.finished.clone()))
        return r

    real_build = loop.build_models

    def build_and_listen(recipe, inputs, say):
        return real_build(recipe, inputs, lambda line: (got["said"].append(line), say(line)))

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "rollout", keep)
    mp.setattr(loop, "build_models", build_and_listen)
    fn = f"{files['reward_fn']}:score"
    try:
        for current, more in (("ppo", rl("ppo", f"reward_model={rm}", "ppo.ppo_epochs=1")),
                              ("grpo", rl("grpo", f"reward_model={rm}", f"reward_fn={fn}", "grpo.num_generations=2",
                                          "grpo.num_iterations=1")),
                              ("rloo", rl("rloo", f"reward_fn={fn}", "reward_model=null", "rloo.num_generations=2",
                                          "rloo.num_iterations=1"))):
            stage(current, sft, files["prompts"], *more)
    finally:
        mp.undo()

    from alignment import cli
    from data_prep.cli import main as data_prep

    got["compare"] = out / "compare"
    assert cli.main(["compare", "--no-progress", f"base={base}", f"sft={sft}", "--prompts", str(files["prompts"]),
                     "--num-prompts", "2", "--max-new-tokens", "6", "--reward-model", str(rm),
                     "--out", str(got["compare"])]) == 0
    got["data_prep"] = out / "data_prep"
    assert data_prep(["sft", str(files["prep"]), "--out", str(got["data_prep"]), "--tokenizer", str(sft),
                      "--max-length", "64", "--test-fraction", "0", "--quiet"]) in (0, None)
    got["onpolicy"] = out / "onpolicy"
    assert data_prep(["onpolicy", "--model", str(sft), "--prompts", str(files["prompts"]), "--k", "2",
                      "--reward-model", str(rm), "--max-new-tokens", "6", "--test-fraction", "0", "--quiet",
                      "--out", str(got["onpolicy"])]) in (0, None)
    return family, got


def test_every_stage_ran(chain):
    family, got = chain
    summaries = {name: json.loads((got[name] / "run_info.json").read_text())["summary"] for name in STAGES}
    for name, summary in summaries.items():  # no row dropped (the templates fit the limits)
        assert not {k: v for k, v in summary.items() if k.startswith("dropped/") and v}, name
    assert summaries["sft"]["conversations_trained"] == 8
    assert [summaries[name]["prompts"] for name in ("ppo", "grpo", "rloo")] == [4, 4, 4]
    assert set(got["rollouts"]) == {"ppo", "grpo", "rloo"}
    sources = {name: summaries[name]["reward_sources"] for name in ("ppo", "grpo", "rloo")}
    assert sources["ppo"] == "1 x reward_model"
    assert sources["grpo"].startswith("1 x reward_model, 1 x ") and sources["grpo"].endswith("rewards.py:score")
    assert sources["rloo"].startswith("1 x ") and sources["rloo"].endswith("rewards.py:score")
    # the family's own reward model shares the policy's tokenizer and per-token head: PPO's critic starts from it
    assert not [line for line in got["said"] if "critic" in line], got["said"]


def test_rollouts_stop_at_the_family_s_stop_tokens(chain):
    """A reply that finished ends with a token of the generation config's EOS list, and nothing of it
    follows; SFT taught the stop token, so some replies finish."""
    from transformers import AutoTokenizer, GenerationConfig

    family, got = chain
    stops = GenerationConfig.from_pretrained(got["base"]).eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    finished, ends = 0, set()
    for name, batches in got["rollouts"].items():
        for ids, mask, done in batches:
            for row, row_mask, row_done in zip(ids.tolist(), mask.tolist(), done.tolist()):
                reply = [t for t, m in zip(row, row_mask) if m]
                hits = [i for i, t in enumerate(reply) if t in stops]
                if row_done:
                    finished += 1
                    ends.add(reply[-1])
                    assert hits == [len(reply) - 1], (name, reply)
                else:
                    assert not hits and len(reply) == 8, (name, reply)
    assert finished > 0, family
    # among them the token the family's template closes a turn with, the one SFT labelled
    assert AutoTokenizer.from_pretrained(got["sft"]).convert_tokens_to_ids(END[family]) in ends


def test_outputs_reload_in_plain_transformers_with_template_and_stop_list(chain):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GenerationConfig,
    )

    family, got = chain
    # the base's template, or (GPT-2, none) the toolkit's default that SFT trained with and saved
    template = AutoTokenizer.from_pretrained(got["base"]).chat_template or AutoTokenizer.from_pretrained(got["sft"]).chat_template
    assert template
    stops = GenerationConfig.from_pretrained(got["base"]).eos_token_id
    for name in ("sft", "dpo", "kto", "ppo", "grpo", "rloo"):
        tok = AutoTokenizer.from_pretrained(got[name])
        assert tok.chat_template == template, name
        assert GenerationConfig.from_pretrained(got[name]).eos_token_id == stops, name
        model = AutoModelForCausalLM.from_pretrained(got[name])
        assert model.get_input_embeddings().num_embeddings >= len(tok), name
    tok = AutoTokenizer.from_pretrained(got["reward"])
    assert tok.chat_template == template
    rm = AutoModelForSequenceClassification.from_pretrained(got["reward"])
    assert rm.config.num_labels == 1 and rm.get_input_embeddings().num_embeddings >= len(tok)


def test_compare_of_sft_against_base(chain):
    family, got = chain
    summary = json.loads((got["compare"] / "summary.json").read_text())
    assert set(summary["models"]) == {"base", "sft"}
    for label in ("base", "sft"):
        assert summary["models"][label]["reward_mean"] is not None, label


def test_data_prep_with_the_family_s_tokenizer(chain):
    family, got = chain
    summary = json.loads((got["data_prep"] / "summary.json").read_text())
    assert summary["kept"] == 8 and summary["dropped"] == {"longer than 64 tokens": 1}
    assert summary["system_turns"]["train"] == 4


def test_data_prep_onpolicy_samples_from_the_family_s_sft_and_scores_with_its_reward_model(chain):
    family, got = chain
    summary = json.loads((got["onpolicy"] / "summary.json").read_text())
    assert summary["rows_read"] == 4 and summary["kept"] + sum(summary["dropped"].values()) == 4
    for line in (got["onpolicy"] / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["score_chosen"] > row["score_rejected"]  # both replies of the prompt scored, best vs worst
