"""Write docs/recipe_keys.md, the reference of every recipe key, from the schema in alignment/config.py.

    python -m alignment.schema_docs            # rewrite docs/recipe_keys.md
    python -m alignment.schema_docs --check    # exit 1 if docs/recipe_keys.md is out of date

The page is generated, never edited by hand, so it cannot drift from the schema: each recipe
class of ``RECIPE_CLASSES`` is walked, section by section, and every key is listed with its type
(and bounds), default and help text. tests/test_docs.py regenerates it in memory and fails when
the committed file differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import RECIPE_CLASSES, FromRecipe, Section

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "recipe_keys.md"
COMMAND = "python -m alignment.schema_docs"

HEADER = f"""\
<!-- Generated from alignment/config.py by `{COMMAND}`: do not edit by hand. -->
# Recipe keys

Every key a recipe can set, with its type, default and meaning, generated from the schema in
[`alignment/config.py`](../alignment/config.py) (where the defaults live, and nowhere else).
After changing the schema, regenerate this page and commit it with the change:

```bash
{COMMAND}            # rewrites docs/recipe_keys.md
```

`tests/test_docs.py` fails while this page and the schema disagree. How recipes are written,
chained and overridden: [recipes.md](recipes.md).
"""


# --------------------------------------------------------------------------- rendering


def _is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel) and tp is not FromRecipe


def _args(tp):
    return typing.get_args(tp)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _sections_in(tp) -> list[tuple[str, type]]:
    """The section classes inside an annotation, with the path suffix ('' or '[]' for a list item)."""
    if _is_section(tp):
        return [("", tp)]
    if _is_union(tp):
        return [found for arg in _args(tp) for found in _sections_in(arg)]
    if typing.get_origin(tp) is list:
        return [("[]" + suffix, cls) for suffix, cls in _sections_in(_args(tp)[0])]
    return []


def _type_name(tp, link) -> str:
    if tp is type(None):
        return "null"
    if tp is FromRecipe:
        return "{from: recipe.yaml}"
    if _is_section(tp):
        return link(tp)
    if _is_union(tp):
        return " or ".join(_type_name(arg, link) for arg in _args(tp))
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{_value(v)}`" for v in _args(tp))
    if origin is list:
        return f"list of {_type_name(_args(tp)[0], link)}"
    if origin is dict:
        key, value = _args(tp)
        return f"mapping {_type_name(key, link)} → {_type_name(value, link)}"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(tp.__name__, tp.__name__)
    return str(tp)


_BOUNDS = {annotated_types.Gt: ">", annotated_types.Ge: "≥", annotated_types.Lt: "<", annotated_types.Le: "≤"}


def _bounds(field) -> str:
    parts = []
    for item in field.metadata:
        for kind, sign in _BOUNDS.items():
            if isinstance(item, kind):
                parts.append(f"{sign} {_value(getattr(item, kind.__name__.lower()))}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append(f"at least {item.min_length} item{'s' if item.min_length > 1 else ''}")
    return ", ".join(parts)


def _value(value) -> str:
    """A default as it would be written in YAML (flow style)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True, exclude_defaults=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = value and re.fullmatch(r"[A-Za-z_][\w./-]*", value) and value not in ("null", "true", "false", "yes", "no", "on", "off")
        return value if plain else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, Section):
            return "(section)"
    else:
        value = field.default
    return "" if value is PydanticUndefined else f"`{_value(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# --------------------------------------------------------------------------- walking


def _stage_list(stages: list[str]) -> str:
    return "every stage" if list(stages) == list(RECIPE_CLASSES) else ", ".join(stages)


def _collect():
    """Top-level rows and sections, each with the stages that share it exactly.

    Returns (top, sections): top maps (key, cls-of-recipe-field row) → stages; sections is an
    ordered dict (path, section class) → list of stages."""
    sections: dict[tuple[str, type], list[str]] = {}

    def walk(path: str, cls: type, stage: str) -> None:
        sections.setdefault((path, cls), [])
        if stage not in sections[(path, cls)]:
            sections[(path, cls)].append(stage)
        for name, field in cls.model_fields.items():
            for suffix, sub in _sections_in(field.annotation):
                walk(f"{path}.{field.alias or name}{suffix}", sub, stage)

    for stage, recipe in RECIPE_CLASSES.items():
        for name, field in recipe.model_fields.items():
            if name in recipe.UNREAD:  # a key the stage never reads (setting it is an error): not listed
                continue
            for suffix, sub in _sections_in(field.annotation):
                walk(f"{field.alias or name}{suffix}", sub, stage)
    return sections


def render() -> str:
    """The whole page, as written to docs/recipe_keys.md."""
    sections = _collect()
    headings = {key: f"`{key[0]}` ({_stage_list(stages)})" for key, stages in sections.items()}
    # a path used by one class only needs no stage list in its heading
    by_path: dict[str, int] = {}
    for path, _ in sections:
        by_path[path] = by_path.get(path, 0) + 1
    for (path, cls), stages in sections.items():
        if by_path[path] == 1:
            headings[(path, cls)] = f"`{path}`"

    def link_for(path: str):
        def link(cls: type) -> str:
            heading = headings.get((path, cls))
            return f"section [`{path}`](#{_slug(heading)})" if heading else cls.__name__

        return link

    def row(path: str, name: str, field) -> list[str]:
        key = field.alias or name
        sub_path = f"{path}.{key}" if path else key
        if typing.get_origin(field.annotation) is list and _sections_in(field.annotation):
            sub_path += "[]"
        kind = _type_name(field.annotation, link_for(sub_path))
        bounds = _bounds(field)
        if bounds:
            kind += f", {bounds}"
        description = field.description
        if not description and _sections_in(field.annotation):  # a section: its own docstring, first sentence
            doc = " ".join((_sections_in(field.annotation)[0][1].__doc__ or "").split())
            description = doc.split(": ")[0].split(". ")[0].rstrip(".") + "." if doc else ""
        return [f"`{key}`", _cell(kind), _cell(_default(field)), _cell(description or "")]

    out = [HEADER]

    # top level: rows identical across stages are merged
    stage_names = ", ".join(f"`{s}`" for s in RECIPE_CLASSES)
    out.append("## Top-level keys\n")
    out.append(
        f"`stage` (required) is one of {stage_names}; it decides which of the keys below a recipe may set. "
        "A key not listed for a stage, or not listed at all, is an error naming the file, line and closest "
        "valid key.\n"
    )
    rows: dict[tuple, list[str]] = {}
    for stage, recipe in RECIPE_CLASSES.items():
        for name, field in recipe.model_fields.items():
            if name == "stage" or name in recipe.UNREAD:
                continue
            cells = tuple(row("", name, field))
            rows.setdefault(cells, []).append(stage)
    out.append("| key | stages | type | default | description |")
    out.append("|---|---|---|---|---|")
    first = {}  # variants of one key (e.g. `data` per stage) stay together, in schema order
    for cells in rows:
        first.setdefault(cells[0], len(first))
    for cells, stages in sorted(rows.items(), key=lambda item: first[item[0][0]]):
        key, kind, default, description = cells
        out.append(f"| {key} | {_stage_list(stages)} | {kind} | {default} | {description} |")
    out.append("")

    out.append("## Sections\n")
    for (path, cls), stages in sections.items():
        out.append(f"### {headings[(path, cls)]}\n")
        if by_path[path] == 1 and _stage_list(stages) != "every stage":
            out.append(f"Stages: {_stage_list(stages)}.\n")
        doc = (cls.__doc__ or "").strip()
        if doc and cls.__doc__ is not BaseModel.__doc__ and not doc.startswith("Usage docs:"):
            out.append(" ".join(doc.split()) + "\n")
        out.append("| key | type | default | description |")
        out.append("|---|---|---|---|")
        for name, field in cls.model_fields.items():
            out.append("| " + " | ".join(row(path, name, field)) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="file to write (default: docs/recipe_keys.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    if args.check:
        if current != text:
            print(f"{args.out}: out of date with alignment/config.py; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(f"{args.out} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
