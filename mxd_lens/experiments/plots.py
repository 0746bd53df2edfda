"""Plotly figures of frontier results, written as standalone HTML files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mxd_lens import registry
from mxd_lens.atomic import write_html


def frontier_figure(results: Mapping[str, Any]):
    """Delta CE (with stderr bars) and NMSE against K, one line per method."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("CE increase with the layer replaced", "NMSE (held-out)"))
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
    for col in (1, 2):
        fig.update_xaxes(title_text="K (active units per token)", type="log", row=1, col=col)
    fig.update_yaxes(title_text="delta CE (nats)", row=1, col=1)
    fig.update_yaxes(title_text="NMSE", type="log", row=1, col=2)
    fig.update_layout(
        title=f"{results.get('model')} layer {results.get('layer')}: parameter-matched, "
        f"{results.get('train_tokens'):,} training tokens per module, {results.get('eval_tokens'):,} held-out predictions",
        template="plotly_white",
        width=1100,
        height=450,
    )
    return fig


def write_frontier_html(results: Mapping[str, Any], path: str | Path) -> Path:
    """frontier_figure(results) as a standalone HTML file."""
    return write_html(frontier_figure(results), path)


__all__ = ["frontier_figure", "write_frontier_html"]
