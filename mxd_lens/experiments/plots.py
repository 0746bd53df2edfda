"""Plotly figures of frontier results, written as standalone HTML files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from mxd_lens import registry
from mxd_lens.atomic import write_html

_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def frontier_figure(
    results: Mapping[str, Any], curves: Mapping[str, Any] | None = None, summary: Mapping[str, Any] | None = None
):
    """Delta CE (with stderr bars) and NMSE against K, one line per method; with
    `curves` (`LearningCurves.to_dict()`) a second row: held-out NMSE and delta CE
    against training tokens, one line per module. `summary` (`layers.layer_summary`)
    adds the special-position shares and the dCE ratios to the title."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n_rows = 2 if curves else 1
    titles = ["CE increase with the layer replaced (stderr: rows as units)", "NMSE (held-out)"]
    if curves:
        titles += [f"learning curve: delta CE on {curves['eval_tokens']:,} held-out predictions",
                   "learning curve: NMSE"]
    fig = make_subplots(rows=n_rows, cols=2, subplot_titles=titles, vertical_spacing=0.16)
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    for method in methods:
        rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        common = dict(mode="lines+markers", name=registry.label(method), legendgroup=method,
                      line=dict(color=registry.color(method)))
        fig.add_trace(
            go.Scatter(
                x=ks, y=[r["delta_ce"] for r in rows],
                error_y=dict(type="data", array=[r["delta_ce_stderr"] or 0.0 for r in rows], visible=True),
                **common,
            ),
            row=1, col=1,
        )
        fig.add_trace(go.Scatter(x=ks, y=[r["nmse"] for r in rows], showlegend=False, **common), row=1, col=2)
    all_ks = sorted({r["k"] for r in results["rows"]})
    for col in (1, 2):  # a tick at every K trained (plotly's log axis would label 20, 25, 30)
        fig.update_xaxes(title_text="K (active units per token)", type="log", tickmode="array",
                         tickvals=all_ks, ticktext=[str(k) for k in all_ks], row=1, col=col)
    fig.update_yaxes(title_text="delta CE (nats)", row=1, col=1)
    fig.update_yaxes(title_text="NMSE", type="log", row=1, col=2)
    if curves:
        ks = sorted({registry.parse_module_folder_name(n)[1] for n in curves["modules"]})
        for name, points in curves["modules"].items():
            method, k = registry.parse_module_folder_name(name)
            line = dict(color=registry.color(method), dash=_DASHES[ks.index(k) % len(_DASHES)])
            tokens = [p["tokens"] for p in points]
            common = dict(mode="lines+markers", name=f"{registry.label(method)} K={k}", legendgroup=name, line=line)
            fig.add_trace(go.Scatter(x=tokens, y=[p["delta_ce"] for p in points], **common), row=2, col=1)
            fig.add_trace(go.Scatter(x=tokens, y=[p["nmse"] for p in points], showlegend=False, **common),
                          row=2, col=2)
        for col in (1, 2):
            fig.update_xaxes(title_text="training tokens per module", type="log", row=2, col=col)
        fig.update_yaxes(title_text="delta CE (nats)", row=2, col=1)
        fig.update_yaxes(title_text="NMSE", type="log", row=2, col=2)
    title = (
        f"{results.get('model')} layer {results.get('layer')}: parameter-matched, "
        f"{results.get('train_tokens'):,} training tokens per module, {results.get('eval_tokens'):,} held-out predictions"
    )
    excluded = (results.get("config") or {}).get("exclude_special_tokens")
    if summary:
        b = summary["baselines"]
        share = b["excluded_energy_share"].get(str(summary["layer"]))
        title += (
            f"<br><sup>special positions {'excluded' if excluded else 'included'} "
            f"({_pct(share)} of the MLP output energy, {_pct(b['excluded_ablation_share'])} of the zero-ablation "
            f"effect sit there); zero-ablation cost {summary['ablation_cost']:.3f} nats<br>dCE ratios: "
            + "; ".join(f"MxD/{registry.label(r['denominator'])} K={r['k']}: {_num(r['ratio'])} "
                        f"[{_num(r['low'])}, {_num(r['high'])}]" for r in summary["ratios"])
            + "</sup>"
        )
    fig.update_layout(title=title, template="plotly_white", width=1150, height=480 * n_rows + 90,
                      margin=dict(t=130))
    return fig


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_frontier_html(
    results: Mapping[str, Any], path: str | Path, curves: Mapping[str, Any] | None = None,
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """frontier_figure(results, curves, summary) as a standalone HTML file."""
    return write_html(frontier_figure(results, curves, summary), path)


def layers_figure(summaries: Sequence[Mapping[str, Any]], title: str = ""):
    """Against layer: the delta CE ratios MxD / transcoder and MxD / skip transcoder per K
    (95% row-bootstrap intervals; below 1: MxD better), CE recovered per method and K,
    and beside them each layer's zero-ablation cost (special positions kept)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "delta CE ratio (MxD / baseline)", "CE recovered", "zero-ablation cost (nats)"))
    layers = [s["layer"] for s in summaries]
    pairs = sorted({(r["denominator"], r["k"]) for s in summaries for r in s["ratios"]})
    ks = sorted({k for _, k in pairs} | {r["k"] for s in summaries for r in s["rows"]})
    for den, k in pairs:
        pts = [(s["layer"], r) for s in summaries for r in s["ratios"] if r["denominator"] == den and r["k"] == k]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1]["ratio"] for p in pts], mode="lines+markers",
            name=f"MxD / {registry.label(den)} K={k}",
            line=dict(color=registry.color(den), dash=_DASHES[ks.index(k) % len(_DASHES)]),
            error_y=dict(type="data", symmetric=False, visible=True,
                         array=[p[1]["high"] - p[1]["ratio"] for p in pts],
                         arrayminus=[p[1]["ratio"] - p[1]["low"] for p in pts]),
        ), row=1, col=1)
    fig.add_hline(y=1.0, line=dict(color="gray", dash="dot"), row=1, col=1)
    keys = sorted({(r["method"], r["k"]) for s in summaries for r in s["rows"]})
    for method, k in keys:
        pts = [(s["layer"], r) for s in summaries for r in s["rows"] if r["method"] == method and r["k"] == k]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1]["ce_recovered"] for p in pts], mode="lines+markers",
            name=f"{registry.label(method)} K={k}",
            line=dict(color=registry.color(method), dash=_DASHES[ks.index(k) % len(_DASHES)]),
        ), row=1, col=2)
    fig.add_trace(go.Bar(x=layers, y=[s["ablation_cost"] for s in summaries], name="zero-ablation cost",
                         marker_color="gray"), row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text="ratio", type="log", row=1, col=1)
    fig.update_yaxes(title_text="fraction of the ablation gap", row=1, col=2)
    fig.update_yaxes(title_text="CE(zero-ablated) - CE(clean)", type="log", row=1, col=3)
    fig.update_layout(title=title or "per-layer frontier", template="plotly_white", width=1400, height=480)
    return fig


def write_layers_html(summaries: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """layers_figure(summaries) as a standalone HTML file."""
    return write_html(layers_figure(summaries, title), path)


__all__ = ["frontier_figure", "layers_figure", "write_frontier_html", "write_layers_html"]
