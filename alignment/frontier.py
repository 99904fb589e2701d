"""The frontier report of a sweep: each method's points as a curve of score against KL to the
baseline (95% CIs on both axes, log KL axis), the Pareto front marked, the reward model's score
beside gold's (over-optimisation: where the proxy keeps rising and gold turns down), and a table
of every point; written as report.html (plotly, self-contained), report.md and report.json.

It only reads a comparison's summary (`compare.summarize`): the math is in the pure functions
`pareto_front`, `kl_spreads` and `overoptimisation`, the drawing in `frontier_figure`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .paths import write_atomic
from .report import _ci, _md_table
from .report_html import STYLE, _color, _layout, _table_html, kl_floor
from .sweep import MARKER

# --------------------------------------------------------------------------- math


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For points (kl, score): whether each is on the Pareto front, i.e. no other point has a KL
    at most its KL and a score at least its score, one of the two strictly (less drift for at
    least as much score). Equal points are both on the front."""
    return [
        not any(k2 <= k1 and s2 >= s1 and (k2 < k1 or s2 > s1) for k2, s2 in points)
        for k1, s1 in points
    ]


def kl_spreads(intervals: list[tuple[float, float]]) -> bool:
    """Whether a method's points drift apart: at least two of their KL intervals (lo, hi) are
    disjoint. When none are, its strength setting did not bind (e.g. PPO limited by its budget,
    not its KL coefficient) and its 'curve' is one place drawn several times."""
    return max(lo for lo, _ in intervals) > min(hi for _, hi in intervals)


def overoptimisation(rows: list[dict]) -> dict | None:
    """Where gold turns down while the proxy reward keeps rising, along one method's points.

    rows: dicts with kl_mean, gold_mean, gold_hi, reward_mean. Sorted by KL, the point of
    highest gold is the peak; a later (more drifted) point whose reward is above the peak's
    while its gold's upper 95% bound is below the peak's gold is over-optimised. Returns
    {"peak": row, "past": [rows...]} for the past-peak points found, or None.
    """
    rows = sorted(rows, key=lambda r: r["kl_mean"])
    if len(rows) < 2:
        return None
    peak = max(rows, key=lambda r: r["gold_mean"])
    past = [r for r in rows[rows.index(peak) + 1:] if r["reward_mean"] > peak["reward_mean"] and r["gold_hi"] < peak["gold_mean"]]
    return {"peak": peak, "past": past} if past else None


# --------------------------------------------------------------------------- the points


def frontier_points(summary: dict, methods: dict[str, tuple[str, dict]]) -> list[dict]:
    """One row per model of the comparison: the baseline (method None) and every point, with its
    method, varying settings, scores, KL and whether it is on the front (by the first score
    kind, gold when there is one)."""
    kind = summary["score_kinds"][0] if summary["score_kinds"] else None
    rows = []
    for label, m in summary["models"].items():
        method, varying = methods.get(label, (None, {}))
        rows.append({"label": label, "method": method, "settings": varying, **m})
    usable = [r for r in rows if kind and r["kl_mean"] is not None]
    flags = pareto_front([(max(r["kl_mean"], 0.0), r[f"{kind}_mean"]) for r in usable])
    for row in rows:
        row["on_front"] = False
    for row, flag in zip(usable, flags):
        row["on_front"] = flag
    return rows


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] is not None:
            found.setdefault(row["method"], []).append(row)
    return {m: sorted(rs, key=lambda r: (r["kl_mean"] is None, r["kl_mean"] or 0.0)) for m, rs in found.items()}


def notes(rows: list[dict], kinds: list[str]) -> list[str]:
    """What the reader should know: methods whose KL does not spread, over-optimisation, the front."""
    said = []
    for method, points in by_method(rows).items():
        with_kl = [r for r in points if r["kl_mean"] is not None]
        if len(with_kl) >= 2 and not kl_spreads([(r["kl_lo"], r["kl_hi"]) for r in with_kl]):
            said.append(
                f"{method}: its points' KLs do not spread ({min(r['kl_mean'] for r in with_kl):.3g}-"
                f"{max(r['kl_mean'] for r in with_kl):.3g} nats, every 95% interval overlaps the others): its strength "
                "setting did not bind, so this is not a curve; give it more budget (episodes, steps) or wider strengths"
            )
        if "reward" in kinds and "gold" in kinds and len(with_kl) >= 2:
            found = overoptimisation(with_kl)
            if found:
                peak, past = found["peak"], found["past"]
                said.append(
                    f"{method}: over-optimised past KL {peak['kl_mean']:.3g} (gold {peak['gold_mean']:.3f} at "
                    f"'{peak['label']}'): " + "; ".join(
                        f"'{r['label']}' reward {r['reward_mean']:.3f} > {peak['reward_mean']:.3f} but gold {r['gold_mean']:.3f}"
                        for r in past)
                )
        if "reward" in kinds and "gold" in kinds and len(with_kl) >= 2:
            low, high = with_kl[0], with_kl[-1]  # the least and the most drifted point
            said.append(
                f"{method}: from KL {low['kl_mean']:.3g} to {high['kl_mean']:.3g}, reward {high['reward_mean'] - low['reward_mean']:+.3f}, "
                f"gold {high['gold_mean'] - low['gold_mean']:+.3f}"
            )
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["kl_mean"])
    if front and kinds:
        said.append(f"Pareto front by {kinds[0]}, by increasing KL: " + " -> ".join(
            f"{r['label']} ({r[f'{kinds[0]}_mean']:.3f} at {r['kl_mean']:.3g})" for r in front))
    return said


# --------------------------------------------------------------------------- drawing


def frontier_figure(rows: list[dict], kind: str, baseline: str, front: bool = True) -> go.Figure:
    """`kind`'s mean against KL(model || baseline), one line per method through its points in KL
    order, 95% CIs on both axes, the baseline as a point of its own, the Pareto front (by the
    rows' `on_front`, drawn when `front`) as a dashed line through its points. Log KL axis; KL <= 0 (the baseline,
    or an estimate that came out negative) is drawn at a floor with an open marker."""
    with_kl = [r for r in rows if r["kl_mean"] is not None]
    floor = kl_floor(with_kl)

    def xs(points):
        return [max(r["kl_mean"], floor) for r in points]

    def trace(points, name, color, mode="lines+markers", **more):
        x = xs(points)
        return go.Scatter(
            x=x, y=[r[f"{kind}_mean"] for r in points], mode=mode, name=name, line={"color": color},
            marker={"size": 10, "color": color, "symbol": ["circle-open" if r["kl_mean"] <= floor else "circle" for r in points]},
            error_x={"type": "data", "symmetric": False, "array": [max(r["kl_hi"], floor) - v for r, v in zip(points, x)],
                     "arrayminus": [v - max(r["kl_lo"], floor) for r, v in zip(points, x)]},
            error_y={"type": "data", "symmetric": False, "array": [r[f"{kind}_hi"] - r[f"{kind}_mean"] for r in points],
                     "arrayminus": [r[f"{kind}_mean"] - r[f"{kind}_lo"] for r in points]},
            text=[r["label"] for r in points],
            hovertemplate="%{text}<br>KL %{customdata[0]:.3g} nats [%{customdata[1]:.3g}, %{customdata[2]:.3g}]"
            f"<br>{kind} %{{y:.3f}}<extra></extra>",
            customdata=[[r["kl_mean"], r["kl_lo"], r["kl_hi"]] for r in points], **more,
        )

    fig = go.Figure()
    base = [r for r in with_kl if r["label"] == baseline]
    if base:
        fig.add_trace(trace(base, f"{baseline} (baseline)", "#000000", mode="markers"))
    for i, (method, points) in enumerate(by_method(with_kl).items()):
        fig.add_trace(trace(points, method, _color(i)))
    on_front = sorted((r for r in with_kl if r["on_front"]), key=lambda r: r["kl_mean"])
    if front and on_front:
        fig.add_trace(go.Scatter(
            x=xs(on_front), y=[r[f"{kind}_mean"] for r in on_front], mode="lines", name="Pareto front",
            line={"color": "#444444", "dash": "dash", "shape": "hv"}, hoverinfo="skip",
        ))
    x_title = f"KL(model || {baseline}) (nats, log scale; KL ≤ 0 drawn at {floor:g})"
    return _layout(fig, f"{kind} against KL to {baseline}", x_title, f"mean {kind} (95% CI)", xaxis_type="log")


def table_rows(rows: list[dict], kinds: list[str], parts: list[str]) -> list[list[str]]:
    head = ["point", "method", *kinds, "KL (nats)", *parts, "EOS", "length", "front"]
    body = [head]
    order = [r for r in rows if r["method"] is None] + [r for points in by_method(rows).values() for r in points]
    for r in order:
        body.append([
            r["label"], r["method"] or "baseline", *(_ci(r, k) for k in kinds), _ci(r, "kl", 3),
            *(f"{r[f'{p}_mean']:.3f}" for p in parts), f"{r['eos_rate']:.2f}", f"{r['length_mean']:.1f}",
            "*" if r["on_front"] else "",
        ])
    return body


def write_frontier(out: Path, summary: dict, methods: dict[str, tuple[str, dict]], heading: str,
                   extra: dict | None = None) -> str:
    """report.html, report.md and report.json in `out` from the comparison `summary`; `methods`:
    point label -> (method, its varying settings). Returns the text to print."""
    kinds, parts, baseline = summary["score_kinds"], summary["parts"], summary["baseline"]
    rows = frontier_points(summary, methods)
    said = notes(rows, kinds)
    table = table_rows(rows, kinds, parts)
    figs = [frontier_figure(rows, kind, baseline, front=kind == kinds[0]) for kind in kinds]
    plots = "".join(
        f"<div class='plot'>{fig.to_html(full_html=False, include_plotlyjs=False, div_id=f'plot{i}', config={'responsive': True})}</div>"
        for i, fig in enumerate(figs)
    )
    settings = summary.get("settings", {})
    temperature = settings.get("temperature", 0)
    sampled = f"sampled at temperature {temperature:g}" if temperature else "greedy"
    about = (f"{len(rows) - 1} points and the baseline '{baseline}' answered the same {settings.get('num_prompts', '?')} prompts "
             f"({settings.get('samples_per_prompt', 1)} replies each, {sampled}); "
             "means with 95% bootstrap CIs over prompts; KL(model || baseline) from each model's own replies.")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(heading)}</h1>
<p>{html.escape(about)} Every reply side by side: <a href="compare/report.html">compare/report.html</a>.</p>
<div class="grid">{plots}</div>
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in said)}</ul>
{_table_html(table)}
</body></html>
"""
    md = f"# {heading}\n\n{about}\n\n" + "".join(f"- {n}\n" for n in said) + "\n" + _md_table(table) + "\n"
    data = {"generator": MARKER, "heading": heading, "baseline": baseline, "score_kinds": kinds, "notes": said,
            "front": [r["label"] for r in rows if r["on_front"]], "points": rows, "settings": settings, **(extra or {})}
    write_atomic(out / "report.json", json.dumps(data, indent=2))
    write_atomic(out / "report.md", md)
    write_atomic(out / "report.html", page)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)
    return f"{heading} ({out / 'report.html'}):\n{text}\n" + "".join(f"- {n}\n" for n in said)
