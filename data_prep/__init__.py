"""Preference and training data preparation.

    python -m data_prep demo --out data/demo     # the demo world's datasets as JSONL files

Writes the formats the recipes read (`data.source: path.jsonl`), so a user can look at
them, edit them, or replace them with their own rows in the same shape.
"""
