"""`python -m data_prep COMMAND ...`: turn the data people have into the canonical form the stages read."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pydantic import ValidationError

from alignment.cli import Parser
from alignment.config import PrepColumns, PrepOptions, PrepSamples, PrepSource
from alignment.errors import RecipeError
from alignment.paths import user_path

from .read import READ, DataError, split_problem

SHAPE_EXAMPLES = """\
row shapes (detected from the columns; --shape when several match; names settable with --column):
  explicit   {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
             {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
              "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [...]}
  implicit   {"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."}
             (or two message lists; everything before the last assistant turn must be the same)
  rated      {"prompt": "Hi", "completions": ["Hello!", "Go away.", "Hm"], "ratings": [9, 2, 5]}
             {"prompt": "Hi", "completions": [{"response": "Hello!", "rating": 9}, ...]}
  scored     {"prompt": "Hi", "response_a": "Hello!", "response_b": "Go away.", "score_a": 12, "score_b": 3}
  ranked     {"prompt": "Hi", "ranked": ["Hello!", "Hm", "Go away."]}          (best first)
  binary     {"prompt": "Hi", "completion": "Hello!", "label": "up"}     (true/false, 1/0, up/down, accept/reject,
             ...; or a rating with --threshold: desirable when at least the threshold)
  sft        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
  text       {"text": "Once upon a time ..."}

output (--out DIR): train.jsonl/.parquet, test.jsonl/.parquet, summary.json. Pairs are
  {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message],
   "score_chosen": float|null, "score_rejected": float|null, "source": str, "id": str}
  Binary rows (`binary`, for kto) are {"prompt": [messages], "completion": [assistant message], "label": bool,
   "score": float|null, "source": str, "id": str}: TRL's unpaired preference format.
Every row read is kept or counted under a named reason (summary.json); --strict makes any drop an error.
"""

EXAMPLES = {
    "pairs": """\
examples:
  python -m data_prep pairs hh_train.jsonl.gz --out data/hh                 # Human/Assistant transcripts
  python -m data_prep pairs ratings.parquet --rejected-choice random --min-margin 1 --out data/uf
  python -m data_prep pairs shp.csv --column prompt=history --column response_a=human_ref_A \\
      --column response_b=human_ref_B --column score_a=score_A --column score_b=score_B --min-ratio 2 --out data/shp
  python -m data_prep pairs a.jsonl b.parquet --weights 1 0.5 --max-length 1024 --tokenizer gpt2 --out data/mix
  alignment run recipes/dpo.yaml data.source=data/mix                          # train on it
""",
    "binary": """\
examples:
  python -m data_prep binary thumbs.jsonl --column label=feedback --out data/thumbs      # up/down, accept/reject
  python -m data_prep binary ratings.jsonl --column label=stars --threshold 4 --out data/stars  # 4-5 stars: desirable
  python -m data_prep binary rated.parquet --threshold 7 --out data/rated     # each rated completion one row
  python -m data_prep binary hh_train.jsonl.gz --out data/hh-unpaired         # each pair: one up, one down row
  alignment run recipes/kto.yaml data.source=data/thumbs                      # train on it
""",
    "sft": """\
examples:
  python -m data_prep sft chats.jsonl --max-turns 4 --out data/sft
  alignment run recipes/sft.yaml data.source=data/sft/train.jsonl
""",
    "text": """\
examples:
  python -m data_prep text corpus.jsonl --dedup normalised --out data/corpus
""",
}


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _finite(text: str) -> float:
    """A number that is finite (inf or nan would train or sample nothing sensible)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _column(text: str) -> tuple[str, str]:
    role, eq, name = text.partition("=")
    if not eq or role not in PrepColumns.model_fields:
        raise argparse.ArgumentTypeError(f"expected ROLE=COLUMN with ROLE one of {', '.join(PrepColumns.model_fields)}, got {text!r}")
    return role, name


def _add_cleaning(p: argparse.ArgumentParser, kind: str) -> None:
    d = PrepOptions.model_fields
    help_of = lambda name: d[name].description + f" (default: {d[name].default})"  # noqa: E731
    p.add_argument("--out", required=True, help="output directory (created; an earlier data_prep output is replaced)")
    p.add_argument("--test-fraction", type=_finite, default=d["test_fraction"].default, help=help_of("test_fraction"))
    p.add_argument("--split-seed", type=int, default=0, help=help_of("split_seed"))
    p.add_argument("--dedup", choices=("none", "exact", "normalised"), default="normalised", help=help_of("dedup"))
    p.add_argument("--max-turns", type=_count, help=d["max_turns"].description)
    p.add_argument("--max-length", type=_count, help=d["max_length"].description)
    if kind in ("pairs", "binary"):
        p.add_argument("--max-prompt-tokens", type=_count, help=d["max_prompt_tokens"].description)
    p.add_argument("--tokenizer", help="tokenizer (directory or hub id) for the token limits")
    p.add_argument("--strict", action="store_true", help=d["strict"].description)
    p.add_argument("--seed", type=int, default=0, help=help_of("seed"))
    from .prepare import AUTO_PROCS, PARALLEL_ROWS

    p.add_argument("--num-proc", type=_count,
                   help=f"processes that parse the rows; the output is the same for any number (default: {AUTO_PROCS} "
                   f"workers for a source of {PARALLEL_ROWS} rows or more when there are as many CPUs, else 1: this process)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_sources(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=f"input: {READ}, or 'demo'")
    from .shapes import KIND_SHAPES

    shapes = ("auto", *KIND_SHAPES[kind])
    p.add_argument("--shape", choices=shapes, default="auto", help="row shape of every source (default: detected)")
    p.add_argument("--column", type=_column, action="append", default=[], metavar="ROLE=COLUMN",
                   help="column name for a role, e.g. prompt=question (repeatable)")
    p.add_argument("--weights", type=_finite, nargs="+", help="one sampling weight per source (see `prep.sources[].weight`)")
    p.add_argument("--names", nargs="+", help="one label per source for the `source` column (default: file names)")
    p.add_argument("--num-examples", type=_count, help="read only the first N rows of each source")
    p.add_argument("--split", default="train", help="split of a hub dataset or saved DatasetDict (default: train)")
    _add_world(p)
    if kind == "binary":
        d = PrepOptions.model_fields
        p.add_argument("--threshold", type=_finite, help=d["threshold"].description)
        p.add_argument("--keep-desirable", type=_finite, default=1.0, help=d["keep_desirable"].description)
    if kind in ("pairs", "binary"):
        d = PrepOptions.model_fields
        p.add_argument("--rejected-choice", choices=("worst", "random"), default="worst", help=d["rejected_choice"].description)
        p.add_argument("--min-margin", type=_finite, default=0.0, help=d["min_margin"].description)
        p.add_argument("--min-ratio", type=_finite, default=1.0, help=d["min_ratio"].description)
        p.add_argument("--ranked-pairs", choices=("best-worst", "adjacent", "all"), default="best-worst", help=d["ranked_pairs"].description)


def _add_world(p: argparse.ArgumentParser) -> None:
    from alignment.demo.world import PRESETS

    p.add_argument("--world", default="default", choices=tuple(PRESETS),
                   help="preset of the demo world that 'demo' data come from (default: %(default)s; docs/demo_world.md)")


def options_from(args: argparse.Namespace, kind: str) -> PrepOptions:
    """The command line as the schema's PrepOptions (the prep stage's own section)."""
    n = len(args.sources)
    for flag, values in (("--weights", args.weights), ("--names", args.names)):
        if values is not None and len(values) != n:
            raise DataError(f"{flag}: {len(values)} values for {n} sources")
    for path in args.sources:
        if problem := split_problem(path, args.split):
            raise DataError(f"--split: {problem}")
    columns = PrepColumns(**dict(args.column))
    sources = [
        PrepSource(
            path=path, shape=args.shape, columns=columns, split=args.split, num_examples=args.num_examples,
            weight=args.weights[i] if args.weights else 1.0, name=args.names[i] if args.names else None,
        )
        for i, path in enumerate(args.sources)
    ]
    extra = {}
    if kind in ("pairs", "binary"):
        extra = dict(rejected_choice=args.rejected_choice, min_margin=args.min_margin, min_ratio=args.min_ratio,
                     ranked_pairs=args.ranked_pairs, max_prompt_tokens=args.max_prompt_tokens)
    if kind == "binary":
        extra.update(threshold=args.threshold, keep_desirable=args.keep_desirable)
    return PrepOptions(
        kind=kind, sources=sources, test_fraction=args.test_fraction, split_seed=args.split_seed, dedup=args.dedup,
        max_turns=args.max_turns, max_length=args.max_length, strict=args.strict, seed=args.seed, **extra,
    )


def _tokenizer(args):
    if args.tokenizer is None:
        return None
    from alignment.models import load_tokenizer

    return load_tokenizer(user_path(args.tokenizer))


def _finish(out: Path, prepared) -> int:
    from .prepare import summary_text
    from .write import write_atomic

    names = write_atomic(out, prepared.kind, prepared.splits, prepared.summary)
    print(summary_text(prepared.summary))
    print(f"wrote {out}/: {', '.join(names)}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from .prepare import prepare
    from .write import check_out_dir

    out = Path(user_path(args.out))
    check_out_dir(out, inputs=tuple(("SOURCE", s) for s in args.sources))  # before any work
    options = options_from(args, args.command)
    if (options.max_length or options.max_prompt_tokens) and not args.tokenizer:
        raise DataError("--max-length / --max-prompt-tokens count tokens: give --tokenizer")
    return _finish(out, prepare(options, _tokenizer(args), progress=not args.quiet, num_proc=args.num_proc,
                                world=args.world))


def onpolicy(args: argparse.Namespace) -> int:
    from alignment.config import GenerationOptions, check_function_refs, check_reward_weights
    from alignment.models import check_model_kind
    from alignment.rewards import load_function

    from .onpolicy import onpolicy_rows, read_prompts
    from .prepare import prepare
    from .write import check_out_dir

    out = Path(user_path(args.out))
    check_out_dir(out, inputs=(("--prompts", args.prompts),))
    if args.reward_model is None and not args.oracle and not args.reward_fn:
        raise DataError("score with --reward-model DIR, --reward-fn FILE.py:NAME, or --oracle for the demo world's "
                        "gold oracle")
    if args.oracle and (args.reward_fn or args.reward_model is not None):
        other = "--reward-fn" if args.reward_fn else "--reward-model"
        raise DataError(f"--oracle and {other}: give one scorer (to add the oracle to other reward sources, give it "
                        "as the reward function 'gold': --reward-fn gold)")
    if args.reward_weights is not None and not args.reward_fn:
        raise DataError("--reward-weights weighs --reward-fn functions (and --reward-model): give --reward-fn")
    try:
        check_reward_weights(args.reward_model is not None, check_function_refs(args.reward_fn), args.reward_weights)
    except ValueError as exc:
        raise DataError(f"--reward-fn / --reward-weights: {exc}") from None
    GenerationOptions(temperature=args.temperature, top_p=args.top_p, samples_per_prompt=args.k)  # their ranges
    if args.k < 2:
        raise DataError(f"--k {args.k}: a pair needs at least 2 samples per prompt (best vs worst)")
    model, reward_model = user_path(args.model), args.reward_model and user_path(args.reward_model)
    check_model_kind(model, "causal-lm", key="--model")  # before any sampling
    if reward_model:
        check_model_kind(reward_model, "classifier", key="--reward-model")
    for ref in args.reward_fn:
        try:
            load_function(ref)  # a missing file or function: one line, before any sampling
        except RecipeError as exc:
            raise DataError(f"--reward-fn: {exc}") from None
    options = PrepOptions(
        kind="pairs", sources=[PrepSource(path=args.prompts, name="onpolicy", shape="explicit")], test_fraction=args.test_fraction,
        split_seed=args.split_seed, dedup=args.dedup, max_turns=args.max_turns, max_length=args.max_length,
        strict=args.strict, seed=args.seed, min_margin=args.min_margin,
    )
    columns: dict = {}
    prompts = read_prompts(options.sources[0].path, args.prompt_column, args.num_prompts, args.seed, args.world, columns)
    rows = onpolicy_rows(
        prompts, model, k=args.k, reward_model=reward_model, min_margin=args.min_margin, columns=columns,
        reward_fn=args.reward_fn, reward_weights=args.reward_weights, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
    )
    prepared = prepare(options, _tokenizer(args), progress=not args.quiet, given={"onpolicy": rows}, num_proc=args.num_proc)
    return _finish(out, prepared)


DEMO_MANIFEST = "demo.json"  # names the files `demo` wrote, so that a rerun replaces only those


def _demo_written(out: Path) -> list[str]:
    """The files an earlier `demo` wrote in `out` (listed in its demo.json), or []."""
    try:
        manifest = json.loads((out / DEMO_MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    ours = isinstance(manifest, dict) and manifest.get("written_by") == "data_prep demo"
    return list(manifest.get("files", [])) if ours else []


def demo(args: argparse.Namespace) -> int:
    from alignment.demo import world

    from .write import check_out_dir, line_bytes

    out = Path(user_path(args.out))
    check_out_dir(out, ours_only=False)
    names = ["pretrain.jsonl", "sft.jsonl", "preferences.jsonl", "eval_prompts.jsonl"]
    written = _demo_written(out)
    for name in [*names, DEMO_MANIFEST]:
        ours = name in written or (name == DEMO_MANIFEST and written)
        if (out / name).exists() and not ours:
            raise DataError(f"--out {out}: '{name}' is there and was not written by data_prep demo; "
                            "choose another --out or move it away")
    w = world.preset(args.world)
    files = {
        "pretrain.jsonl": [{"text": t} for t in w.pretrain_corpus(args.pretrain, args.seed)],
        "sft.jsonl": w.sft_conversations(args.sft, args.seed),
        "preferences.jsonl": w.preference_pairs(args.pairs, args.seed),
        "eval_prompts.jsonl": [{"prompt": p} for p in w.eval_prompts(args.eval, args.seed)],
    }
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"written_by": "data_prep demo", "files": sorted({*written, *names})}
    contents = {DEMO_MANIFEST: json.dumps(manifest, indent=2).encode() + b"\n"}  # first: a crash leaves them ours
    contents.update({name: b"".join(line_bytes(r) for r in rows) for name, rows in files.items()})
    for name, data in contents.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
        if name in files:
            print(f"{out / name}: {len(files[name])} rows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m data_prep",
        description="Turn preference, SFT and text data into the canonical form the alignment stages read.",
        epilog=SHAPE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "pairs": "preference pairs from explicit, implicit (transcript), rated, scored or ranked rows",
        "binary": "unpaired feedback rows (prompt, completion, label) for kto: thumbs, accept/reject, ratings "
        "(--threshold), or pairs (one desirable and one undesirable row each)",
        "sft": "SFT conversations (messages or transcripts)",
        "text": "raw text for pretraining",
    }
    for kind, text in helps.items():
        p = sub.add_parser(kind, help=text, description=text[0].upper() + text[1:] + ".",
                           epilog=SHAPE_EXAMPLES + "\n" + EXAMPLES[kind], formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_sources(p, kind)
        _add_cleaning(p, kind)
        p.set_defaults(func=convert)

    p = sub.add_parser(
        "onpolicy", help="sample k replies per prompt, score them, keep best vs worst (iterative DPO)",
        description="On-policy pairs: sample --k replies per prompt from --model, score them with --reward-model "
        "and/or --reward-fn (or --oracle: the demo world's gold oracle), keep best vs worst when the score margin is at "
        "least --min-margin. A sampled reply may be empty (the model stopped at once): it is kept, marked generated.",
        epilog="examples:\n  python -m data_prep onpolicy --model runs/sft --prompts demo --num-prompts 500 --k 4 --oracle --out data/onpolicy\n"
        "  python -m data_prep onpolicy --model runs/dpo --prompts prompts.jsonl --k 8 --reward-model runs/reward \\\n"
        "      --min-margin 0.5 --out data/round2\n"
        "  python -m data_prep onpolicy --model runs/sft --prompts tasks.jsonl --reward-fn checks.py:exact_match --out data/r1\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="policy to sample from (a model directory or hub id)")
    p.add_argument("--prompts", required=True, help=f"prompts: {READ} with a prompt column, or 'demo'")
    p.add_argument("--prompt-column", default="prompt", help="column of the prompts (default: prompt)")
    p.add_argument("--num-prompts", type=_count, help="use the first N prompts (demo: how many to make, default 200)")
    p.add_argument("--k", type=_count, default=4, help="samples per prompt (default 4)")
    p.add_argument("--reward-model", help="reward model directory (a one-label classifier) that scores the samples")
    p.add_argument("--reward-fn", action="append", default=[], metavar="FILE.py:NAME",
                   help="Python reward function that scores the samples, as the RL stages' reward_fn: 'file.py:name' "
                   "or 'package.module:name', called as name(prompts=..., completions=..., **columns) with the prompt "
                   "file's other columns; repeat for several (summed, with --reward-model too when given)")
    p.add_argument("--reward-weights", type=_finite, nargs="+", metavar="W",
                   help="weight of each source in the sum: --reward-model first when given, then each --reward-fn "
                   "(default: all 1)")
    p.add_argument("--oracle", action="store_true", help="score with the demo world's gold oracle instead")
    p.add_argument("--min-margin", type=_finite, default=0.0, help="least score gap between chosen and rejected (ties always dropped)")
    p.add_argument("--temperature", type=_finite, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=_finite, default=1.0, help="nucleus sampling (default 1.0: off)")
    longest = PrepSamples.model_fields["max_new_tokens"].default
    p.add_argument("--max-new-tokens", type=_count, default=longest, help=f"longest sample (default {longest})")
    p.add_argument("--batch-size", type=_count, default=64, help="prompts generated at once (default 64)")
    _add_world(p)
    _add_cleaning(p, "onpolicy")
    p.set_defaults(func=onpolicy)

    p = sub.add_parser("demo", help="write the demo world's datasets as JSONL",
                       description="Write the demo world's pretraining corpus, SFT conversations, preference pairs "
                       "and held-out eval prompts as JSONL files.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--pretrain", type=_count, default=20000, help="pretraining documents (default 20000)")
    p.add_argument("--sft", type=_count, default=4000, help="SFT conversations (default 4000)")
    p.add_argument("--pairs", type=_count, default=4000, help="preference pairs (default 4000)")
    p.add_argument("--eval", type=_count, default=300, help="held-out eval prompts (default 300)")
    _add_world(p)
    p.set_defaults(func=demo)
    return parser


FLAG_OF = {"weight": "--weights", "name": "--names", "path": "SOURCE", "samples_per_prompt": "--k"}


def _validation_line(exc: ValidationError) -> str:
    """A schema error as one line naming the flag (a check across flags names none)."""
    err = exc.errors()[0]
    message = err["msg"].removeprefix("Value error, ")
    name = next((p for p in reversed(err["loc"]) if isinstance(p, str)), None)
    return f"{FLAG_OF.get(name, '--' + name.replace('_', '-'))}: {message}" if name else message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as exc:  # DataError, and the model layer's errors (--model, --tokenizer, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: {_validation_line(exc)}", file=sys.stderr)
        return 2
