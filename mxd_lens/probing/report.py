"""Probing several feature sources on several tasks, and the table and figure of it."""

from __future__ import annotations

from typing import Mapping, Sequence

from transformer_lens import HookedTransformer

from mxd_lens.probing.features import FeatureSource, module_source, neuron_source, pooled_features, random_source
from mxd_lens.probing.probes import DEFAULT_KS, TaskResult, probe_task
from mxd_lens.sources.labelled import LabelledTexts

__all__ = ["NEURONS", "RANDOM", "baseline_sources", "probe_sources", "format_table", "probe_figure"]

NEURONS = "mlp_neurons"
"""Method name of the dense MLP's hidden neurons."""
RANDOM = "random"
"""Method name of the random-direction baseline."""


def baseline_sources(model: HookedTransformer, seed: int = 0) -> dict[str, FeatureSource]:
    """The anchors: the MLP's own neurons and as many random directions of its input."""
    return {NEURONS: neuron_source, RANDOM: random_source(model.cfg.d_model, model.cfg.d_mlp, seed)}


def probe_sources(
    model: HookedTransformer,
    layer: int,
    modules: Mapping[str, object],
    tasks: Sequence[LabelledTexts],
    baselines: bool = True,
    top_m: int = 100,
    ks: Sequence[int] = DEFAULT_KS,
    max_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[TaskResult]:
    """Probe every module's units (name -> mxd_lens module or SAE-Lens SAE, all at
    `layer`) and, with `baselines`, the MLP neurons and random directions, on every task.
    Each task's texts go through the model once for all sources."""
    sources: dict[str, FeatureSource] = {name: module_source(m) for name, m in modules.items()}
    if baselines:
        sources.update(baseline_sources(model, seed))
    results: list[TaskResult] = []
    for task in tasks:
        feats = {
            split: pooled_features(model, layer, task.texts[split], sources, max_tokens, batch_size, progress=progress)
            for split in ("train", "test")
        }
        for name in sources:
            results.append(
                probe_task(task.task, name, task.classes, feats["train"][name], task.labels["train"],
                           feats["test"][name], task.labels["test"], top_m, ks, seed)
            )
        del feats
    return results


def format_table(results: Sequence[TaskResult], ks: Sequence[int] = (1, 5)) -> str:
    """Markdown table: task, method, units, the best single unit's test F1 and accuracy (best
    of the top units on the test split, the paper's figure), the test F1 of the single unit
    chosen on the training split, and the k-sparse probes' test F1."""
    head = ["task", "method", "units", "best unit F1 (test-picked)", "acc", "unit F1 (train-picked)"]
    head += [f"F1 k={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.task, r.method, f"{r.n_units:,}", f"{r.best_f1:.3f}", f"{r.best_accuracy:.3f}", f"{r.selected_f1:.3f}"]
        cells += [f"{r.k_sparse[k]['f1']:.3f}" if k in r.k_sparse else "-" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Anchors (MLP neurons, random directions) are not architectures: shades of grey keep
# them apart from the registry's method colours.
_ANCHOR_COLORS = ("#555555", "#999999", "#333333", "#bbbbbb")


def _method_color(method: str, index: int) -> str:
    """The registry's colour for a module's method (folder names like 'mxd_k32' too);
    a grey for anchors and unknown names."""
    from mxd_lens import registry

    name = method
    try:
        name = registry.parse_module_folder_name(method)[0]
    except ValueError:
        pass
    return registry.color(name) or _ANCHOR_COLORS[index % len(_ANCHOR_COLORS)]


def probe_figure(results: Sequence[TaskResult]):
    """Plotly figure: one panel per task, test F1 against k (log axis) per method, and the
    best single unit's F1 as a marker at k = 1."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = list(dict.fromkeys(r.task for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    color = {m: _method_color(m, i) for i, m in enumerate(methods)}
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for col, task in enumerate(tasks, 1):
        for r in (r for r in results if r.task == task):
            ks = sorted(r.k_sparse)
            fig.add_trace(
                go.Scatter(x=ks, y=[r.k_sparse[k]["f1"] for k in ks], mode="lines+markers", name=r.method,
                           legendgroup=r.method, showlegend=col == 1, line=dict(color=color[r.method])),
                row=1, col=col,
            )
            fig.add_trace(
                go.Scatter(x=[1], y=[r.best_f1], mode="markers", name=f"{r.method} best single unit",
                           legendgroup=r.method, showlegend=False,
                           marker=dict(symbol="star", size=11, color=color[r.method]),
                           hovertext=f"{r.method}: best of the top units, F1 {r.best_f1:.3f}"),
                row=1, col=col,
            )
        ticks = sorted({k for r in results if r.task == task for k in r.k_sparse})
        fig.update_xaxes(type="log", title_text="k (units in the probe)", tickmode="array", tickvals=ticks,
                         ticktext=[str(k) for k in ticks], row=1, col=col)
    fig.update_yaxes(title_text="test F1 (mean over one-vs-rest classes)", row=1, col=1)
    fig.update_layout(title="Sparse probing: F1 against k (stars: best single unit)", height=420,
                      width=max(520, 380 * len(tasks)))
    return fig
