"""Python functions a recipe names by reference: 'file.py:name' (a path, `~` expanded; it may hold
a colon: the name follows the last one) or 'package.module:name'. The reward functions
(`reward_fn`) and a user advantage estimator (`grpo.advantage_estimator`) are both loaded here.

A file is run once per process for as long as it is unchanged (the plan loads every function to
refuse a bad one before anything trains, and the stage loads it again); an edited file is run anew.
Every failure is a one-line RecipeError that starts with the recipe key and the reference.

Imports nothing heavy: the schema checks a reference's form with `is_reference` before torch loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from .errors import RecipeError


def is_reference(text: str) -> bool:
    """Whether `text` has the form of a reference: something, a colon, then a Python name."""
    target, sep, name = text.rpartition(":")
    return bool(sep and target and name.isidentifier())


def reference_file(ref: str) -> str | None:
    """The file a 'file.py:name' reference reads (its bytes enter the stage's hash); None for a module."""
    target = ref.rpartition(":")[0]
    return target if target.endswith(".py") else None


_FILES: dict[tuple, object] = {}  # (resolved path, size, mtime) -> module


def _load_file(key: str, ref: str, path: Path):
    stat = path.stat()
    version = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if version in _FILES:
        return _FILES[version]
    module_name = f"_alignment_user_{abs(hash(version))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # a dataclass in the file looks its module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error is theirs to see in one line
        del sys.modules[module_name]
        raise RecipeError(f"{key} {ref!r}: importing {path} failed ({type(exc).__name__}: {exc})") from None
    _FILES[version] = module
    return module


def load_function(ref: str, key: str, arguments: tuple[str, ...] | None = None) -> Callable:
    """The function `ref` names; `key` (the recipe key that names it) starts every error's line.
    `arguments`: the names of the positional arguments it will be called with, checked against its
    signature here (so a function that cannot take them is refused when loaded, not in the middle
    of a run); None: any (reward functions are given the keywords they name)."""
    target, _, name = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise RecipeError(f"{key} {ref!r}: no such file {str(path)!r}")
        module = _load_file(key, ref, path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise RecipeError(f"{key} {ref!r}: cannot import module {target!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RecipeError(f"{key} {ref!r}: {target} has no function {name!r}")
    if arguments is not None:
        try:
            inspect.signature(fn).bind(*arguments)
        except TypeError as exc:
            raise RecipeError(f"{key} {ref!r}: it is called as {name}({', '.join(arguments)}), which it cannot take ({exc})") from None
        except ValueError:  # no signature to read (some built-ins): the call will tell
            pass
    return fn
