"""Where a reward model is read: one form of the exchange (alignment/templates.py, "reward-model input")
on every path. The reward stage's training rows, the RL loop's scores and `compare`'s scores give the
reward model the same ids, for every family of the zoo (tests/zoo.py), so it is read at the position it
was trained at; a reply cut off at the length limit gets no closing text. Classifiers that pool the
sequence themselves (DeBERTa-v2, RoBERTa) and ship no chat template get the plain text-pair form and are
scored by their own forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl.trainer.reward_trainer import DataCollatorForPreference

from alignment import evaluation, templates
from alignment.evaluation import Generation
from alignment.errors import RecipeError
from alignment.models import load_classifier, load_reward_tokenizer, load_tokenizer, per_token_head, token_scores
from alignment.rewards import Rewards
from alignment.stages import reward, rl

from . import zoo

FAMILIES = list(zoo.FAMILIES)

# What each family's template writes after an assistant reply (read off the templates by hand).
CLOSES = {
    "llama3": "<|eot_id|>",
    "qwen2_5": "<|im_end|>\n",
    "qwen3": "<|im_end|>\n",
    "mistral": "</s>",
    "gemma2": "<end_of_turn>\n",
    "gemma3": "<end_of_turn>\n",
    "phi3_5": "<|end|>\n<|endoftext|>",
    "chatml": "<|im_end|>\n",
    "gpt2": "<|endoftext|>",  # no template of its own: the toolkit's, which closes with EOS
}

PROMPT = "first: pen car red star"
REPLIES = ["Sure! pen", "Whatever. car red", " spaced  reply \n"]


pytestmark = pytest.mark.usefixtures("one_thread")


def reward_model_of(path):
    """A reward model as the reward stage starts it (tokenizer with the toolkit's template where the
    checkpoint has none, a one-label classifier), with a head scaled so that replies' scores differ."""
    tok = load_tokenizer(str(path))
    torch.manual_seed(0)
    model = load_classifier(str(path), tok).eval()
    with torch.no_grad():
        model.score.weight.mul_(30)
    return model, tok


class Seen:
    """The input ids each forward of `model` received."""

    def __init__(self, model):
        self.ids = []
        model.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs):
        self.ids.append(kwargs.get("input_ids", args[0] if args else None).clone())


def real(ids: torch.Tensor, pad: int) -> list[int]:
    """A right-padded row's tokens."""
    row = ids.tolist()
    while row and row[-1] == pad:
        row.pop()
    return row


def stage_rows(tok, replies):
    """The reward stage's pre-tokenised rows for pairs (PROMPT, reply, a rejected reply)."""
    data = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": PROMPT}]] * len(replies),
        "chosen": [[{"role": "assistant", "content": r}] for r in replies],
        "rejected": [[{"role": "assistant", "content": "no"}]] * len(replies),
    })
    return reward.tokenized_pairs(tok, data, "training")


def rl_scores(model, tok, replies, finished):
    """The RL loop's reward-model scores of replies sampled as these token ids (the stop token after a
    finished reply, none after a cut-off one), through `Rewards.scores` as the rollout calls it."""
    stop = tok.convert_tokens_to_ids(zoo_stop(tok))
    rows = [tok(r, add_special_tokens=False)["input_ids"] + ([stop] if f else []) for r, f in zip(replies, finished)]
    width = max(map(len, rows))
    response = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        response[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    prompt = torch.tensor([tok(templates.render_prompt(tok, PROMPT), add_special_tokens=False)["input_ids"]] * len(rows))
    recipe = SimpleNamespace(data=SimpleNamespace(prompt_field="prompt"), reward_fn=[], reward_weights=None)
    rewards = Rewards(recipe, model, tok, tok)
    return rewards.scores([PROMPT] * len(rows), [{}] * len(rows), torch.cat([prompt, response], 1),
                          torch.cat([torch.ones_like(prompt), mask], 1), response, mask,
                          torch.tensor(finished))["reward_model"]


def zoo_stop(tok) -> str:
    return tok.eos_token


def test_turn_close_is_what_each_template_writes_after_a_reply(zoo_checkpoint):
    for family in FAMILIES:
        tok = load_tokenizer(str(zoo_checkpoint(family)))
        assert templates.turn_close(tok) == CLOSES[family], family


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_stage_rl_and_compare_read_the_same_position(zoo_checkpoint, family):
    """Finished replies: the ids the reward stage trains on are the ids RL and compare score, so the
    scores agree to float precision; they end with the template's closing text (ChatML, Gemma, Phi-3:
    tokens after the end-of-turn token). Cut-off replies: the same ids without the closing text."""
    model, tok = reward_model_of(zoo_checkpoint(family))
    seen = Seen(model)
    rows = stage_rows(tok, REPLIES)
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([dict(r) for r in rows])
    with torch.no_grad():  # what BradleyTerryTrainer.compute_loss computes
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].chunk(2)[0]
    stage_ids = [list(r) for r in rows["chosen_ids"]]

    seen.ids.clear()
    in_rl = rl_scores(model, tok, REPLIES, [True] * len(REPLIES))
    rl_ids = [real(row, tok.pad_token_id) for row in seen.ids[0]]
    seen.ids.clear()
    gens = [Generation(PROMPT, r, True, 5) for r in REPLIES]
    compared = evaluation.reward_scores(model, tok, gens)
    compare_ids = [real(row, tok.pad_token_id) for row in seen.ids[0]]

    assert rl_ids == stage_ids and compare_ids == stage_ids
    assert in_rl.tolist() == pytest.approx(trained.tolist(), abs=1e-5)
    assert compared == pytest.approx(trained.tolist(), abs=1e-5)
    assert len(set(round(s, 3) for s in compared)) == len(REPLIES)  # the replies do score differently
    for ids, reply in zip(stage_ids, REPLIES):
        text = tok.decode(ids)
        assert text.endswith(reply + CLOSES[family])  # the reply's own text, then the closing text
        bos = tok.bos_token_id
        if bos is not None and family != "chatml":  # ChatML's BOS is <|im_start|>, which opens every turn
            assert ids[:2] != [bos, bos] and ids.count(bos) <= 1  # exactly one BOS (none where none is used)

    # cut off at the length limit: no closing text, so the reward model reads the reply's last token
    seen.ids.clear()
    cut_rl = rl_scores(model, tok, REPLIES, [False] * len(REPLIES))
    cut_ids = [real(row, tok.pad_token_id) for row in seen.ids[0]]
    cut_compare = evaluation.reward_scores(model, tok, [Generation(PROMPT, r, False, 32) for r in REPLIES])
    assert cut_compare == pytest.approx(cut_rl.tolist(), abs=1e-5)
    for ids, done, reply in zip(cut_ids, stage_ids, REPLIES):
        assert tok.decode(ids).endswith(reply) and done[: len(ids)] == ids and len(ids) < len(done)
    assert all(abs(a - b) > 1e-4 for a, b in zip(cut_rl.tolist(), trained.tolist()))


@pytest.mark.parametrize("family", ["gemma2", "chatml"])
def test_a_reward_model_the_reward_stage_trained_is_read_in_rl_and_compare_where_it_learnt(in_tmp, zoo_checkpoint,
                                                                                          family):
    """A reward model trained by the reward stage (Gemma-style and ChatML, where tokens follow the
    end-of-turn token) must score the same held-out pairs alike on every path: its held-out accuracy and
    mean margin as the stage reports them equal those from the RL loop's and compare's scores, so the
    model is read where it learnt, whichever path reads it."""
    import json

    from alignment.recipe_file import load_recipe, parse_override
    from alignment.demo import world
    from alignment.pipeline import run
    from alignment.stages.common import preference_datasets

    from .conftest import RECIPES

    overrides = [f"model={zoo_checkpoint(family)}", "data.num_examples=240", "data.eval_examples=40",
                 "training.max_steps=12", "training.max_length=128", "training.learning_rate=3e-3",
                 "training.per_device_train_batch_size=16", "output_dir=rm"]
    [node] = run(RECIPES / "reward.yaml", overrides)
    summary = json.loads((node.out_dir / "run_info.json").read_text())["summary"]
    recipe = load_recipe(RECIPES / "reward.yaml", [(p, v, raw) for raw in overrides for _, p, v in [parse_override(raw)]])
    _, held, _ = preference_datasets(recipe, {"model": str(zoo_checkpoint(family))},
                                     world.preset(recipe.world).preference_pairs)
    tok = load_reward_tokenizer(str(node.out_dir))
    model = load_classifier(str(node.out_dir), tok).eval()
    prompts = [row["prompt"][0]["content"] for row in held]
    chosen, rejected = ([row[side][-1]["content"] for row in held] for side in ("chosen", "rejected"))
    assert len(prompts) == summary["eval_pairs"] > 20
    done = [True] * len(prompts)
    from alignment.rewards import model_scores

    gap = model_scores(model, tok, prompts, chosen, done) - model_scores(model, tok, prompts, rejected, done)
    assert (gap > 0).float().mean().item() == pytest.approx(summary["eval_accuracy"], abs=1e-6)
    assert gap.mean().item() == pytest.approx(summary["eval_margin"], abs=1e-4)
    assert summary["eval_accuracy"] > 0.6  # it learnt something to be read
    gens = lambda replies: [Generation(p, r, True, 5) for p, r in zip(prompts, replies)]  # noqa: E731
    in_compare = torch.tensor(evaluation.reward_scores(model, tok, gens(chosen))) - torch.tensor(
        evaluation.reward_scores(model, tok, gens(rejected)))
    assert in_compare.tolist() == pytest.approx(gap.tolist(), abs=1e-4)


def test_qwen3_reply_holding_think_tags_reaches_the_scorer_unchanged(zoo_checkpoint):
    """Qwen3's template re-splits reasoning at `</think>`; a reply (finished or cut off) holding the tags
    as text is scored as its own text after the generation prompt (no continue_final_message)."""
    model, tok = reward_model_of(zoo_checkpoint("qwen3"))
    reply = "<think>\nthe pen\n</think>\n\nSure! pen"
    seen = Seen(model)
    scores = evaluation.reward_scores(model, tok, [Generation(PROMPT, reply, False, 32), Generation(PROMPT, reply, True, 9)])
    cut, done = (real(row, tok.pad_token_id) for row in seen.ids[0])
    opened = templates.render_prompt(tok, PROMPT)
    assert tok.decode(cut) == opened + reply and tok.decode(done) == opened + reply + "<|im_end|>\n"
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)


def test_a_reward_model_reads_its_own_template_not_the_policys_override(zoo_checkpoint):
    """`model_options.chat_template` is the policy's fix; the reward model was trained with the template saved
    beside it, and the RL stages and compare load it with that one."""
    from alignment.config import ModelOptions
    from alignment.models import DEFAULT_CHAT_TEMPLATE, load_reward_tokenizer

    path = zoo_checkpoint("chatml")
    tok = load_reward_tokenizer(str(path), ModelOptions(chat_template=DEFAULT_CHAT_TEMPLATE))
    assert tok.chat_template == load_tokenizer(str(path)).chat_template != DEFAULT_CHAT_TEMPLATE
    assert load_reward_tokenizer(str(zoo_checkpoint("gpt2"))).chat_template is None  # no template: the plain form


def test_a_template_that_does_not_render_the_reply_is_refused(zoo_checkpoint):
    tok = load_tokenizer(str(zoo_checkpoint("chatml")))
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(RecipeError, match="chat template of .*cannot tell what closes a turn"):
        templates.turn_close(tok)


# --------------------------------------------------------------------------- classifiers with their own pooling


def _encoder_tokenizer(kind: str):
    """A tokenizer like the hub's DeBERTa-v2 ([CLS] a [SEP] b [SEP]) or RoBERTa (<s> a </s></s> b </s>)
    ones: the zoo's byte-level BPE with the family's special tokens and pair encoding, no chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_str(zoo._bpe_json())
    if kind == "deberta":
        cls, sep, pad, unk = "[CLS]", "[SEP]", "[PAD]", "[UNK]"
        bpe.add_special_tokens([pad, cls, sep, unk])
        post = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
                                             special_tokens=[(cls, bpe.token_to_id(cls)), (sep, bpe.token_to_id(sep))])
        names = {"cls_token": cls, "sep_token": sep, "pad_token": pad, "unk_token": unk, "bos_token": cls, "eos_token": sep}
    else:
        cls, sep, pad, unk = "<s>", "</s>", "<pad>", "<unk>"
        bpe.add_special_tokens([cls, pad, sep, unk])
        post = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
                                             special_tokens=[(cls, bpe.token_to_id(cls)), (sep, bpe.token_to_id(sep))])
        names = {"cls_token": cls, "sep_token": sep, "pad_token": pad, "unk_token": unk, "bos_token": cls, "eos_token": sep}
    bpe.post_processor = post
    return PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False, **names)


@pytest.fixture(scope="module")
def encoder_rm(tmp_path_factory):
    """`encoder_rm(kind) -> Path`: a tiny one-label DeBERTa-v2 or RoBERTa reward classifier saved with a
    tokenizer that has no chat template, as hub reward models ship."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    root, built = tmp_path_factory.mktemp("encoders"), {}

    def get(kind: str):
        if kind not in built:
            tok = _encoder_tokenizer(kind)
            size = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "num_labels": 1, "pad_token_id": tok.pad_token_id}
            torch.manual_seed(0)
            if kind == "deberta":
                model = DebertaV2ForSequenceClassification(DebertaV2Config(max_position_embeddings=256, **size))
            else:
                model = RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=len(tok) + 64, **size))  # positions count from pad + 1
            model.save_pretrained(root / kind)
            tok.save_pretrained(root / kind)
            built[kind] = root / kind
        return built[kind]

    return get


@pytest.mark.parametrize("kind", ["deberta", "roberta"])
def test_a_classifier_without_template_is_scored_by_its_own_forward_on_the_text_pair(encoder_rm, kind):
    path = encoder_rm(kind)
    tok = load_reward_tokenizer(str(path))
    assert tok.chat_template is None and templates.reward_form(tok) == "plain"
    model = load_classifier(str(path), tok).eval()
    assert not per_token_head(model)
    replies, finished = ["Sure! pen", "Whatever. car red star"], [True, False]
    with torch.no_grad():  # the model's own output on its own input form, one exchange at a time
        own = [model(**tok(PROMPT, r, return_tensors="pt")).logits[0, 0].item() for r in replies]
    first = tok.cls_token_id
    ids = templates.reward_ids(tok, PROMPT, replies[0])
    assert ids[0] == first and ids.count(first) == 1 and ids == tok(PROMPT, replies[0])["input_ids"]

    recipe = SimpleNamespace(data=SimpleNamespace(prompt_field="prompt"), reward_fn=[], reward_weights=None)
    from alignment.rewards import model_scores

    assert model_scores(model, tok, [PROMPT] * 2, replies, finished).tolist() == pytest.approx(own, abs=1e-5)
    gens = [Generation(PROMPT, r, f, 4) for r, f in zip(replies, finished)]
    assert evaluation.reward_scores(model, tok, gens) == pytest.approx(own, abs=1e-5)
    assert Rewards(recipe, model, tok, tok).reward_model is model
    # the reward stage, started from such a classifier, trains on the same form
    rows = stage_rows(load_reward_tokenizer(str(path)), replies[:1])
    assert list(rows["chosen_ids"][0]) == ids


def test_a_decoder_classifier_without_template_reads_the_texts_apart_and_whether_the_reply_finished(zoo_checkpoint):
    """GPT-2's tokenizer marks nothing in a text pair: prompt and reply are separated by a blank line, and a
    finished reply ends with EOS (a cut-off one does not), on every path."""
    path = zoo_checkpoint("gpt2")
    tok = load_reward_tokenizer(str(path))
    done, cut = templates.reward_ids(tok, PROMPT, "Sure! pen"), templates.reward_ids(tok, PROMPT, "Sure! pen", False)
    assert tok.decode(cut) == PROMPT + "\n\nSure! pen" and done == cut + [tok.eos_token_id]
    model = load_classifier(str(path), tok).eval()
    with torch.no_grad():
        own = [model(torch.tensor([ids])).logits[0, 0].item() for ids in (done, cut)]
    gens = [Generation(PROMPT, "Sure! pen", True, 4), Generation(PROMPT, "Sure! pen", False, 4)]
    assert evaluation.reward_scores(model, tok, gens) == pytest.approx(own, abs=1e-5) and own[0] != own[1]


def test_a_pooling_head_gives_no_per_token_values(encoder_rm):
    tok = load_reward_tokenizer(str(encoder_rm("deberta")))
    model = load_classifier(str(encoder_rm("deberta")), tok)
    ids = torch.tensor([templates.reward_ids(tok, PROMPT, "x")])
    with pytest.raises(RecipeError, match="DebertaV2ForSequenceClassification: its head pools the sequence itself"):
        token_scores(model, ids, torch.ones_like(ids), None)


def test_a_roberta_reward_model_in_ppo_scores_what_the_model_itself_gives(tiny_base, encoder_rm, capsys):
    """PPO with the demo policy and a RoBERTa reward model: the critic starts from the policy (said), and
    each reply's reward is the classifier's own output on (prompt, decoded reply)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from .test_ppo import recipe_for

    rm = encoder_rm("roberta")
    recipe = recipe_for(tiny_base, rm, "ppo.response_length=4")
    m = rl.build_models(recipe, {"model": str(tiny_base), "reward_model": str(rm)}, print)
    assert "the critic starts from the policy" in capsys.readouterr().out
    prompts, rendered, *_ = rl.load_prompts(recipe, m.tok)
    AcceleratorState._reset_state()
    torch.manual_seed(0)
    r = rl.rollout(m, Accelerator(cpu=True), rendered[:4], prompts[:4], recipe, {"generation": 0.0, "scoring": 0.0})
    rm_tok = m.rewards.reward_tok
    for i in range(4):
        reply = m.tok.decode(r.response_ids[i, : r.response_mask[i].sum() - r.finished[i].long()], skip_special_tokens=True)
        with torch.no_grad():
            own = m.rewards.reward_model(**rm_tok(prompts[i], reply, return_tensors="pt")).logits[0, 0]
        assert r.sources["reward_model"][i].item() == pytest.approx(own.item(), abs=1e-5)
