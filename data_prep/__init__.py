"""Preference and training data preparation: the shapes people have -> one canonical form.

    python -m data_prep pairs hh.jsonl.gz --out data/hh     # transcripts, explicit, rated, scored, ranked rows
    python -m data_prep sft chats.jsonl --out data/sft
    python -m data_prep onpolicy --model runs/sft --prompts demo --k 4 --oracle --out data/onpolicy
    python -m data_prep demo --out data/demo                # the demo world's datasets

Modules: `read` (the one file reader), `shapes` (shape detection and normalisation, the one
parser, also used by the reward and dpo stages), `prepare` (cleaning, splitting, mixing and
accounting), `write` (JSONL + Parquet + summary.json), `onpolicy` (sampled pairs).
The same options drive the `prep` stage of a recipe (alignment/config.py: PrepOptions).
"""
