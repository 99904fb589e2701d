"""A tiny synthetic "assistant world" with an exact gold oracle.

A user prompt names a task and lists a few distinct words, e.g. ``"reverse: cat dog sun"``.
The ideal assistant reply is a polite opener plus the exact answer and nothing else:
``"Sure! sun dog cat"``.  Tasks: ``repeat`` (copy the words), ``first`` / ``last`` (pick
one word) and ``reverse`` (copy backwards).  Every skill is copying or choosing words from
the prompt, so a tiny language model can learn it on a CPU in about a minute.

``gold_score`` grades any reply exactly (politeness 0.25, correct content 0.5,
concise stop 0.25).  The data generators give a noisy "web" pretraining corpus, clean
SFT conversations, preference pairs and held-out evaluation prompts.  Held-out prompts
are chosen by a fixed hash rule (``is_heldout``) and never appear in training data.
All randomness comes from ``random.Random`` seeded by the caller: same seed, same data.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

WORDS = (
    "cat", "dog", "sun", "red", "blue", "tree", "fish", "milk", "cup", "hat",
    "box", "bird", "car", "bus", "egg", "pen", "map", "key", "ball", "bed",
    "book", "door", "frog", "girl", "boy", "hand", "ice", "jam", "kite", "lamp",
    "moon", "nest", "owl", "pig", "rain", "ship", "star", "toy", "van", "cow",
)
TASKS = ("repeat", "first", "last", "reverse")
# Allowed number of words in the prompt, per task kind (inclusive).
# Short lists keep every task learnable by a 2-layer model within the main job's budget
# (docs/demo_world.md); longer ones make the world harder.
WORD_COUNTS = {"repeat": (2, 3), "first": (3, 4), "last": (3, 4), "reverse": (2, 3)}

POLITE_OPENER = "Sure!"
RUDE_OPENERS = ("Ugh.", "Whatever.", "Fine.")
USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"


@dataclass(frozen=True)
class Task:
    kind: str
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in TASKS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {TASKS}")
        lo, hi = WORD_COUNTS[self.kind]
        if not lo <= len(self.words) <= hi:
            raise ValueError(f"task {self.kind!r} needs {lo}-{hi} words, got {len(self.words)}")
        unknown = [w for w in self.words if w not in WORDS]
        if unknown:
            raise ValueError(f"words not in WORDS: {unknown}")
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"words in a prompt must be distinct: {self.words}")

    @property
    def prompt(self) -> str:
        return f"{self.kind}: " + " ".join(self.words)

    @property
    def answer_words(self) -> tuple[str, ...]:
        if self.kind == "repeat":
            return self.words
        if self.kind == "first":
            return self.words[:1]
        if self.kind == "last":
            return self.words[-1:]
        return self.words[::-1]  # reverse

    @property
    def answer(self) -> str:
        return " ".join(self.answer_words)


def sample_task(rng: random.Random) -> Task:
    kind = rng.choice(TASKS)
    lo, hi = WORD_COUNTS[kind]
    return Task(kind, tuple(rng.sample(WORDS, rng.randint(lo, hi))))


def parse_prompt(prompt: str) -> Task:
    """Inverse of ``Task.prompt``; raises ValueError for any other string."""
    kind, sep, rest = prompt.partition(": ")
    if not sep:
        raise ValueError(f"not a task prompt (expected 'kind: w1 w2 ...'): {prompt!r}")
    task = Task(kind, tuple(rest.split(" ")))  # validates kind, words, count
    if task.prompt != prompt:
        raise ValueError(f"badly formatted task prompt: {prompt!r}")
    return task


def is_heldout(prompt: str) -> bool:
    """Deterministic split: about 10% of prompts are held out for evaluation only."""
    return zlib.crc32(prompt.encode()) % 10 == 0


def good_response(task: Task) -> str:
    return f"{POLITE_OPENER} {task.answer}"


def _wrong_answer(task: Task, rng: random.Random) -> str:
    """An answer with the right number of words that is not the right answer."""
    right = task.answer_words
    while True:
        if len(right) == 1:  # first / last: another prompt word, or any word
            pool = task.words if rng.random() < 0.7 else WORDS
            wrong = (rng.choice(pool),)
        elif rng.random() < 0.5:  # the prompt words in another order
            wrong = tuple(rng.sample(task.words, len(right)))
        else:  # one word swapped for a word not in the prompt
            i = rng.randrange(len(right))
            new = rng.choice([w for w in WORDS if w not in task.words])
            wrong = right[:i] + (new,) + right[i + 1:]
        if wrong != right:
            return " ".join(wrong)


def make_response(task: Task, rng: random.Random, *, wrong: bool = False,
                  rude: bool = False, rambles: bool = False) -> str:
    opener = rng.choice(RUDE_OPENERS) if rude else POLITE_OPENER
    answer = _wrong_answer(task, rng) if wrong else task.answer
    text = f"{opener} {answer}"
    if rambles:
        text += " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
    return text


def score_parts(prompt: str, response: str, finished: bool = True) -> dict[str, float]:
    """Grade ``response`` to ``prompt`` exactly. The rule:

    * text = response.strip(). ``polite`` = 0.25 if text starts with "Sure!", else 0.
    * body = text with one leading opener removed ("Sure!" or any of RUDE_OPENERS),
      then stripped; words = body.split(); k = number of words in the right answer.
    * ``content`` = 0.5 if the first k words of body equal the k answer words, else 0.
    * ``concise`` = 0.25 if ``finished`` is True (the model emitted end-of-sequence; a
      reply cut off by the length limit is not finished) and body has exactly k words,
      else 0: the reply stays on format and stops, right or wrong.
    * A prompt that ``parse_prompt`` rejects raises ValueError.
    """
    answer = parse_prompt(prompt).answer_words
    text = response.strip()
    body = text
    for opener in (POLITE_OPENER, *RUDE_OPENERS):
        if text.startswith(opener):
            body = text[len(opener):].strip()
            break
    words = body.split()
    k = len(answer)
    content = tuple(words[:k]) == answer
    return {
        "polite": 0.25 if text.startswith(POLITE_OPENER) else 0.0,
        "content": 0.5 if content else 0.0,
        "concise": 0.25 if finished and len(words) == k else 0.0,
    }


def gold_score(prompt: str, response: str, finished: bool = True) -> float:
    """Sum of ``score_parts`` (in [0, 1]); see its docstring for the rule."""
    return sum(score_parts(prompt, response, finished).values())


def render_exchange(prompt: str, response: str) -> str:
    """One exchange as plain text, as the default chat template renders it (no EOS)."""
    return f"{USER_TAG}\n{prompt}\n{ASSISTANT_TAG}\n{response}"


def _train_task(rng: random.Random) -> Task:
    """A random task whose prompt is not held out."""
    while True:
        task = sample_task(rng)
        if not is_heldout(task.prompt):
            return task


def _thread(rng: random.Random, p_wrong: float, p_rude: float, p_ramble: float,
            max_turns: int) -> str:
    """A forum-like thread: 1 to ``max_turns`` exchanges about the same words (each later
    question another task on the first one's words, cut or padded to fit), every answer drawn
    with the given defect rates. Later questions repeat words seen earlier in the document."""
    first = _train_task(rng)
    exchanges = []
    for turn in range(rng.randint(1, max_turns)):
        task = first
        if turn:
            kind = rng.choice(TASKS)
            lo, hi = WORD_COUNTS[kind]
            words = first.words[:hi]
            if len(words) < lo:
                words += tuple(rng.sample([w for w in WORDS if w not in words], lo - len(words)))
            task = Task(kind, words)
            if is_heldout(task.prompt):
                continue
        response = make_response(task, rng, wrong=rng.random() < p_wrong,
                                 rude=rng.random() < p_rude, rambles=rng.random() < p_ramble)
        exchanges.append(render_exchange(task.prompt, response))
    return "\n".join(exchanges)


def _word_list(rng: random.Random) -> str:
    """A run of 3-6 words (repeats allowed) written out 2-4 times, one copy per line."""
    run = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
    return "\n".join(run for _ in range(rng.randint(2, 4)))


def pretrain_corpus(n: int, seed: int, p_wrong: float = 0.1, p_rude: float = 0.3,
                    p_ramble: float = 0.3, p_list: float = 0.5, max_turns: int = 3) -> list[str]:
    """"Web" documents of two kinds, as a real base model reads them:

    * threads (share ``1 - p_list``): 1 to ``max_turns`` exchanges about the same words,
      mostly right but rude or rambling at the given rates (each defect drawn independently
      per answer): the defects SFT and preference optimisation remove. A model that learns
      from them carries on a conversation instead of stopping after its answer.
    * lists (share ``p_list``): a run of words written out several times, like the
      repetition in web text. They teach copying from the context, the skill SFT then puts
      to use; without them pretraining slows SFT down (docs/demo_world.md).
    """
    # Two streams: `p_list` then only chooses which documents are lists, and the threads (drawn
    # for every slot, the unused ones discarded: cheap) stay the same whatever the share.
    rng = random.Random(f"corpus-{seed}")
    threads = [_thread(rng, p_wrong, p_rude, p_ramble, max_turns) for _ in range(n)]
    list_rng = random.Random(f"drills-{seed}")
    return [_word_list(list_rng) if list_rng.random() < p_list else thread for thread in threads]


def sft_conversations(n: int, seed: int, p_ramble: float = 0.25) -> list[dict]:
    """Demonstrations: always polite and correct, but like real demonstration data not
    perfect: a fraction ``p_ramble`` runs on after the answer. A model that imitates them
    inherits that habit; preference optimisation is what removes it."""
    rng = random.Random(f"sft-{seed}")
    convs = []
    for _ in range(n):
        task = _train_task(rng)
        reply = make_response(task, rng, rambles=rng.random() < p_ramble)
        convs.append({"messages": [{"role": "user", "content": task.prompt},
                                   {"role": "assistant", "content": reply}]})
    return convs


DEFECTS = ("wrong", "rude", "rambles")


def preference_pairs(n: int, seed: int) -> list[dict]:
    """Pairs where chosen scores strictly higher than rejected under ``gold_score``.

    Chosen is ``good_response`` 80% of the time, otherwise rude or rambling (not wrong).
    Rejected has all of chosen's defects plus at least one more, each missing one added
    with probability 1/2.
    """
    rng = random.Random(f"prefs-{seed}")
    pairs = []
    while len(pairs) < n:
        task = _train_task(rng)
        chosen_defects = set() if rng.random() < 0.8 else {rng.choice(("rude", "rambles"))}
        missing = [d for d in DEFECTS if d not in chosen_defects]
        extra = {d for d in missing if rng.random() < 0.5} or {rng.choice(missing)}
        chosen = make_response(task, rng, **{d: True for d in chosen_defects})
        rejected = make_response(task, rng, **{d: True for d in chosen_defects | extra})
        if gold_score(task.prompt, chosen) > gold_score(task.prompt, rejected):
            pairs.append({"prompt": task.prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def eval_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct held-out prompts (``is_heldout``), never seen in training data."""
    rng = random.Random(f"eval-{seed}")
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n:
        prompt = sample_task(rng).prompt
        if is_heldout(prompt) and prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def train_prompts(n: int, seed: int) -> list[dict]:
    """``n`` training prompts (rows ``{"prompt": ...}``, repeats possible), never held out:
    what online methods (PPO) answer and learn from."""
    rng = random.Random(f"prompts-{seed}")
    return [{"prompt": _train_task(rng).prompt} for _ in range(n)]
