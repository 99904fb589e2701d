"""Shared fixtures: tiny checkpoints built in code, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N`: share the cores, or torch's threads spin against each other
    import torch

    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # the processes the tests start, too

# Overrides that shrink every stage of a chain to seconds.
MICRO = [
    "init:init.vocab_size=300",
    "init:init.hidden_size=32",
    "init:init.intermediate_size=64",
    "init:init.num_hidden_layers=1",
    "init:init.num_attention_heads=2",
    "init:init.tokenizer_examples=300",
    "*:training.logging_steps=1",
]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny init checkpoint (BPE tokenizer + 1-layer Llama), built once per session."""
    from alignment.pipeline import run

    work = tmp_path_factory.mktemp("base")
    run(RECIPES / "init.yaml", [o.split(":", 1)[1] for o in MICRO if o.startswith("init:")] + [f"output_dir={work / 'init'}"])
    return work / "init"


@pytest.fixture(scope="session")
def reward_dir(tiny_base, tmp_path_factory) -> Path:
    """A one-label classifier on the tiny base with a random head, scaled so that replies' scores
    differ by a few units: a reward model a short run can climb."""
    import torch

    from alignment.models import load_classifier, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_base))
    out = tmp_path_factory.mktemp("rm") / "rm"
    model = load_classifier(str(tiny_base), tok)
    with torch.no_grad():
        model.score.weight.mul_(30)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# The default demo chain (init -> pretrain -> sft, default model shape) with far fewer steps:
# small enough for CI, large enough that SFT learns some of the task.
MICRO_DEMO_CHAIN = [
    "init:init.tokenizer_examples=2000",
    "pretrain:data.num_examples=800",
    "pretrain:training.max_steps=20",
    "sft:data.num_examples=6400",
    "sft:training.max_steps=200",
    "sft:training.per_device_train_batch_size=32",  # the default 48 costs CI time, not needed here
    "*:training.logging_steps=10",
]


@pytest.fixture(scope="session")
def micro_demo_chain(tmp_path_factory) -> Path:
    """The directory whose runs/ holds the micro demo chain (init, pretrain, sft), built once per
    session, also under `pytest -n N`: the workers share one directory (one per float path), the
    first builds it under a lock and the others find it up to date (the pipeline's content hash).
    A test that runs a longer recipe from it passes MICRO_DEMO_CHAIN too, so the three stages are
    up to date and only the new ones run (each test writes stages of its own names)."""
    import fcntl

    import torch

    from alignment.pipeline import run

    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process
        work = tmp_path_factory.mktemp("demo_chain")
    else:  # in the parent of every worker's base temp directory: this session's, shared by the workers
        work = tmp_path_factory.getbasetemp().parent / f"demo_chain-{torch.backends.cpu.get_cpu_capability()}"
        work.mkdir(exist_ok=True)
    with open(work.parent / f"{work.name}.lock", "w") as lock, pytest.MonkeyPatch.context() as mp:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mp.chdir(work)
        run(RECIPES / "sft.yaml", MICRO_DEMO_CHAIN)
    return work


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tensorboard_scalars(directory: Path) -> dict[str, list[float]]:
    """Every scalar in the TensorBoard event files under `directory`, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(directory).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: [v for _, v in sorted(points)] for tag, points in found.items()}


@pytest.fixture(scope="session")
def zoo_checkpoint(tmp_path_factory):
    """`zoo_checkpoint(family) -> Path`: the model-family zoo's tiny checkpoint of `family` (tests/zoo.py),
    built on first use and shared by the whole session."""
    from . import zoo

    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = zoo.build(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    thread start-up costs more than the maths, badly so on a loaded machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
