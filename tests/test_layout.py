"""The package's shape: docs/layout.md lists every module, and no import circle joins them.

An import inside a function counts too: one that only hides a circle would pass a test over
module-level imports alone. Imports kept inside functions for start-up time (torch, plotly) join
no circle, so none needs an exception here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alignment", "data_prep")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """Our modules an import statement in `module` loads: `from . import x` and `from .x import y`
    alike, relative or absolute; a name imported from a module counts as that module (or as the
    submodule of that name where there is one)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            anchor = package[: len(package) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return {t for t in targets if t in known and t != module}


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line}, over every import statement, at module level or not."""
    known = modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(name, path, node, set(known)):
                    graph[name].setdefault(target, node.lineno)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One path per strongly connected group of more than one module (or a module that imports
    itself), as a -> b -> ... -> a."""
    found, seen = [], set()
    for start in sorted(graph):
        if start in seen:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                stack.pop()
                path.pop()
                seen.add(node)
            elif nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return found


def layout_entries(text: str) -> dict[str, str]:
    """docs/layout.md's code block: entry path -> its text (continuation lines, indented, included)."""
    block = text.split("```")[1]
    entries: dict[str, str] = {}
    head = None
    for line in block.splitlines():
        if line.strip() and not line[0].isspace():
            head = line.split()[0]
            entries[head] = line[len(head):].strip()
        elif line.strip() and head is not None:
            entries[head] += " " + line.strip()
    return entries


def test_layout_page_lists_every_module_and_nothing_that_is_gone():
    entries = layout_entries((ROOT / "docs" / "layout.md").read_text())
    missing = [str(path.relative_to(ROOT)) for path in modules().values()
               if path.name not in ("__init__.py", "__main__.py") and str(path.relative_to(ROOT)) not in entries]
    assert not missing, f"docs/layout.md does not list {', '.join(missing)}: add a line saying what each holds"
    gone = [head for head in entries if not (ROOT / head.rstrip("/").split("/")[0]).exists() or
            (head.endswith((".py", "/")) and not (ROOT / head).exists())]
    assert not gone, f"docs/layout.md lists {', '.join(gone)}, which no longer exist"
    assert all(entries[head] for head in entries), "every entry says what the file holds"


def test_the_circle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    """The checker itself: a circle closed by an import inside a function is found and reported."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n")
    (package / "c.py").write_text("from pkg.a import thing\n")
    known = {"pkg": package / "__init__.py", **{f"pkg.{n}": package / f"{n}.py" for n in "abc"}}
    graph = {name: {} for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update({t: node.lineno for t in imported(name, path, node, set(known))})
    assert graph["pkg.b"] == {"pkg.a": 2} and graph["pkg.c"] == {"pkg.a": 1}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_no_import_circle_among_our_modules():
    graph = import_graph()
    assert "alignment.config" in graph["alignment.pipeline"]  # the graph sees relative imports
    assert "alignment.demo.world" in graph["alignment.stages.compare"]  # and `from ..x.y import`
    found = circles(graph)
    shown = "; ".join(" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}" for c in found)
    assert not found, f"import circles: {shown}"
