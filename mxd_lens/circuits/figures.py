"""Figures of circuit analysis (plotly) and the atomic writers of their files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jaxtyping import Float
from torch import Tensor

from mxd_lens import atomic

if TYPE_CHECKING:
    from mxd_lens.circuits.curves import FaithfulnessCurve


def curve_figure(curves: Sequence["FaithfulnessCurve"], title: str = "Circuit faithfulness"):
    """Plotly figure overlaying the curves (x: nodes kept clean, log scale)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for c in curves:
        err = "n/a" if c.error_fraction is None else f"{c.error_fraction:.2f}"
        n80 = c.nodes_to_recover(0.8)
        name = f"{c.label} (K={c.k}, {c.n_params / 1e6:.2f}M params; 80% at {n80} nodes; error alone {err})"
        fig.add_trace(go.Scatter(x=[max(n, 0.8) for n in c.n_nodes], y=c.fraction, mode="lines+markers", name=name))
    fig.add_hline(y=0.8, line_dash="dot", annotation_text="80%")
    fig.update_layout(
        title=title,
        xaxis=dict(title="nodes kept at clean values (ranked by attribution)", type="log"),
        yaxis=dict(title="fraction of the layer's metric difference recovered"),
        legend=dict(orientation="h", yanchor="top", y=-0.2),
        template="plotly_white",
    )
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


__all__ = ["curve_figure", "patching_heatmap", "write_html", "write_json"]
