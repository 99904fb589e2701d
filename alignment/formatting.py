"""How a comparison's numbers are shown, shared by the comparison report (report.py), its HTML
page (report_html.py) and a sweep's frontier (frontier.py): the summary's tables as rows of
strings (`table_rows`, `win_rows`, `difference_lines`, `title`), those rows as Markdown or HTML
(`md_table`, `table_html`), a mean with its interval (`ci`), and the look every plot shares
(`color`, `layout`, `kl_floor`, `STYLE`).

Plain functions over dicts and strings: no plotly import here (a figure is only styled through
its own `update_layout`), so the report and the frontier import this module without a circle.
"""

from __future__ import annotations

import html

# --------------------------------------------------------------------------- tables


def ci(row: dict, key: str, digits: int = 3) -> str:
    """`row[key_mean] [key_lo, key_hi]` to `digits` places, or '-' when the mean is missing."""
    if row.get(f"{key}_mean") is None:
        return "-"
    return f"{row[f'{key}_mean']:.{digits}f} [{row[f'{key}_lo']:.{digits}f}, {row[f'{key}_hi']:.{digits}f}]"


def table_rows(summary: dict, brief: bool = False) -> list[list[str]]:
    """Header and one row per model: scores with CIs, parts, EOS rate, length, KL and win rate
    against the baseline (`brief`: scores, parts, EOS rate and length only)."""
    base, kinds, parts = summary["baseline"], summary["score_kinds"], summary["parts"]
    primary = kinds[0] if kinds else None
    header = ["model", *(f"{k} [95% CI]" for k in kinds[:1]), *parts, *(f"{k} [95% CI]" for k in kinds[1:]),
              "EOS", "tokens"]
    if not brief:
        header.append(f"KL to {base} [95% CI]")
        if primary:
            header.append(f"{primary} win vs {base} [95% CI]")
    wins = {w["a"]: w for w in summary["win_rates"] if w["b"] == base and w["score"] == primary}
    rows = [header]
    for label, m in summary["models"].items():
        row = [label, *(ci(m, k) for k in kinds[:1]), *(f"{m[f'{p}_mean']:.3f}" for p in parts),
               *(ci(m, k) for k in kinds[1:]), f"{m['eos_rate']:.0%}", f"{m['length_mean']:.1f}"]
        if not brief:
            row.append("baseline" if label == base else ci(m, "kl", 2))
            if primary:
                w = wins.get(label)
                row.append(f"{w['win_rate']:.2f} [{w['lo']:.2f}, {w['hi']:.2f}]" if w else "-")
        rows.append(row)
    return rows


def win_rows(summary: dict) -> list[list[str]]:
    rows = [["a", "b", "score", "a wins", "tie", "b wins", "win rate of a [95% CI]"]]
    return rows + [[w["a"], w["b"], w["score"], f"{w['win']:.0%}", f"{w['tie']:.0%}", f"{w['loss']:.0%}",
                    f"{w['win_rate']:.2f} [{w['lo']:.2f}, {w['hi']:.2f}]"] for w in summary["win_rates"]]


def difference_lines(summary: dict) -> list[str]:
    """Each model minus the one before it, paired on the same prompts."""
    lines = []
    for d in summary["differences"]:
        which = "" if d["score"] == summary["score_kinds"][0] else f" ({d['score']})"
        lines.append(f"{d['a']} - {d['b']}{which}: {d['mean']:+.3f} [{d['lo']:.3f}, {d['hi']:.3f}]")
    return lines


def title(summary: dict) -> str:
    s = summary["settings"]
    what = "Gold score" if "gold" in summary["score_kinds"] else "Scores"
    decoding = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']:g}"
    if s["temperature"] and s["top_p"] < 1:
        decoding += f", top-p {s['top_p']:g}"
    per = f", {s['samples_per_prompt']} samples per prompt" if s["samples_per_prompt"] > 1 else ""
    return f"{what} on {s['num_prompts']} {s['prompt_source']} ({decoding}, at most {s['max_new_tokens']} new tokens{per})"


KL_EXPLAINED = (
    "KL(model || baseline) is estimated from the model's own replies: the mean over replies of the summed "
    "per-token log-ratio log p_model(y_t) - log p_baseline(y_t), EOS included, both under softmax(logits / "
    "temperature); its interval is a bootstrap over prompts."
)


def md_table(rows: list[list[str]]) -> str:
    """Rows (the first one the header) as a Markdown table; a `|` inside a cell is escaped."""
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(out + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]])


def table_html(rows: list[list[str]]) -> str:
    """Rows (the first one the header) as an HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table class='summary'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- plots

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def layout(fig, title: str, x: str, y: str, **more):
    """`fig` (a plotly Figure) with the title, axis titles and the size every plot shares."""
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white", height=380,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, **more)
    return fig


def kl_floor(rows: list[dict]) -> float:
    """Where a KL at or below zero is drawn on the log axis: 0.01 nats, or half the smallest
    positive mean or interval end when one is smaller (so that no real point lies below it)."""
    positive = [m[k] for m in rows for k in ("kl_mean", "kl_lo") if m[k] is not None and m[k] > 0]
    return min([0.01, *(v / 2 for v in positive)])


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.plot { border: 1px solid #eee; min-width: 0; overflow: hidden; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; position: sticky; top: 0; }
.reply { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.tags { color: #666; font-size: 0.85em; } .prompt { font-family: ui-monospace, monospace; }
#filter { width: 320px; padding: 4px; margin: 8px 0; }
"""
