"""Paths the user gives and the outputs the toolkit writes, shared by every command.

* `user_path`: a leading `~` is the home directory wherever a path is read (recipes, overrides,
  command lines), never a directory named `~`.
* `output_problem`: why an output directory cannot be written, found before any work.
* `keep_foreign`: a rerun replaces an output of ours by a new directory; files someone else
  put inside the old one are carried into the new one (hard links, else copies), never lost.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import RecipeError


def user_path(value: str) -> str:
    """`value` with a leading `~` or `~user` expanded; anything else unchanged. A `~user` that names
    no user of this machine is an error: left as it is, it would become a directory called `~user`."""
    if not value.startswith("~"):
        return value
    expanded = os.path.expanduser(value)
    if expanded == value:
        name = value[1:].split("/", 1)[0]
        raise RecipeError(f"'{value}': no user '{name}' on this machine (a path that starts with ~ names a home directory)")
    return expanded


def output_problem(out: Path, probe: bool = True) -> str | None:
    """Why a directory cannot be (re)written at `out`, or None: a file there or above it, or a
    place this process may not write (with `probe`: checked by creating and removing a scratch
    directory in the nearest existing ancestor, and in `out` itself when it exists, since
    replacing it removes what is inside)."""
    if out.exists() and not out.is_dir():
        return f"'{out}' is a file, expected a directory (or a path that does not exist yet)"
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"'{parent}' is a file, not a directory"
    if not probe:
        return None
    for place in (parent, out) if out.is_dir() else (parent,):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.write-test-", dir=place))
        except OSError as exc:
            return f"cannot write in '{place}' ({exc.strerror})"
    return None


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file beside `path`, so that a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def files_under(root: Path) -> list[str]:
    """Relative paths of the files (and symbolic links) under `root`, without following links."""
    found = []
    for directory, dirs, files in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(directory, d))]
        for name in files + links:
            found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


def foreign_files(out: Path, ours) -> list[str]:
    """Files under the output `out` that are not among `ours` (relative paths the toolkit wrote)."""
    return [name for name in files_under(out) if name not in ours] if out.is_dir() else []


def keep_foreign(out: Path, new: Path, ours) -> list[str]:
    """Put into `new` every file under `out` that the toolkit did not write (not in `ours`), as a
    hard link (a copy where links are not possible), so that replacing `out` by `new` keeps them.
    A RecipeError, before anything is linked, if `new` already has a file of such a name."""
    foreign = foreign_files(out, ours)
    for name in foreign:
        clash = next((p for p in [new / name, *(new / name).parents] if p.is_file() or p.is_symlink()), None)
        if clash is not None and clash.is_relative_to(new):
            raise RecipeError(
                f"'{out / name}' was not written by the toolkit and the new output has '{clash.relative_to(new)}' "
                f"there too; move it away (the new output is left in '{new}')"
            )
    for name in foreign:
        source, target = out / name, new / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return foreign


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished directory `new` to `out`, replacing what is there by two renames (old
    aside as `<out>.old-<pid>`, new in), then remove the old: a crash at any moment leaves at
    least one of them whole. Callers check first that an existing `out` is theirs to replace."""
    if out.exists():
        aside = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(aside)
        try:
            new.rename(out)
        except OSError:
            aside.rename(out)  # the old one back in place (a kill here leaves both whole, as above)
            raise
        shutil.rmtree(aside)
    else:
        new.rename(out)
