"""report.html's score-against-KL plot: a log KL axis on which KL <= 0 still shows."""

from __future__ import annotations

from alignment.report_html import score_vs_kl


def _model(kl, lo, hi, gold=0.5):
    return {"kl_mean": kl, "kl_lo": lo, "kl_hi": hi, "gold_mean": gold, "gold_lo": gold - 0.02, "gold_hi": gold + 0.02}


def test_kl_axis_is_logarithmic_and_the_baseline_is_drawn_at_a_floor():
    summary = {
        "score_kinds": ["gold"], "baseline": "sft",
        "models": {"base": _model(60.6, 55.5, 66.0, 0.13), "sft": _model(0.0, 0.0, 0.0, 0.9),
                   "dpo": _model(0.38, 0.30, 0.46, 0.95), "near": _model(-0.002, -0.01, 0.004, 0.9)},
    }
    (fig,) = score_vs_kl(summary)
    assert fig.layout.xaxis.type == "log"
    assert "log scale" in fig.layout.xaxis.title.text and "KL ≤ 0 drawn at 0.01" in fig.layout.xaxis.title.text
    traces = {t.name: t for t in fig.data}
    assert len(traces) == 4  # one per model
    for trace in traces.values():  # nothing at or below 0 on a log axis, error bars included
        (x,) = trace.x
        assert x > 0 and x - trace.error_x.arrayminus[0] > 0
    assert traces["base"].x == (60.6,) and traces["dpo"].x == (0.38,)  # real values are drawn where they are
    for label in ("sft", "near"):  # the baseline and a negative estimate: at the floor, open marker, said on hover
        assert traces[label].x == (0.01,) and traces[label].marker.symbol == "circle-open"
        assert "drawn at 0.01" in traces[label].hovertemplate
    assert "the baseline itself" in traces["sft"].hovertemplate
    assert "0.38" in traces["dpo"].hovertemplate and "drawn at" not in traces["dpo"].hovertemplate
    assert traces["near"].error_x.array[0] == 0  # its whole interval lies at or below the floor
