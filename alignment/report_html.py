"""report.html: one self-contained file (plotly's JavaScript inlined, no network needed) drawn
from a comparison's summary and samples.

Plots: score distribution per model, gold score part by part, win rates with CIs, score
against KL, reply lengths, score against length; then the summary tables and a browsable
table of the replies side by side (filter box, per-reply scores).
"""

from __future__ import annotations

import html
import json
from collections import defaultdict

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .formatting import (
    KL_EXPLAINED, STYLE, color, difference_lines, kl_floor, layout, table_html, table_rows, title, win_rows,
)


def _err(rows: list[dict], key: str) -> dict:
    """Asymmetric error bars from `{key}_lo` / `{key}_hi` around `{key}_mean`."""
    return {
        "type": "data", "symmetric": False,
        "array": [r[f"{key}_hi"] - r[f"{key}_mean"] for r in rows],
        "arrayminus": [r[f"{key}_mean"] - r[f"{key}_lo"] for r in rows],
    }


def score_distributions(summary: dict, samples: list[dict]) -> list[go.Figure]:
    figs = []
    for kind in summary["score_kinds"]:
        fig = go.Figure()
        grades = sorted({row["replies"][label][kind] for row in samples for label in summary["models"]})
        for i, label in enumerate(summary["models"]):
            values = [row["replies"][label][kind] for row in samples]
            if kind == "gold":  # a few grades (multiples of 0.25): one bar per grade and model
                fig.add_trace(go.Bar(x=[f"{g:g}" for g in grades], y=[values.count(g) for g in grades], name=label,
                                     marker_color=color(i)))
            else:
                fig.add_trace(go.Violin(y=values, name=label, box_visible=True, meanline_visible=True,
                                        line_color=color(i)))
        figs.append(layout(fig, f"{kind} score per reply", kind if kind == "gold" else "model",
                            "replies" if kind == "gold" else kind, barmode="group"))
    return figs


def gold_parts(summary: dict) -> list[go.Figure]:
    if not summary["parts"]:
        return []
    fig = go.Figure()
    for i, (label, m) in enumerate(summary["models"].items()):
        parts = summary["parts"]
        fig.add_trace(go.Bar(x=parts, y=[m[f"{p}_mean"] for p in parts], name=label, marker_color=color(i),
                             error_y={"type": "data", "symmetric": False,
                                      "array": [m[f"{p}_hi"] - m[f"{p}_mean"] for p in parts],
                                      "arrayminus": [m[f"{p}_mean"] - m[f"{p}_lo"] for p in parts]}))
    return [layout(fig, "Gold score by part (mean, 95% CI)", "part", "mean score", barmode="group")]


def win_rates(summary: dict) -> list[go.Figure]:
    wins = summary["win_rates"]
    if not wins:
        return []
    names = [f"{w['a']} vs {w['b']} ({w['score']})" for w in wins]
    fig = go.Figure(go.Bar(
        x=[w["win_rate"] for w in wins], y=names, orientation="h",
        marker_color=[color(summary["score_kinds"].index(w["score"])) for w in wins],
        error_x={"type": "data", "symmetric": False, "array": [w["hi"] - w["win_rate"] for w in wins],
                 "arrayminus": [w["win_rate"] - w["lo"] for w in wins]},
        hovertext=[f"win {w['win']:.0%}, tie {w['tie']:.0%}, loss {w['loss']:.0%}" for w in wins],
    ))
    fig.add_vline(x=0.5, line_dash="dash", line_color="gray")
    return [layout(fig, "Win rate (ties count half), 95% CI", "win rate of a over b", "", xaxis_range=[0, 1])]


def score_vs_kl(summary: dict) -> list[go.Figure]:
    """Mean score against KL to the baseline, on a log KL axis: an over-trained or unaligned model
    (the base model's KL to SFT is ~60 nats) would otherwise squeeze the others into one pixel.
    The baseline itself (KL 0) and any estimate at or below 0 (the estimate is unbiased, so a
    model close to the baseline can come out negative) are drawn at a floor, with an open marker,
    and say so on hover and in the axis title."""
    kinds = summary["score_kinds"]
    rows = {label: m for label, m in summary["models"].items() if m["kl_mean"] is not None}
    if not kinds or not rows:
        return []
    kind = kinds[0]
    floor = kl_floor(list(rows.values()))
    fig = go.Figure()
    for i, (label, m) in enumerate(rows.items()):
        x, lo, hi = (max(m[k], floor) for k in ("kl_mean", "kl_lo", "kl_hi"))
        clipped = m["kl_mean"] <= floor
        where = f"KL {m['kl_mean']:.3g} nats [{m['kl_lo']:.3g}, {m['kl_hi']:.3g}]"
        if label == summary["baseline"]:
            where += " (the baseline itself)"
        if clipped:
            where += f"; drawn at {floor:g} (log axis)"
        fig.add_trace(go.Scatter(
            x=[x], y=[m[f"{kind}_mean"]], mode="markers+text", name=label, text=[label], textposition="top center",
            marker={"size": 12, "color": color(i), "symbol": "circle-open" if clipped else "circle",
                    "line": {"width": 2}},
            error_x={"type": "data", "symmetric": False, "array": [hi - x], "arrayminus": [x - lo]},
            error_y=_err([m], kind),
            hovertemplate=f"{html.escape(label)}: {where}<br>mean {kind} %{{y:.3f}}<extra></extra>",
        ))
    x_title = f"KL(model || {summary['baseline']}) (nats, log scale"
    x_title += f"; KL ≤ 0 drawn at {floor:g})" if any(m["kl_mean"] <= floor for m in rows.values()) else ")"
    return [layout(fig, f"{kind} score against KL to {summary['baseline']}", x_title, f"mean {kind}",
                    xaxis_type="log")]


def lengths(summary: dict, samples: list[dict]) -> list[go.Figure]:
    fig = go.Figure()
    for i, label in enumerate(summary["models"]):
        fig.add_trace(go.Histogram(x=[row["replies"][label]["num_tokens"] for row in samples], name=label,
                                   marker_color=color(i), opacity=0.6, xbins={"size": 1}))
    figs = [layout(fig, "Reply length", "tokens (EOS included)", "replies", barmode="overlay")]
    if summary["score_kinds"]:
        kind = summary["score_kinds"][0]
        fig = go.Figure()
        for i, label in enumerate(summary["models"]):
            by_length = defaultdict(list)
            for row in samples:
                by_length[row["replies"][label]["num_tokens"]].append(row["replies"][label][kind])
            xs = sorted(by_length)
            fig.add_trace(go.Scatter(x=xs, y=[sum(by_length[x]) / len(by_length[x]) for x in xs], name=label,
                                     mode="lines+markers", line_color=color(i),
                                     marker={"size": [min(6 + len(by_length[x]) ** 0.5, 20) for x in xs]},
                                     hovertext=[f"{len(by_length[x])} replies" for x in xs]))
        figs.append(layout(fig, f"{kind} score against reply length (marker size: replies)", "tokens",
                            f"mean {kind}"))
    return figs


def samples_table(summary: dict, samples: list[dict]) -> str:
    labels = list(summary["models"])
    kinds = [*summary["score_kinds"], *summary["parts"]]
    head = "<th>#</th><th>prompt</th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for i, row in enumerate(samples):
        cells = [f"<td>{i + 1}</td>", f"<td class='prompt'>{html.escape(row['prompt'])}</td>"]
        for label in labels:
            reply = row["replies"][label]
            tags = [f"{k} {reply[k]:.2f}" for k in kinds if k in reply]
            tags.append(f"{reply['num_tokens']} tok" + ("" if reply["finished"] else ", no EOS"))
            if "logratio" in reply:
                tags.append(f"log-ratio {reply['logratio']:.2f}")
            cells.append(f"<td><div class='reply'>{html.escape(reply['text']) or '<i>(empty)</i>'}</div>"
                         f"<div class='tags'>{html.escape(' · '.join(tags))}</div></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<input id='filter' placeholder='filter replies and prompts…' oninput='filterRows(this.value)'>"
        f" <span id='shown'>{len(samples)} of {len(samples)} rows</span>"
        f"<table id='samples'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


SCRIPT = """
function filterRows(q) {
  q = q.toLowerCase(); let shown = 0; const rows = document.querySelectorAll('#samples tbody tr');
  rows.forEach(r => { const hit = r.textContent.toLowerCase().includes(q); r.style.display = hit ? '' : 'none'; shown += hit; });
  document.getElementById('shown').textContent = shown + ' of ' + rows.length + ' rows';
}
"""


def render_html(summary: dict, samples: list[dict], heading: str = "Comparison") -> str:
    figs = [*score_distributions(summary, samples), *gold_parts(summary), *win_rates(summary),
            *score_vs_kl(summary), *lengths(summary, samples)]
    plots = "".join(
        f"<div class='plot'>{fig.to_html(full_html=False, include_plotlyjs=False, div_id=f'plot{i}', config={'responsive': True})}</div>"
        for i, fig in enumerate(figs)
    )
    tables = table_html(table_rows(summary))
    diffs = difference_lines(summary)
    if diffs:
        tables += "<p>Paired differences (each model minus the one before it, same prompts):</p><ul>"
        tables += "".join(f"<li>{html.escape(line)}</li>" for line in diffs) + "</ul>"
    if summary["win_rates"]:
        tables += "<h3>Win rates (ties count half)</h3>" + table_html(win_rows(summary))
    for extra in summary.get("also", []):
        tables += f"<h3>{html.escape(title(extra))}</h3>" + table_html(table_rows(extra, brief=True))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in [*summary["notes"], KL_EXPLAINED])
    settings = html.escape(json.dumps(summary["settings"]))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body>
<h1>{html.escape(heading)}</h1>
<p>{html.escape(title(summary))}. Baseline: <b>{html.escape(summary['baseline'])}</b>.</p>
{tables}
<ul>{notes}</ul>
<h2>Plots</h2>
<div class="grid">{plots}</div>
<h2>Replies side by side</h2>
{samples_table(summary, samples)}
<p class="tags">settings: {settings}</p>
</body></html>
"""
