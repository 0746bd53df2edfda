"""Figures of circuit analysis (plotly) and the atomic writers of their files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jaxtyping import Float
from torch import Tensor

from mxd_lens import atomic

if TYPE_CHECKING:
    from mxd_lens.circuits.curves import FaithfulnessCurve


FRACTION_RANGE = (-0.25, 1.25)
"""The fraction axis of `curve_figure`: a point outside it is drawn on its edge (as an
open marker, its true value in the hover text), so a curve whose layer carries almost
none of the behaviour, and whose fractions divide by almost nothing, cannot stretch the
axis to thousands of percent and flatten every other curve."""


def curve_figure(curves: Sequence["FaithfulnessCurve"], title: str = "Circuit faithfulness"):
    """Plotly figure of the curves: left the fraction of the layer's metric difference
    recovered (clipped to `FRACTION_RANGE`), right the raw patched metric beside the
    clean and corrupted metrics (x: nodes kept clean, log scale)."""
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS
    from plotly.subplots import make_subplots

    lo, hi = FRACTION_RANGE
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.1,
        subplot_titles=("fraction of the layer's difference recovered (clipped)", "raw metric of the patched run"),
    )  # fmt: skip
    for i, c in enumerate(curves):
        color = DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)]
        err = "n/a" if c.error_fraction is None else f"{c.error_fraction:.2f}"
        n80 = c.nodes_to_recover(0.8)
        name = (f"{c.label} (K={c.k}, {c.n_params / 1e6:.2f}M params; 80% at {n80} nodes; error alone {err}; "
                f"layer share {c.layer_share:.2f})")  # fmt: skip
        x = [max(n, 0.8) for n in c.n_nodes]
        shown = [min(max(f, lo), hi) for f in c.fraction]
        clipped = [f != s for f, s in zip(c.fraction, shown)]
        fig.add_trace(
            go.Scatter(
                x=x, y=shown, mode="lines+markers", name=name, legendgroup=c.label, line=dict(color=color),
                marker=dict(symbol=["circle-open" if k else "circle" for k in clipped], size=[9 if k else 6 for k in clipped]),
                customdata=c.fraction, hovertemplate="%{x} nodes: %{customdata:.3f}<extra></extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
        if c.metric:
            fig.add_trace(
                go.Scatter(x=x, y=c.metric, mode="lines+markers", name=f"{c.label} metric", legendgroup=c.label,
                           showlegend=False, line=dict(color=color)),
                row=1, col=2,
            )  # fmt: skip
    if curves:
        c = curves[0]
        for value, what, dash in ((c.clean_metric, "clean", "dash"), (c.corrupted_metric, "corrupted", "dot")):
            fig.add_hline(y=value, line_dash=dash, line_color="grey", annotation_text=what, row=1, col=2)
    fig.add_hline(y=0.8, line_dash="dot", annotation_text="80%", row=1, col=1)
    fig.update_xaxes(title_text="nodes kept at clean values (ranked by attribution)", type="log")
    fig.update_yaxes(title_text="fraction recovered", range=[lo, hi], row=1, col=1)
    fig.update_yaxes(title_text="metric (e.g. logit difference)", row=1, col=2)
    fig.update_layout(title=title, legend=dict(orientation="h", yanchor="top", y=-0.2), template="plotly_white",
                      height=600)  # fmt: skip
    return fig


def patching_heatmap(
    values: Float[Tensor, "pos units"],
    baseline: float,
    position_labels: Sequence[str],
    unit_ids: Sequence[int],
    title: str,
):
    """Plotly heatmap of activation-patching effects (metric - corrupted baseline)."""
    import plotly.graph_objects as go

    z = (values - baseline).tolist()
    rows = [f"{i}: {lab!r}" for i, lab in enumerate(position_labels)]
    fig = go.Figure(
        go.Heatmap(z=z, x=[str(u) for u in unit_ids], y=rows, colorscale="RdBu", zmid=0,
                   colorbar=dict(title="metric change"))
    )  # fmt: skip
    fig.update_layout(title=title, xaxis=dict(title="unit", type="category"), yaxis=dict(autorange="reversed"))
    return fig


def write_html(fig: Any, path: str | Path) -> Path:
    """A standalone plotly HTML file, atomically."""
    return atomic.write_html(fig, path)


def write_json(obj: Any, path: str | Path) -> Path:
    """JSON (tensors' floats included), atomically; NaN and inf are written as null."""
    return atomic.write_json(path, obj, default=float)


__all__ = ["FRACTION_RANGE", "curve_figure", "patching_heatmap", "write_html", "write_json"]
