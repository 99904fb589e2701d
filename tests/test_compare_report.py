"""The reports: `alignment compare`'s files (report.html checked in headless Chromium), the
`compare` stage in a pipeline, and the closing report of a run, all from one summary."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from alignment import cli
from alignment.config import ReportOptions, model_inputs
from alignment.pipeline import plan, run
from alignment.report import build_report

from .conftest import RECIPES

from .test_compare_models import dirs, tok  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def rendered_dom(html_file, tmp_path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("headless Chromium is needed to check report.html; install it: apt-get install -y chromium")
    done = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
         "--window-size=1400,1000",
         "--dump-dom", html_file.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    return done.stdout


def drawn_plots(dom: str) -> dict[str, tuple[int, int, float]]:
    """Plot div id -> (traces plotly drew, marks drawn: bars/markers and violins, width in pixels)."""
    found = {}
    pieces = re.split(r'<div id="(plot\d+)" class="plotly-graph-div js-plotly-plot"', dom)
    for name, body in zip(pieces[1::2], pieces[2::2]):
        traces = len(re.findall(r'class="trace (?:bars|scatter|violins)', body))
        marks = len(re.findall(r'class="point[" ]', body)) + body.count('class="violin"')
        width = float(re.search(r'<svg class="main-svg"[^>]*? width="([0-9.]+)"', body)[1])
        found[name] = (traces, marks, width)
    return found


@pytest.fixture(scope="module")
def report_dir(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    args = ["compare", f"base={dirs['a']}", f"sft={dirs['a_copy']}", f"dpo={dirs['b']}", "--baseline", "sft",
            "--reward-model", dirs["rm"], "--num-prompts", "8", "--max-new-tokens", "6", "--out", str(out),
            "--no-progress"]
    return out, args


def test_compare_writes_every_report_file_and_prints_the_table(report_dir, capsys):
    out, args = report_dir
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    assert "Gold score on 8 held-out demo prompts (temperature 1, at most 6 new tokens)" in stdout
    for text in ("KL to sft [95% CI]", "gold win vs sft", "polite", "content", "concise", "reward [95% CI]",
                 "sft - base:", "dpo - sft:", "dpo - sft (reward):", f"report: {out / 'report.html'}"):
        assert text in stdout, text
    assert re.search(r"^sft .* baseline", stdout, re.M)

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "sft", "dpo"] and summary["baseline"] == "sft"
    assert summary["models"]["base"]["kl_mean"] == 0.0  # the same weights as the baseline
    assert summary["models"]["dpo"]["kl_mean"] > 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]["replies"]) == {"base", "sft", "dpo"}
    assert set(rows[0]["replies"]["dpo"]) >= {"text", "finished", "num_tokens", "gold", "polite", "reward", "logratio"}
    md = (out / "report.md").read_text()
    assert "| model | gold [95% CI] |" in md and "## Win rates" in md and rows[0]["prompt"] in md

    assert cli.main(args) == 0  # a second run replaces its own earlier output
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_report_html_is_self_contained_and_its_plots_are_drawn(report_dir, tmp_path):
    out, args = report_dir
    if not (out / "report.html").exists():
        assert cli.main(args) == 0
    html = (out / "report.html").read_text()
    assert re.search(r"<script[^>]*\bsrc=", html) is None  # plotly's JS is inlined: nothing to fetch
    dom = rendered_dom(out / "report.html", tmp_path)
    plots = drawn_plots(dom)
    # gold histogram, reward violins, gold parts, win rates, score vs KL, length histogram, score vs length
    expected_traces = [3, 3, 3, 1, 3, 3, 3]
    assert [plots[f"plot{i}"][0] for i in range(7)] == expected_traces, plots
    assert all(marks > 0 for _, marks, _ in plots.values()), plots
    widths = {width for _, _, width in plots.values()}
    assert len(widths) == 1 and 500 < widths.pop() < 1400 / 2, plots  # two columns, none overflowing its cell
    assert dom.count('class="main-svg"') >= 7
    assert len(re.findall(r"<tr>", dom.split('id="samples"')[1])) == 8 + 1  # header + one row per prompt


def test_compare_stage_in_a_recipe(dirs, in_tmp):
    recipe = in_tmp / "cmp.yaml"
    recipe.write_text(
        "stage: compare\n"
        f"models: {{base: {dirs['a']}, dpo: {dirs['b']}}}\n"
        "prompts: {num_prompts: 4}\n"
        "generation: {max_new_tokens: 5, samples_per_prompt: 2}\n"
    )
    [node] = run(recipe)
    for name in ("report.html", "report.md", "samples.jsonl", "summary.json", "run_info.json"):
        assert (node.out_dir / name).is_file(), name
    assert not (node.out_dir / "README.md").exists()  # no model card for a report
    info = json.loads((node.out_dir / "run_info.json").read_text())
    assert info["summary"]["dpo/kl_mean"] > 0 and "base/gold_mean" in info["summary"]
    assert len((node.out_dir / "samples.jsonl").read_text().splitlines()) == 8


def test_compare_stage_chains_recipes_by_reference(in_tmp):
    recipe = in_tmp / "cmp.yaml"
    recipe.write_text(f"stage: compare\nmodels: {{sft: {{from: {RECIPES / 'sft.yaml'}}}, dpo: {{from: {RECIPES / 'dpo.yaml'}}}}}\n"
                      "baseline: sft\n")
    nodes = plan(recipe)
    assert [n.name for n in nodes] == ["init", "pretrain", "sft", "dpo", "cmp"]
    top = nodes[-1]
    assert set(model_inputs(top.recipe)) == {"models.sft", "models.dpo"}
    assert top.inputs() == {"models.sft": str(nodes[2].out_dir), "models.dpo": str(nodes[3].out_dir)}


def test_compare_recipe_needs_two_models_and_a_known_baseline(in_tmp, capsys):
    for body, expected in (("models: {a: x}\n", "need at least two models"),
                           ("models: {a: x, b: y}\nbaseline: c\n", "baseline 'c' is not a label")):
        (in_tmp / "cmp.yaml").write_text("stage: compare\n" + body)
        assert cli.main(["run", str(in_tmp / "cmp.yaml")]) == 2
        assert expected in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


def test_closing_report_of_a_run(dirs, tmp_path):
    """What `accelerate launch recipes/dpo.yaml` prints at the end, on three saved models."""
    (tmp_path / "run_info.json").write_text(json.dumps({"summary": {"rewards/margins": 0.5}}))
    top = SimpleNamespace(name="dpo", out_dir=tmp_path, recipe=SimpleNamespace(stage="dpo"))
    options = ReportOptions(models={"base": "pretrain", "sft": "sft", "dpo": "dpo"}, num_prompts=6, max_new_tokens=5)
    text = build_report(options, [top], {"base": dirs["b"], "sft": dirs["a"], "dpo": dirs["a_copy"]})

    assert "Gold score on 6 held-out demo prompts (temperature 1, at most 5 new tokens):" in text
    assert "Greedy replies to the same prompts (at most 5 new tokens):" in text
    assert text.count("Gold score") == 1  # the launch test counts it to find the one report of a run
    assert "KL to sft [95% CI]" in text and "sft - base:" in text and "dpo - sft: +0.000 [0.000, 0.000]" in text
    assert text.count("polite") == 2 and "rewards/margins: 0.5" in text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["models"]["dpo"]["kl_mean"] == 0.0 and report["models"]["base"]["kl_mean"] > 0
    assert report["also"][0]["settings"]["temperature"] == 0.0 and "polite_mean" in report["also"][0]["models"]["sft"]
    assert report["stage_summary"] == {"rewards/margins": 0.5}
    for name in ("report.md", "report.html", "report_samples.jsonl"):
        assert (tmp_path / name).is_file(), name
