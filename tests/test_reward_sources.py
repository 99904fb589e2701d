"""Hand-checked tests of alignment/rewards.py's pieces that the training tests pass through without
looking: what a reward function is given, how its output is read, and how Rewards builds the batch.
A stub tokenizer (ids -> words, id 0 the special EOS) keeps the decoded text known by hand."""

from types import SimpleNamespace

import pytest
import torch

from alignment import rewards as R
from alignment.errors import RecipeError


class WordTok:
    """id i -> 'w<i>'; id 0 is the EOS, dropped when skip_special_tokens."""

    def batch_decode(self, ids, skip_special_tokens=False):
        return [" ".join(f"w{i}" for i in row if not (skip_special_tokens and i == 0)) for row in ids]


def test_a_function_is_given_only_the_keywords_it_names_or_all_with_kwargs():
    offered = {"prompts": ["p"], "completions": ["c"], "answer": ["a"]}

    def named(prompts, *, answer):
        return None

    def anything(prompts, **kw):
        return None

    assert R._accepted(named, offered) == {"prompts": ["p"], "answer": ["a"]}
    assert R._accepted(anything, offered) == offered


def test_returned_values_are_read_as_float32_numbers():
    """0-d tensors, ints and floats are numbers (3 -> 3.0, tensor(0.5) -> 0.5); None is NaN;
    a bool, a 2-element tensor or inf is refused naming the prompt's index."""
    offered = {"prompts": ["a", "b", "c", "d"]}
    out = R.call_function("f", lambda prompts: [3, torch.tensor(0.5), None, 1.25], offered)
    assert out.dtype == torch.float32
    assert out[[0, 1, 3]].tolist() == [3.0, 0.5, 1.25] and out[2].isnan()
    for bad, index in ((True, 0), (torch.tensor([1.0, 2.0]), 0), (float("inf"), 0)):
        with pytest.raises(RecipeError, match=rf"reward_fn 'f' returned .* for prompt {index} \('a'\); expected a finite number"):
            R.call_function("f", lambda prompts, bad=bad: [bad, 0.0, 0.0, 0.0], offered)


def test_a_raising_function_is_named_with_the_first_prompt_that_fails_alone():
    """Row 1 fails on its own (its answer is missing): 'on prompt 1: 'q''; the function is called
    row by row with each list cut to that row and everything else as it was."""
    seen = []

    def score(prompts, answer, scale):
        seen.append((list(prompts), list(answer), scale))
        return [scale / (1 if a else 0) for a in answer]

    offered = {"prompts": ["p", "q"], "answer": ["x", ""], "scale": 2.0, "other": [1]}
    with pytest.raises(RecipeError, match=r"reward_fn 'f' raised ZeroDivisionError: .* \(on prompt 1: 'q'\)"):
        R.call_function("f", score, offered)
    assert seen[1:] == [(["p"], ["x"], 2.0), (["q"], [""], 2.0)]
    assert R._first_failing(lambda prompts: [0.0], {"prompts": ["p", "q"]}) == "on the whole batch; every prompt alone passes"


def _rewards(tmp_path, functions, weights=None, reward_model=None):
    recipe = SimpleNamespace(data=SimpleNamespace(prompt_field="prompt"), reward_fn=functions, reward_weights=weights)
    return R.Rewards(recipe, reward_model, WordTok(), None)


def test_rewards_hand_each_function_the_reply_before_its_eos_and_the_rows_other_columns(tmp_path):
    """Row 0: reply ids [5, 6, 0] finished (EOS 0 kept in the mask): the text is 'w5 w6' and
    completion_ids [5, 6]. Row 1: [7, 8, 9] cut off at the limit: 'w7 w8 w9', ids [7, 8, 9].
    The prompt column is not passed as a column; 'answer' is."""
    got = {}

    def score(**kw):
        got.update(kw)
        return [1.0, None][: len(kw["prompts"])]

    rew = _rewards(tmp_path, [])
    rew.functions = {"f": score, "g": lambda prompts: [0.5, 0.25][: len(prompts)]}
    rew.names = ["f", "g"]
    rew.weights = {"f": 2.0, "g": 1.0}
    response = torch.tensor([[5, 6, 0], [7, 8, 9]])
    mask = torch.ones(2, 3, dtype=torch.long)
    finished = torch.tensor([True, False])
    rows = [{"prompt": "P0", "answer": "A0"}, {"prompt": "P1", "answer": "A1"}]
    out = rew.scores(["P0", "P1"], rows, response, mask, response, mask, finished)
    assert got["completions"] == got["replies"] == ["w5 w6", "w7 w8 w9"]
    assert got["completion_ids"] == [[5, 6], [7, 8, 9]]
    assert got["answer"] == ["A0", "A1"] and "prompt" not in got and got["finished"] == [True, False]
    assert rew.total(out).tolist() == [2.5, 0.25]  # 2 * 1.0 + 0.5; f's None adds 0, g's 0.25
    assert set(rew.scores(["P0", "P1"], rows, response, mask, response, mask, finished, which="model")) == set()
    one = rew.scores(["P0"], rows[:1], response[:1], mask[:1], response[:1], mask[:1], finished[:1])
    assert got["answer"] == ["A0"] and one["f"].tolist() == [1.0]


def test_reward_functions_load_from_a_module_or_a_file_whose_path_holds_a_colon(tmp_path):
    """'package.module:name' imports the module; 'dir:x/f.py:name' splits at the last colon."""
    import math

    assert R.load_function("math:sqrt") is math.sqrt
    folder = tmp_path / "a:b"
    folder.mkdir()
    (folder / "f.py").write_text("def score(prompts, **kw):\n    return [1.0] * len(prompts)\n")
    assert R.load_function(f"{folder}/f.py:score")(["p"]) == [1.0]


def test_two_reward_files_of_the_same_size_and_time_are_two_modules(tmp_path):
    """The cache key holds the resolved path: files alike in size and mtime are not confused; a file
    defining a dataclass loads (the module is in sys.modules under its own name while it runs)."""
    import os

    body = "from dataclasses import dataclass\n@dataclass\nclass C:\n    v: float = {v}\ndef score(prompts, **kw):\n    return [C().v] * len(prompts)\n"
    for name, v in (("x.py", "1.0"), ("y.py", "2.0")):
        (tmp_path / name).write_text(body.format(v=v))
        os.utime(tmp_path / name, ns=(10**18, 10**18))
    assert R.load_function(f"{tmp_path}/x.py:score")(["p"]) == [1.0]
    assert R.load_function(f"{tmp_path}/y.py:score")(["p"]) == [2.0]


def test_gold_grades_whether_the_reply_finished():
    """The same reply, finished and cut off: only the gold rule's 'concise' part (0.25) depends on
    whether the reply ended with EOS, so the two scores differ by exactly 0.25."""
    p, r = "reverse: cat dog sun", "Sure! sun dog cat"
    done, cut = R.gold(prompts=[p, p], completions=[r, r], finished=[True, False])
    assert (done, cut) == (1.0, 0.75)  # polite 0.25 + right 0.5 + concise 0.25 only when finished


def test_rewards_with_a_reward_model_score_what_is_asked(tmp_path, monkeypatch):
    """A reward model (its scores stubbed: [0.5, -0.5]) and a function: which='model' gives the model
    only, 'functions' the function only, 'all' both. The function's None is allowed here (the model
    scores that reply). A special token inside a reply (id 1, not a stop) is left out of its text."""
    monkeypatch.setattr(R, "model_scores", lambda *a: torch.tensor([0.5, -0.5]))
    got = {}

    def f(completions):
        got["completions"] = completions
        return [1.0, None]

    rew = _rewards(tmp_path, [], reward_model=object())
    rew.functions, rew.names, rew.weights = {"f": f}, ["reward_model", "f"], {"reward_model": 1.0, "f": 1.0}
    rew.tok = SpecialTok()
    response = torch.tensor([[5, 1, 6], [7, 8, 9]])
    mask, finished = torch.ones(2, 3, dtype=torch.long), torch.tensor([False, False])
    args = (["P0", "P1"], [{"prompt": "P0"}, {"prompt": "P1"}], response, mask, response, mask, finished)
    assert list(rew.scores(*args, which="model")) == ["reward_model"]
    assert list(rew.scores(*args, which="functions")) == ["f"]
    out = rew.scores(*args)
    assert sorted(out) == ["f", "reward_model"] and rew.total(out).tolist() == [1.5, -0.5]
    assert got["completions"] == ["w5 w6", "w7 w8 w9"]


class SpecialTok(WordTok):
    """Ids 0 and 1 are both special tokens."""

    def batch_decode(self, ids, skip_special_tokens=False):
        return [" ".join(f"w{i}" for i in row if not (skip_special_tokens and i in (0, 1))) for row in ids]


def test_a_reward_source_that_cannot_be_imported_is_named_with_the_error(tmp_path):
    (tmp_path / "broken.py").write_text("def score(:\n")
    ref = f"{tmp_path}/broken.py:score"
    with pytest.raises(RecipeError, match=rf"reward_fn '{ref}': importing {tmp_path}/broken.py failed \(SyntaxError: "):
        R.load_function(ref)
    with pytest.raises(RecipeError, match=r"reward_fn 'no_such_module_q:f': cannot import module 'no_such_module_q' \(ModuleNotFoundError: "):
        R.load_function("no_such_module_q:f")
