"""The frontier report of a sweep: each method's points as a curve of score against KL to the
baseline (95% CIs on both axes, log KL axis), the Pareto front marked, the reward model's score
beside gold's (over-optimisation: where the proxy keeps rising and gold turns down), and a table
of every point; written as report.html (plotly, self-contained), report.md and report.json.

It reads a comparison's summary (`compare.summarize`) and every reply's scores (its
samples.jsonl), for the statistics paired on the same prompts: the math is in the pure functions
`pareto_front`, `front_beyond_ci`, `kl_spreads`, `paired_differences`, `overoptimised` and
`overoptimisation`, the drawing in `frontier_figure`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .formatting import STYLE, ci, color, kl_floor, layout, md_table, table_html
from .paths import write_atomic

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


def _z(level: float, tails: int) -> float:
    """The standard normal quantile that leaves (1 - level) / tails above it."""
    return NormalDist().inv_cdf(1 - (1 - level) / tails)


def paired_differences(per_prompt, level: float = 0.95, simultaneous: bool = True):
    """Every pair of points compared on the same prompts: (mean, lo, hi), arrays of shape (..., k, k)
    whose [i, j] is the mean over prompts of x_j - x_i and its normal interval (the standard error
    of the per-prompt differences, so the prompt-to-prompt variance the points share cancels).

    per_prompt: (..., k, n), each point's score per prompt (the mean of its samples of that
    prompt), the same prompts in the same order; leading axes are independent sets (a simulation's
    sweeps). simultaneous: the intervals of the k(k-1)/2 pairs hold together with probability
    `level` (Bonferroni: each at 1 - (1 - level) / (k(k-1)/2)); else each pair's alone.
    """
    x = np.asarray(per_prompt, dtype=float)
    k, n = x.shape[-2], x.shape[-1]
    if n < 2:
        raise ValueError("paired differences need at least two prompts")
    d = x[..., None, :, :] - x[..., :, None, :]  # [..., i, j, :] = x_j - x_i
    mean = d.mean(-1)
    se = d.std(-1, ddof=1) / np.sqrt(n)
    pairs = max(k * (k - 1) // 2, 1)
    z = _z(1 - (1 - level) / pairs if simultaneous else level, 2)
    return mean, mean - z * se, mean + z * se


def overoptimised(per_prompt_gold, reward_means, level: float = 0.95):
    """(..., k, k) booleans: [i, j] is True when point j, later than i in KL order, has a higher
    proxy reward mean than i while its gold is below i's beyond the simultaneous `level`
    interval of the paired difference (`paired_differences`: every earlier point may be the
    peak, so the choice of the peak is part of the family the interval covers).

    per_prompt_gold: (..., k, n), points sorted by KL; reward_means: (..., k)."""
    _, _, hi = paired_differences(per_prompt_gold, level, simultaneous=True)
    r = np.asarray(reward_means, dtype=float)
    k = hi.shape[-1]
    later = np.triu(np.ones((k, k), dtype=bool), 1)
    return later & (r[..., None, :] > r[..., :, None]) & (hi < 0)


def overoptimisation(rows: list[dict], gold: dict[str, np.ndarray], level: float = 0.95) -> dict | None:
    """Where gold falls while the proxy reward rises, along one method's points.

    rows: dicts with label, kl_mean and reward_mean; gold: label -> per-prompt gold scores (the
    same prompts for every point). Sorted by KL, every later point j whose reward is above an
    earlier point i's while its gold is below i's beyond the simultaneous interval (`overoptimised`)
    is past a peak; it is reported against the earlier point it falls furthest below. Returns
    {"pairs": k(k-1)/2, "past": [{"point", "from", "mean", "lo", "hi"}, ...]} (mean etc.: gold of
    the point minus gold of `from`), or None when no point is past a peak.
    """
    rows = sorted(rows, key=lambda r: r["kl_mean"])
    if len(rows) < 2:
        return None
    x = np.stack([np.asarray(gold[r["label"]], dtype=float) for r in rows])
    mean, lo, hi = paired_differences(x, level, simultaneous=True)
    flags = overoptimised(x, [r["reward_mean"] for r in rows], level)
    past = []
    for j in range(len(rows)):
        found = [i for i in range(j) if flags[i, j]]
        if found:
            i = min(found, key=lambda i: mean[i, j])
            past.append({"point": rows[j], "from": rows[i], "mean": float(mean[i, j]), "lo": float(lo[i, j]),
                         "hi": float(hi[i, j])})
    return {"pairs": len(rows) * (len(rows) - 1) // 2, "past": past} if past else None


def front_beyond_ci(kl_intervals: list[tuple[float, float]], on_front: list[bool], diff_hi) -> list[bool]:
    """Which points of the front (by means) stay on it beyond their 95% intervals: for every
    other point q, either q's KL interval lies wholly above p's (kl_lo[q] > kl_hi[p]) or q's
    score is below p's beyond the paired interval (diff_hi[q][p] < 0, the upper bound of the
    mean of score_q - score_p over the same prompts). Then no other point could have at most
    p's KL and at least its score within the intervals. Each comparison at 95% suffices: the
    claim holds only if every one of them does (an intersection-union test)."""
    n = len(kl_intervals)
    return [
        bool(on_front[p]) and all(
            kl_intervals[q][0] > kl_intervals[p][1] or diff_hi[q][p] < 0 for q in range(n) if q != p
        )
        for p in range(n)
    ]


# --------------------------------------------------------------------------- the points


def frontier_points(summary: dict, methods: dict[str, tuple[str, dict]], scores: dict | None = None) -> list[dict]:
    """One row per model of the comparison: the baseline (method None) and every point, with its
    method, varying settings, scores, KL, whether it is on the front (by the first score kind,
    gold when there is one; by means) and whether it stays there beyond its 95% intervals
    (`front_beyond_ci`; None without per-prompt scores). scores: kind -> label -> per-prompt scores."""
    kind = summary["score_kinds"][0] if summary["score_kinds"] else None
    rows = []
    for label, m in summary["models"].items():
        method, varying = methods.get(label, (None, {}))
        rows.append({"label": label, "method": method, "settings": varying, **m})
    usable = [r for r in rows if kind and r["kl_mean"] is not None]
    flags = pareto_front([(max(r["kl_mean"], 0.0), r[f"{kind}_mean"]) for r in usable])
    paired = scores is not None and kind in scores and all(r["label"] in scores[kind] for r in usable)
    clear = [None] * len(usable)
    if paired and usable:
        _, _, hi = paired_differences(np.stack([scores[kind][r["label"]] for r in usable]), simultaneous=False)
        # hi[p, q]: upper bound of score_q - score_p; front_beyond_ci reads it as diff_hi[q][p]
        clear = front_beyond_ci([(max(r["kl_lo"], 0.0), max(r["kl_hi"], 0.0)) for r in usable], flags, hi.T)
    for row in rows:
        row["on_front"], row["front_beyond_ci"] = False, False if paired else None
    for row, flag, sure in zip(usable, flags, clear):
        row["on_front"], row["front_beyond_ci"] = flag, sure
    return rows


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] is not None:
            found.setdefault(row["method"], []).append(row)
    return {m: sorted(rs, key=lambda r: (r["kl_mean"] is None, r["kl_mean"] or 0.0)) for m, rs in found.items()}


def notes(rows: list[dict], kinds: list[str], scores: dict | None = None) -> list[str]:
    """What the reader should know: methods whose KL does not spread, over-optimisation (paired
    on the same prompts: needs scores, kind -> label -> per-prompt scores), the front."""
    said = []
    for method, points in by_method(rows).items():
        with_kl = [r for r in points if r["kl_mean"] is not None]
        if len(with_kl) >= 2 and not kl_spreads([(r["kl_lo"], r["kl_hi"]) for r in with_kl]):
            said.append(
                f"{method}: its points' KLs do not spread ({min(r['kl_mean'] for r in with_kl):.3g}-"
                f"{max(r['kl_mean'] for r in with_kl):.3g} nats, every 95% interval overlaps the others): its strength "
                "setting did not bind, so this is not a curve; give it more budget (episodes, steps) or wider strengths"
            )
        if "reward" in kinds and "gold" in kinds and len(with_kl) >= 2 and scores and "gold" in scores:
            found = overoptimisation(with_kl, scores["gold"])
            for past in found["past"] if found else []:
                r, f = past["point"], past["from"]
                said.append(
                    f"{method}: gold falls while the reward rises: '{r['label']}' (KL {r['kl_mean']:.3g}) against "
                    f"'{f['label']}' (KL {f['kl_mean']:.3g}): gold {past['mean']:+.3f} [{past['lo']:+.3f}, {past['hi']:+.3f}], "
                    f"reward {r['reward_mean']:.3f} > {f['reward_mean']:.3f} (paired on the same prompts; 95% intervals "
                    f"holding together over the method's {found['pairs']} pairs of points)"
                )
        if "reward" in kinds and "gold" in kinds and len(with_kl) >= 2:
            low, high = with_kl[0], with_kl[-1]  # the least and the most drifted point
            said.append(
                f"{method}: from KL {low['kl_mean']:.3g} to {high['kl_mean']:.3g}, reward {high['reward_mean'] - low['reward_mean']:+.3f}, "
                f"gold {high['gold_mean'] - low['gold_mean']:+.3f}"
            )
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["kl_mean"])
    if front and kinds:
        said.append(f"Pareto front by {kinds[0]} means, by increasing KL: " + " -> ".join(
            f"{r['label']} ({r[f'{kinds[0]}_mean']:.3f} at {r['kl_mean']:.3g})" for r in front))
        if any(r["front_beyond_ci"] is not None for r in front):
            sure = [r["label"] for r in front if r["front_beyond_ci"]]
            said.append(
                f"On the front beyond the 95% intervals (no other point's KL interval reaches below theirs with a paired "
                f"{kinds[0]} difference whose interval reaches 0): " + (", ".join(sure) if sure else "none")
                + "; the others' places on the front are within the noise")
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
        fig.add_trace(trace(points, method, color(i)))
    on_front = sorted((r for r in with_kl if r["on_front"]), key=lambda r: r["kl_mean"])
    if front and on_front:
        fig.add_trace(go.Scatter(
            x=xs(on_front), y=[r[f"{kind}_mean"] for r in on_front], mode="lines", name="Pareto front (by means)",
            line={"color": "#444444", "dash": "dash", "shape": "hv"}, hoverinfo="skip",
        ))
    x_title = f"KL(model || {baseline}) (nats, log scale; KL ≤ 0 drawn at {floor:g})"
    return layout(fig, f"{kind} against KL to {baseline}", x_title, f"mean {kind} (95% CI)", xaxis_type="log")


def table_rows(rows: list[dict], kinds: list[str], parts: list[str]) -> list[list[str]]:
    head = ["point", "method", *kinds, "KL (nats)", *parts, "EOS", "length", "front"]
    body = [head]
    order = [r for r in rows if r["method"] is None] + [r for points in by_method(rows).values() for r in points]
    for r in order:
        body.append([
            r["label"], r["method"] or "baseline", *(ci(r, k) for k in kinds), ci(r, "kl", 3),
            *(f"{r[f'{p}_mean']:.3f}" for p in parts), f"{r['eos_rate']:.2f}", f"{r['length_mean']:.1f}",
            "**" if r["front_beyond_ci"] else "*" if r["on_front"] else "",
        ])
    return body


def per_reply_scores(samples: list[dict]) -> dict[str, dict[str, list[float]]]:
    """kind -> label -> the score of every reply, prompt-major, from a comparison's side-by-side
    rows (compare/samples.jsonl): what the paired statistics read."""
    found: dict[str, dict[str, list[float]]] = {}
    for row in samples:
        for label, reply in row["replies"].items():
            for kind, value in reply.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and kind not in ("num_tokens", "logratio"):
                    found.setdefault(kind, {}).setdefault(label, []).append(float(value))
    return found


def write_frontier(out: Path, summary: dict, methods: dict[str, tuple[str, dict]], heading: str, *, generator: str,
                   extra: dict | None = None, replies: dict | None = None) -> str:
    """report.html, report.md and report.json in `out` from the comparison `summary`; `methods`:
    point label -> (method, its varying settings); `replies`: kind -> label -> per-reply scores
    (`per_reply_scores`), for the paired over-optimisation test and the front beyond its
    intervals (both left out without them); `generator`: report.json's "generator", the mark by
    which the caller (the sweep) knows the directory for its own. Returns the text to print."""
    kinds, parts, baseline = summary["score_kinds"], summary["parts"], summary["baseline"]
    n = summary.get("settings", {}).get("samples_per_prompt", 1)
    scores = None if replies is None else {
        kind: {label: np.asarray(v, dtype=float).reshape(-1, n).mean(axis=1) for label, v in by_label.items()}
        for kind, by_label in replies.items()
    }
    rows = frontier_points(summary, methods, scores)
    said = notes(rows, kinds, scores)
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
             "means with 95% bootstrap CIs over prompts; KL(model || baseline) from each model's own replies; "
             "front: * on the Pareto front by means, ** there beyond the 95% intervals (paired on the same prompts).")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(heading)}</h1>
<p>{html.escape(about)} Every reply side by side: <a href="compare/report.html">compare/report.html</a>.</p>
<div class="grid">{plots}</div>
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in said)}</ul>
{table_html(table)}
</body></html>
"""
    md = f"# {heading}\n\n{about}\n\n" + "".join(f"- {n}\n" for n in said) + "\n" + md_table(table) + "\n"
    data = {"generator": generator, "heading": heading, "baseline": baseline, "score_kinds": kinds, "notes": said,
            "front": [r["label"] for r in rows if r["on_front"]],
            "front_beyond_ci": [r["label"] for r in rows if r["front_beyond_ci"]], "points": rows, "settings": settings, **(extra or {})}
    write_atomic(out / "report.json", json.dumps(data, indent=2))
    write_atomic(out / "report.md", md)
    write_atomic(out / "report.html", page)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)
    return f"{heading} ({out / 'report.html'}):\n{text}\n" + "".join(f"- {n}\n" for n in said)
