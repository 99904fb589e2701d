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

How hard the world is, is one settings object, ``World``, with named presets (``PRESETS``,
looked up with ``preset(name)``; a recipe picks one with its top-level ``world`` key):
``default`` (the world the documented figures were measured on; its data are byte-identical
to what the generators made before presets existed) and ``hard`` (demonstrations that are
sometimes wrong and ramble more often, preference pairs whose defects are subtler and some of
whose labels are flipped: SFT leaves headroom; docs/demo_world.md). Every generator
takes ``world=`` (a ``World`` or a preset name; default: ``default``), and each ``World`` has
the same generators as methods. The oracle (``parse_prompt``, ``score_parts``,
``gold_score``) grades prompts of every preset without being told which: it accepts the
union of the presets' tasks, words and lengths.
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
# Allowed number of words in the prompt, per task kind (inclusive), in the default world.
# Short lists keep every task learnable by a 2-layer model within the main job's budget
# (docs/demo_world.md); longer ones make the world harder.
WORD_COUNTS = {"repeat": (2, 3), "first": (3, 4), "last": (3, 4), "reverse": (2, 3)}

# The answer of every task kind any world may use (a world picks some of them).
ANSWERS = {
    "repeat": lambda words: words,
    "first": lambda words: words[:1],
    "last": lambda words: words[-1:],
    "reverse": lambda words: words[::-1],
}

POLITE_OPENER = "Sure!"
RUDE_OPENERS = ("Ugh.", "Whatever.", "Fine.")
USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"


@dataclass(frozen=True)
class World:
    """How the demo world is drawn: its words, tasks and the defects of each data set.

    The defaults are the ``default`` preset. Rates are probabilities per example.
    """

    name: str = "default"
    words: tuple[str, ...] = WORDS
    # (task kind, fewest words, most words) per task, in the order tasks are drawn.
    word_counts: tuple[tuple[str, int, int], ...] = tuple((k, lo, hi) for k, (lo, hi) in WORD_COUNTS.items())
    # pretrain_corpus: defects of the threads' answers, share of word lists, longest thread
    corpus_wrong: float = 0.1
    corpus_rude: float = 0.3
    corpus_ramble: float = 0.3
    corpus_lists: float = 0.5
    corpus_turns: int = 3
    # sft_conversations: demonstrations that run on after the answer, and that are wrong
    sft_ramble: float = 0.25
    sft_wrong: float = 0.0
    # words a rambling reply adds after its answer (fewest, most)
    ramble_words: tuple[int, int] = (3, 8)
    # preference_pairs: pairs whose rejected reply is chosen plus one subtle defect (one
    # answer word wrong, or one word too many), and pairs whose labels are swapped
    pref_subtle: float = 0.0
    pref_flip: float = 0.0

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words) or not all(w.isalpha() and w.islower() for w in self.words):
            raise ValueError(f"world {self.name!r}: words must be distinct lower-case words")
        for kind, lo, hi in self.word_counts:
            if kind not in ANSWERS:
                raise ValueError(f"world {self.name!r}: unknown task kind {kind!r}; expected one of {', '.join(ANSWERS)}")
            if not 1 <= lo <= hi <= len(self.words):
                raise ValueError(f"world {self.name!r}: task {kind!r} word counts {lo}-{hi} out of range")
        rates = ("corpus_wrong", "corpus_rude", "corpus_ramble", "corpus_lists", "sft_ramble", "sft_wrong",
                 "pref_subtle", "pref_flip")
        for rate in rates:
            if not 0.0 <= getattr(self, rate) <= 1.0:
                raise ValueError(f"world {self.name!r}: {rate} must be in [0, 1]")
        if not 1 <= self.ramble_words[0] <= self.ramble_words[1]:
            raise ValueError(f"world {self.name!r}: ramble_words must be 1 <= fewest <= most")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(kind for kind, _, _ in self.word_counts)

    def counts(self, kind: str) -> tuple[int, int]:
        """(fewest, most) words in a prompt of this task kind."""
        for k, lo, hi in self.word_counts:
            if k == kind:
                return lo, hi
        raise ValueError(f"world {self.name!r} has no task {kind!r}")

    # The generators, bound to this world: `world.sft_conversations(n, seed)`.
    def pretrain_corpus(self, n: int, seed: int) -> list[str]:
        return pretrain_corpus(n, seed, world=self)

    def sft_conversations(self, n: int, seed: int) -> list[dict]:
        return sft_conversations(n, seed, world=self)

    def preference_pairs(self, n: int, seed: int) -> list[dict]:
        return preference_pairs(n, seed, world=self)

    def eval_prompts(self, n: int, seed: int) -> list[str]:
        return eval_prompts(n, seed, world=self)

    def train_prompts(self, n: int, seed: int) -> list[dict]:
        return train_prompts(n, seed, world=self)


DEFAULT = World()
# The same prompts, corpus and held-out prompts as the default world (figures comparable on the
# same 300 prompts); what differs is what SFT and preference learning learn from. A fifth of
# the demonstrations answer wrong and 35% ramble on (a perfect imitator sampled at temperature 1
# scores 0.8125); half the preference pairs differ by one word and a tenth are flipped. Tuned on
# the default recipes (docs/demo_world.md, "The hard preset"): SFT 0.76-0.81 gold at temperature
# 1 on two seeds, DPO +0.11-0.12. Twice the words (80) made SFT's copying seed-dependent instead.
HARD = World(
    name="hard",
    sft_wrong=0.2,
    sft_ramble=0.35,
    pref_subtle=0.5,
    pref_flip=0.1,
)
PRESETS = {w.name: w for w in (DEFAULT, HARD)}


def preset(name: str | World) -> World:
    """The preset called `name` (a World is returned as it is); one-line ValueError otherwise."""
    if isinstance(name, World):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown world {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _union_counts() -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for w in PRESETS.values():
        for kind, lo, hi in w.word_counts:
            old = counts.get(kind, (lo, hi))
            counts[kind] = (min(lo, old[0]), max(hi, old[1]))
    return counts


# What the oracle accepts: every preset's tasks, words and lengths (per task, from the fewest to
# the most words any preset uses).
ANY_COUNTS = _union_counts()
ANY_WORDS = frozenset(w for world in PRESETS.values() for w in world.words)


@dataclass(frozen=True)
class Task:
    kind: str
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ANY_COUNTS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {tuple(ANY_COUNTS)}")
        lo, hi = ANY_COUNTS[self.kind]
        if not lo <= len(self.words) <= hi:
            raise ValueError(f"task {self.kind!r} needs {lo}-{hi} words, got {len(self.words)}")
        unknown = [w for w in self.words if w not in ANY_WORDS]
        if unknown:
            raise ValueError(f"words not in the demo vocabulary: {unknown}")
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"words in a prompt must be distinct: {self.words}")

    @property
    def prompt(self) -> str:
        return f"{self.kind}: " + " ".join(self.words)

    @property
    def answer_words(self) -> tuple[str, ...]:
        return ANSWERS[self.kind](self.words)

    @property
    def answer(self) -> str:
        return " ".join(self.answer_words)


def sample_task(rng: random.Random, world: World | str = DEFAULT) -> Task:
    world = preset(world)
    kind = rng.choice(world.tasks)
    lo, hi = world.counts(kind)
    return Task(kind, tuple(rng.sample(world.words, rng.randint(lo, hi))))


def parse_prompt(prompt: str) -> Task:
    """Inverse of ``Task.prompt``, for a prompt of any preset; raises ValueError for any other string."""
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


def _wrong_answer(task: Task, rng: random.Random, world: World = DEFAULT) -> str:
    """An answer with the right number of words that is not the right answer."""
    right = task.answer_words
    while True:
        if len(right) == 1:  # first / last: another prompt word, or any word
            pool = task.words if rng.random() < 0.7 else world.words
            wrong = (rng.choice(pool),)
        elif rng.random() < 0.5:  # the prompt words in another order
            wrong = tuple(rng.sample(task.words, len(right)))
        else:  # one word swapped for a word not in the prompt
            i = rng.randrange(len(right))
            new = rng.choice([w for w in world.words if w not in task.words])
            wrong = right[:i] + (new,) + right[i + 1:]
        if wrong != right:
            return " ".join(wrong)


def _near_miss(task: Task, rng: random.Random, world: World = DEFAULT) -> str:
    """An answer one word away from the right one: a neighbouring prompt word (first / last), two
    neighbouring answer words swapped, or one answer word replaced by a word not in the prompt."""
    right = task.answer_words
    if len(right) == 1:
        i = task.words.index(right[0])
        return task.words[1] if i == 0 else task.words[i - 1]
    if rng.random() < 0.5:
        i = rng.randrange(len(right) - 1)
        return " ".join(right[:i] + (right[i + 1], right[i]) + right[i + 2:])
    i = rng.randrange(len(right))
    new = rng.choice([w for w in world.words if w not in task.words])
    return " ".join(right[:i] + (new,) + right[i + 1:])


def _response_parts(task: Task, rng: random.Random, world: World, wrong: bool, rude: bool,
                    rambles: bool) -> tuple[str, str, str]:
    """(opener, answer, tail): the words of a reply, drawn in this order."""
    opener = rng.choice(RUDE_OPENERS) if rude else POLITE_OPENER
    answer = _wrong_answer(task, rng, world) if wrong else task.answer
    tail = ""
    if rambles:
        tail = " " + " ".join(rng.choice(world.words) for _ in range(rng.randint(*world.ramble_words)))
    return opener, answer, tail


def make_response(task: Task, rng: random.Random, *, wrong: bool = False,
                  rude: bool = False, rambles: bool = False, world: World | str = DEFAULT) -> str:
    opener, answer, tail = _response_parts(task, rng, preset(world), wrong, rude, rambles)
    return f"{opener} {answer}{tail}"


def score_parts(prompt: str, response: str, finished: bool = True) -> dict[str, float]:
    """Grade ``response`` to ``prompt`` exactly. The rule:

    * text = response.strip(). ``polite`` = 0.25 if text starts with "Sure!", else 0.
    * body = text with one leading opener removed ("Sure!" or any of RUDE_OPENERS),
      then stripped; words = body.split(); k = number of words in the right answer.
    * ``content`` = 0.5 if the first k words of body equal the k answer words, else 0.
    * ``concise`` = 0.25 if ``finished`` is True (the model emitted end-of-sequence; a
      reply cut off by the length limit is not finished) and body has exactly k words,
      else 0: the reply stays on format and stops, right or wrong.
    * A prompt that ``parse_prompt`` rejects raises ValueError. Prompts of every preset are
      graded alike: the rule does not depend on the world.
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


def _train_task(rng: random.Random, world: World = DEFAULT) -> Task:
    """A random task whose prompt is not held out."""
    while True:
        task = sample_task(rng, world)
        if not is_heldout(task.prompt):
            return task


def _thread(rng: random.Random, p_wrong: float, p_rude: float, p_ramble: float,
            max_turns: int, world: World = DEFAULT) -> str:
    """A forum-like thread: 1 to ``max_turns`` exchanges about the same words (each later
    question another task on the first one's words, cut or padded to fit), every answer drawn
    with the given defect rates. Later questions repeat words seen earlier in the document."""
    first = _train_task(rng, world)
    exchanges = []
    for turn in range(rng.randint(1, max_turns)):
        task = first
        if turn:
            kind = rng.choice(world.tasks)
            lo, hi = world.counts(kind)
            words = first.words[:hi]
            if len(words) < lo:
                words += tuple(rng.sample([w for w in world.words if w not in words], lo - len(words)))
            task = Task(kind, words)
            if is_heldout(task.prompt):
                continue
        response = make_response(task, rng, wrong=rng.random() < p_wrong, rude=rng.random() < p_rude,
                                 rambles=rng.random() < p_ramble, world=world)
        exchanges.append(render_exchange(task.prompt, response))
    return "\n".join(exchanges)


def _word_list(rng: random.Random, world: World = DEFAULT) -> str:
    """A run of 3-6 words (repeats allowed) written out 2-4 times, one copy per line."""
    run = " ".join(rng.choice(world.words) for _ in range(rng.randint(3, 6)))
    return "\n".join(run for _ in range(rng.randint(2, 4)))


def pretrain_corpus(n: int, seed: int, p_wrong: float | None = None, p_rude: float | None = None,
                    p_ramble: float | None = None, p_list: float | None = None, max_turns: int | None = None,
                    world: World | str = DEFAULT) -> list[str]:
    """"Web" documents of two kinds, as a real base model reads them:

    * threads (share ``1 - p_list``): 1 to ``max_turns`` exchanges about the same words,
      mostly right but rude or rambling at the given rates (each defect drawn independently
      per answer): the defects SFT and preference optimisation remove. A model that learns
      from them carries on a conversation instead of stopping after its answer.
    * lists (share ``p_list``): a run of words written out several times, like the
      repetition in web text. They teach copying from the context, the skill SFT then puts
      to use; without them pretraining slows SFT down (docs/demo_world.md).

    A rate left at None is the world's (default world: p_wrong 0.1, p_rude 0.3, p_ramble 0.3,
    p_list 0.5, max_turns 3).
    """
    world = preset(world)
    p_wrong = world.corpus_wrong if p_wrong is None else p_wrong
    p_rude = world.corpus_rude if p_rude is None else p_rude
    p_ramble = world.corpus_ramble if p_ramble is None else p_ramble
    p_list = world.corpus_lists if p_list is None else p_list
    max_turns = world.corpus_turns if max_turns is None else max_turns
    # Two streams: `p_list` then only chooses which documents are lists, and the threads (drawn
    # for every slot, the unused ones discarded: cheap) stay the same whatever the share.
    rng = random.Random(f"corpus-{seed}")
    threads = [_thread(rng, p_wrong, p_rude, p_ramble, max_turns, world) for _ in range(n)]
    list_rng = random.Random(f"drills-{seed}")
    return [_word_list(list_rng, world) if list_rng.random() < p_list else thread for thread in threads]


def sft_conversations(n: int, seed: int, p_ramble: float | None = None,
                      world: World | str = DEFAULT) -> list[dict]:
    """Demonstrations: polite and (in the default world always) correct, but like real
    demonstration data not perfect: a fraction ``p_ramble`` (None: the world's, 0.25 by default)
    runs on after the answer, and in a world with ``sft_wrong`` that fraction gives a wrong
    answer. A model that imitates them inherits those habits; preference optimisation is what
    removes them."""
    world = preset(world)
    p_ramble = world.sft_ramble if p_ramble is None else p_ramble
    rng = random.Random(f"sft-{seed}")
    convs = []
    for _ in range(n):
        task = _train_task(rng, world)
        wrong = bool(world.sft_wrong) and rng.random() < world.sft_wrong  # no draw when 0: default data unchanged
        reply = make_response(task, rng, wrong=wrong, rambles=rng.random() < p_ramble, world=world)
        convs.append({"messages": [{"role": "user", "content": task.prompt},
                                   {"role": "assistant", "content": reply}]})
    return convs


DEFECTS = ("wrong", "rude", "rambles")


def preference_pairs(n: int, seed: int, world: World | str = DEFAULT) -> list[dict]:
    """Pairs where chosen scores strictly higher than rejected under ``gold_score``, but for the
    share ``world.pref_flip`` whose labels are swapped (0 in the default world).

    Chosen is ``good_response`` 80% of the time, otherwise rude or rambling (not wrong).
    Rejected has all of chosen's defects plus at least one more, each missing one added
    with probability 1/2. In the share ``world.pref_subtle`` of pairs (0 in the default world)
    rejected is chosen with one subtle defect instead: one answer word wrong (``_near_miss``) or
    one word too many.
    """
    world = preset(world)
    rng = random.Random(f"prefs-{seed}")
    pairs = []
    while len(pairs) < n:
        task = _train_task(rng, world)
        chosen_defects = set() if rng.random() < 0.8 else {rng.choice(("rude", "rambles"))}
        if world.pref_subtle and rng.random() < world.pref_subtle:
            opener, answer, tail = _response_parts(task, rng, world, False, "rude" in chosen_defects,
                                                   "rambles" in chosen_defects)
            chosen = f"{opener} {answer}{tail}"
            if "rambles" in chosen_defects or rng.random() < 0.5:
                rejected = f"{opener} {_near_miss(task, rng, world)}{tail}"
            else:
                rejected = f"{chosen} {rng.choice(world.words)}"
        else:
            missing = [d for d in DEFECTS if d not in chosen_defects]
            extra = {d for d in missing if rng.random() < 0.5} or {rng.choice(missing)}
            chosen = make_response(task, rng, world=world, **{d: True for d in chosen_defects})
            rejected = make_response(task, rng, world=world, **{d: True for d in chosen_defects | extra})
        if gold_score(task.prompt, chosen) > gold_score(task.prompt, rejected):
            if world.pref_flip and rng.random() < world.pref_flip:
                chosen, rejected = rejected, chosen
            pairs.append({"prompt": task.prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def eval_prompts(n: int, seed: int, world: World | str = DEFAULT) -> list[str]:
    """``n`` distinct held-out prompts (``is_heldout``), never seen in training data."""
    world = preset(world)
    rng = random.Random(f"eval-{seed}")
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n:
        prompt = sample_task(rng, world).prompt
        if is_heldout(prompt) and prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def train_prompts(n: int, seed: int, world: World | str = DEFAULT) -> list[dict]:
    """``n`` training prompts (rows ``{"prompt": ...}``, repeats possible), never held out:
    what online methods (PPO) answer and learn from."""
    world = preset(world)
    rng = random.Random(f"prompts-{seed}")
    return [{"prompt": _train_task(rng, world).prompt} for _ in range(n)]
