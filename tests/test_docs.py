"""The documentation cannot drift: the recipe-key page is the schema's, and every relative link
of README.md and docs/*.md points at a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

from alignment import schema_docs
from alignment.config import RECIPE_CLASSES

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_recipe_keys_page_matches_the_schema():
    committed = schema_docs.OUTPUT.read_text(encoding="utf-8")
    assert committed == schema_docs.render(), (
        "docs/recipe_keys.md is out of date with the schema in alignment/config.py; "
        "regenerate it with `python -m alignment.schema_docs` and commit it"
    )


def test_recipe_keys_page_lists_every_key():
    text = schema_docs.render()
    for stage, recipe in RECIPE_CLASSES.items():
        for name, field in recipe.model_fields.items():
            if name != "stage":
                assert f"| `{field.alias or name}` |" in text, (stage, name)
    for section in ("model_options", "lora", "training", "report", "dpo", "ppo", "prep.sources[].columns", "generation"):
        assert f"### `{section}`" in text
    assert "| `learning_rate` | number, > 0 | `2e-05` |" in text  # type, bound and default of one key


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "recipe_keys.md"
    stale.write_text("old\n", encoding="utf-8")
    assert schema_docs.main(["--check", "--out", str(stale)]) == 1
    assert "python -m alignment.schema_docs" in capsys.readouterr().err
    assert stale.read_text(encoding="utf-8") == "old\n"  # --check writes nothing
    assert schema_docs.main(["--out", str(stale)]) == 0
    assert schema_docs.main(["--check", "--out", str(stale)]) == 0


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (duplicates get -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = re.match(r"#{1,6} (.*)", line)
        if match and not in_code:
            slug = schema_docs._slug(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path):
    in_code = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or line.startswith("    "):
            continue
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            yield number, target


def test_relative_links_point_at_existing_files_and_headings():
    bad = []
    for page in PAGES:
        for number, target in _links(page):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}:{number}: {target}"
            if not dest.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{where} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_docs_name_no_command_or_path_of_our_own_machines():
    for page in [*PAGES, *sorted((REPO / "benchmarks").iterdir()), *sorted((REPO / "recipes").rglob("*.yaml"))]:
        if page.is_file():
            text = page.read_text(encoding="utf-8")
            assert "cpujob" not in text and "/work/" not in text, page


def test_readme_fits_a_screen_and_states_the_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 80
    for command in ("make demo", "make test", "python -m pytest -q", "accelerate launch recipes/dpo.yaml"):
        assert command in readme, command
