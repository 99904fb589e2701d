"""A recipe file read into the schema: YAML read strictly (a key written twice is an error),
overrides (`KEY=VALUE`, `NAME:KEY=VALUE`, `*:KEY=VALUE`) applied, the schema validated, and every
failure rendered as one line naming the file and line (or the override) and the key.

`load_recipe` is the entry; the schema itself (every key, its default and help text) is
alignment/config.py.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import RECIPE_CLASSES, BaseRecipe, CompareRecipe
from .errors import RecipeError


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"key {key!r} is written twice (first at line {first}); keep one")
        self.line = line


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key written twice in one mapping (plain PyYAML keeps the
    last one and silently drops the first block)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # a complex key: nothing a recipe uses
                if key in first_line:
                    raise DuplicateKey(key, key_node.start_mark.line + 1, first_line[key])
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _line_index(text: str) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number."""
    index: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                index[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                index[path + (i,)] = value.start_mark.line + 1
                walk(value, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return index


def _fields_at(cls: type[BaseModel], path: tuple) -> list[str]:
    """Valid keys of the section reached by following `path` from `cls`."""
    for part in path:
        if isinstance(part, int):  # an item of a list: the same section as the list's items
            continue
        field = cls.model_fields.get(part) or next(
            (f for f in cls.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return []
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return [f.alias or name for name, f in cls.model_fields.items()]


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "literal": "one of",
}


def _is_union_tag(part) -> bool:
    """pydantic puts the tried member of a union in the error path ('str', 'list[str]', 'FromRecipe')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "FromRecipe") or "[" in part)


def _describe(err: dict, cls: type[BaseModel]) -> tuple[tuple, str]:
    """Turn one pydantic error into (key path, message)."""
    loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        valid = _fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return loc, f"unknown key ({hint})"
    if kind == "missing":
        return loc, "missing required key"
    if kind == "finite_number":
        return loc, f"expected a finite number, got {got!r}"
    if kind == "literal_error":
        return loc, f"expected {err['ctx']['expected']}, got {got!r}"
    if kind == "value_error":
        return loc, str(err["ctx"]["error"])
    for word, text in _TYPE_WORDS.items():
        if kind.startswith(word):
            if kind.endswith(("_type", "_parsing")):
                return loc, f"expected {text}, got {type(got).__name__} {got!r}"
    return loc, f"{err['msg']} (got {got!r})"


def parse_override(text: str) -> tuple[str | None, list[str], Any]:
    """Parse '[RECIPE:]dotted.key=value' into (recipe stem or None, key path, YAML value)."""
    target, sep, rest = text.partition(":") if ":" in text.split("=", 1)[0] else (None, "", text)
    if target is not None and not target.strip():
        raise RecipeError(
            f"override {text!r}: no recipe name before ':'; write NAME:dotted.key=value (a recipe of this run, "
            "e.g. sft:training.max_steps=2), *:dotted.key=value for every recipe, or dotted.key=value for the top one"
        )
    key, eq, raw = rest.partition("=")
    path = key.strip().split(".")
    if not eq or not key.strip() or any(not p or not p.replace("_", "").isalnum() for p in path):
        raise RecipeError(
            f"override {text!r}: expected [RECIPE:]dotted.key=value, e.g. training.learning_rate=1e-4"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return target, path, value


def _apply_override(data: dict, path: list[str], value: Any, text: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {text!r}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_recipe(path: str | Path, overrides: list[tuple[list[str], Any, str]] = (), check_software: bool = True) -> BaseRecipe:
    """Read, override and validate a recipe; every failure is a one-line RecipeError. `check_software`:
    also what the installed libraries accept (importing transformers, and with it torch); the values
    are the same either way."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: not a text file (byte {exc.object[exc.start]:#04x} is not UTF-8); a recipe is a YAML text file"
        ) from None
    try:
        data = yaml.load(text, Loader=RecipeLoader)
    except DuplicateKey as exc:
        raise RecipeError(f"{path}:{exc.line}: {exc}") from None
    except yaml.YAMLError as exc:
        if isinstance(exc, yaml.reader.ReaderError):  # a control character, as in a binary file
            line = text[: exc.position].count("\n") + 1
            code = exc.character if isinstance(exc.character, int) else ord(exc.character)
            raise RecipeError(
                f"{path}:{line}: not a text file (control character {code:#04x}); a recipe is a YAML text file"
            ) from None
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise RecipeError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    from_override: dict[tuple, str] = {}
    own = copy.deepcopy(data)  # the recipe's keys and those overridden for it alone (not `*:KEY=...`)
    for key_path, value, raw in overrides:
        if not raw.startswith("*:"):
            _apply_override(own, key_path, value, raw)
        _apply_override(data, key_path, value, raw)
        from_override[tuple(key_path)] = raw

    stage = data.get("stage")
    if not isinstance(stage, str) or stage not in RECIPE_CLASSES:
        got = "missing required key" if stage is None else f"got {stage!r}"
        raise RecipeError(f"{path}: stage: {got}; expected one of {', '.join(RECIPE_CLASSES)}")
    cls = RECIPE_CLASSES[stage]
    def error(loc: tuple, message: str, more: int = 0) -> RecipeError:
        """The one line naming the file and line (or the override) of the key at `loc`."""
        dotted = "".join(f"{p}: " for p in [".".join(str(p) for p in loc)] if p)
        source = next((f"override {raw!r}" for k, raw in from_override.items() if k == loc[: len(k)] or loc == k[: len(loc)]), None)
        if source is None:
            lines = _line_index(text)
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            source = f"{path}:{line}" if line else str(path)
        else:
            source = f"{path} ({source})"
        return RecipeError(f"{source}: {dotted}{message}" + (f" (+{more} more)" if more else ""))

    try:
        # Keys and values first, then what the installed libraries accept (attention kernels,
        # schedulers, trackers): a typo is refused before transformers is imported (seconds).
        recipe = cls.model_validate(data, context={"check_software": False})
        if check_software:
            recipe = cls.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise error(*_describe(errors[0], cls), more=len(exc.errors()) - 1) from None
    unread = _unread_key(recipe, own)
    if unread:
        raise error(*unread)
    recipe._path = path
    return recipe


def _set(data, loc: tuple) -> bool:
    """Whether the raw recipe (YAML and overrides) sets the key at `loc`."""
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return True


def _unread_key(recipe: BaseRecipe, data: dict) -> tuple[tuple, str] | None:
    """(key path, message) of a key the recipe sets that its stage never reads, or None: one of
    the stage's UNREAD keys, or a split of a data file (only hub datasets and saved DatasetDicts
    have splits). Keys set for every recipe of a chain (`*:KEY=VALUE`) are let through."""
    for dotted in type(recipe).UNREAD:
        loc = tuple(dotted.split("."))
        if _set(data, loc):
            return loc, f"the {recipe.stage} stage never reads this key; remove it"
    splits = [(("data", "split"), recipe.data.source)]
    splits += [(("prompts", "split"), recipe.prompts.source)] if isinstance(recipe, CompareRecipe) else []
    splits += [(("prep", "sources", i, "split"), s.path) for i, s in enumerate(getattr(getattr(recipe, "prep", None), "sources", []))]
    for loc, source in splits:
        if _set(data, loc) and isinstance(source, str) and Path(source).is_file():
            return loc, f"{source} is a file, which has no splits (a split is read from a hub dataset or a saved DatasetDict)"
    return None
