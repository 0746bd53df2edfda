"""Circuit faithfulness curves: how few nodes of a replacement recover a behaviour.

Nodes are ranked by attribution; the top n are set to their clean values in the
corrupted run (the rest stay corrupted) and the fraction of the layer's clean-vs-corrupted
metric difference that comes back is recorded as n grows. The layer's difference is
that of patching the whole MLP output at `layer` to its clean value: with every node
(units, the error term and the architecture's extra nodes, such as an MxD's dense
branch) clean the replacement outputs exactly the clean MLP output, so the curve ends
at 1. Patching a single layer can only move what flows through that layer, and
`layer_share` says how much of the full clean-vs-corrupted difference that is.

The error term is a node of its own (one per position): `error_fraction` is what it
carries alone, the part of the behaviour an unfaithful replacement leaves unexplained.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens.model_io import Prefix, run_prefix
from mxd_lens.circuits.patching import (
    Metric,
    copies_per_pass,
    capture,
    check_tokens,
    find_site,
    node_attributions,
    patched_metrics,
)

Ranking = Literal["signed", "abs"]


@dataclass
class FaithfulnessCurve:
    """Fraction of the layer's metric difference recovered by the top-n nodes."""

    label: str
    """Name of the replacement (legend entry)."""
    n_nodes: list[int]
    """Number of nodes kept at clean values, one per point."""
    fraction: list[float]
    """(metric(top-n clean) - corrupted) / (full patch - corrupted), one per point."""
    n_units_in_top: list[int]
    """How many of the top-n nodes are units (the rest are error or other per-position nodes)."""
    clean_metric: float
    """Metric of the clean run (replacement attached)."""
    corrupted_metric: float
    """Metric of the corrupted run (replacement attached)."""
    full_patch_metric: float
    """Metric of the corrupted run with every node clean (= the clean MLP output)."""
    error_fraction: float | None
    """Fraction recovered by the error nodes alone (None without an error term)."""
    units_fraction: float
    """Fraction recovered by every node but the error term (units and extra nodes)."""
    n_candidate_nodes: int
    """Nodes whose clean and corrupted activations differ (the others are no-ops)."""
    top_nodes: list[tuple[str, int, int, float]] = field(default_factory=list)
    """The highest-ranked nodes: (kind, position, unit or -1, attribution)."""
    n_params: int = 0
    """Parameter count of the replacement."""
    k: int = 0
    """Its TopK K."""
    metric: list[float] = field(default_factory=list)
    """The raw patched metric at every point (what `fraction` divides by the layer's
    difference): drawn beside the fraction, it stays readable when that difference is
    near zero and the fraction is not."""

    @property
    def layer_share(self) -> float:
        """(full patch - corrupted) / (clean - corrupted): how much of the behaviour's
        difference passes through this layer's MLP at all."""
        denom = self.clean_metric - self.corrupted_metric
        return (self.full_patch_metric - self.corrupted_metric) / denom if denom else float("nan")

    def nodes_to_recover(self, fraction: float = 0.8) -> int | None:
        """Smallest measured n whose curve value reaches `fraction` (None if none does)."""
        for n, f in zip(self.n_nodes, self.fraction):
            if f >= fraction:
                return n
        return None

    def units_to_recover(self, fraction: float = 0.8) -> int | None:
        """Like `nodes_to_recover` but counting only unit nodes among the top n."""
        for u, f in zip(self.n_units_in_top, self.fraction):
            if f >= fraction:
                return u
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_share"] = self.layer_share
        d["nodes_to_recover_80"] = self.nodes_to_recover(0.8)
        d["units_to_recover_80"] = self.units_to_recover(0.8)
        return d


def curve_grid(n_max: int, n_points: int = 40) -> list[int]:
    """0, 1, 2, ... densely at first then geometrically up to n_max (always included)."""
    if n_max <= n_points:
        return list(range(n_max + 1))
    dense = list(range(min(16, n_max) + 1))
    rest = n_points - len(dense)
    geo = {round(16 * (n_max / 16) ** (i / max(1, rest))) for i in range(1, rest + 1)}
    return sorted(set(dense) | geo | {n_max})


def faithfulness_curve(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    layer: int,
    label: str | None = None,
    n_points: int = 40,
    rank: Ranking = "signed",
    n_top_nodes: int = 50,
) -> FaithfulnessCurve:
    """Rank the nodes of the replacement attached at `layer` by attribution, patch the top
    n into the corrupted run, and record the fraction of the layer's difference recovered.

    rank='signed' orders nodes by attribution towards the clean metric (largest first:
    the fewest nodes for a given recovery); 'abs' by its magnitude. Nodes whose clean and
    corrupted activations are equal are skipped (patching them changes nothing). The
    clean and corrupted batches are each run up to the layer once; attribution and every
    patched run reuse those captures.
    """
    if rank not in ("signed", "abs"):
        raise ValueError(f"rank={rank!r}; expected 'signed' or 'abs'")
    site = find_site(model, layer)
    check_tokens(clean_tokens, corrupted_tokens, model.cfg.d_vocab)
    module = site.module
    clean = capture(model, clean_tokens, site)
    corrupted = capture(model, corrupted_tokens, site)
    attr = node_attributions(model, clean_tokens, corrupted_tokens, metric, layer, clean=clean, corrupted=corrupted)
    pos, n_units = clean_tokens.shape[1], module.n_units

    # Flat node list, kind after kind in the module's order: units (pos * n_units), then
    # one node per position for every other kind (error, the architecture's extra nodes).
    kinds = list(attr.nodes)
    sizes = [pos * n_units if k == "unit" else pos for k in kinds]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    score = torch.cat([attr.nodes[k].reshape(-1) for k in kinds])
    kind_id = torch.cat([torch.full((size,), i) for i, size in enumerate(sizes)])
    live = torch.cat(
        [
            (clean[k] != corrupted[k]).any(0).reshape(-1).cpu()
            if k == "unit"
            else (clean[k] != corrupted[k]).any(0).any(-1).cpu()
            for k in kinds
        ]
    )

    def masks_for(selected: list[Tensor]) -> dict[str, Tensor]:
        """selected[c]: flat node indices patched in copy c."""
        out = {k: torch.zeros(len(selected), size, dtype=torch.bool) for k, size in zip(kinds, sizes)}
        for c, idx in enumerate(selected):
            for i, k in enumerate(kinds):
                out[k][c, idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - offsets[i]] = True
        return {k: m.view(len(selected), pos, n_units if k == "unit" else 1) for k, m in out.items()}

    all_live = live.nonzero().squeeze(-1)
    kind_of = kind_id[all_live]
    has_error = "error" in kinds
    error_nodes = all_live[kind_of == kinds.index("error")] if has_error else None
    non_error = all_live[kind_of != kinds.index("error")] if has_error else all_live
    extra = [all_live, non_error] + ([error_nodes] if error_nodes is not None else [])
    ref = patched_metrics(model, site, corrupted, clean, masks_for(extra), metric)
    full = float(ref[0])
    corr = attr.corrupted_metric
    denom = full - corr

    def frac(v: float) -> float:
        return (v - corr) / denom if denom else float("nan")

    oriented = score * (1.0 if denom >= 0 else -1.0)
    key = oriented if rank == "signed" else score.abs()
    order = all_live[torch.argsort(key[all_live], descending=True, stable=True)]
    grid = curve_grid(len(order), n_points)
    values = patched_metrics(model, site, corrupted, clean, masks_for([order[:n] for n in grid]), metric)
    unit_id = kinds.index("unit")
    n_units_in_top = [int((kind_id[order[:n]] == unit_id).sum()) for n in grid]

    with torch.no_grad():
        clean_metric = float(metric(clean.prefix.resume(model)))
    top = []
    for idx in order[:n_top_nodes].tolist():
        i = int(kind_id[idx])
        local = idx - offsets[i]
        if kinds[i] == "unit":
            top.append((kinds[i], local // n_units, local % n_units, float(score[idx])))
        else:
            top.append((kinds[i], local, -1, float(score[idx])))
    return FaithfulnessCurve(
        label=label or module.architecture,
        n_nodes=grid,
        fraction=[frac(float(v)) for v in values],
        metric=[float(v) for v in values],
        n_units_in_top=n_units_in_top,
        clean_metric=clean_metric,
        corrupted_metric=corr,
        full_patch_metric=full,
        error_fraction=frac(float(ref[2])) if error_nodes is not None else None,
        units_fraction=frac(float(ref[1])),
        n_candidate_nodes=len(order),
        top_nodes=top,
        n_params=module.n_params(),
        k=module.cfg.k,
    )


@dataclass
class LayerShares:
    """How much of a behaviour's clean-vs-corrupted metric difference each layer's MLP
    carries: the corrupted run with `blocks.L.hook_mlp_out` set to its clean value, one
    layer at a time. This is the denominator of a faithfulness curve at L (patching every
    node of a replacement at L is patching that MLP output), so a layer with a share near
    zero gives curves that divide by almost nothing."""

    clean_metric: float
    """Metric of the clean run."""
    corrupted_metric: float
    """Metric of the corrupted run."""
    patched_metric: list[float]
    """Metric of the corrupted run with layer L's MLP output clean, one per layer."""

    @property
    def total(self) -> float:
        """clean - corrupted: the whole behaviour."""
        return self.clean_metric - self.corrupted_metric

    @property
    def share(self) -> list[float]:
        """(patched_L - corrupted) / (clean - corrupted), one per layer (NaN when the
        clean and corrupted metrics are equal: there is no behaviour to share)."""
        total = self.total
        return [(m - self.corrupted_metric) / total if total else float("nan") for m in self.patched_metric]

    def larger_than(self, threshold: float) -> list[int]:
        """Layers whose share is at least `threshold`, largest share first."""
        ranked = sorted(range(len(self.share)), key=lambda i: -self.share[i])
        return [i for i in ranked if self.share[i] >= threshold]

    def describe(self, layers: list[int] | None = None) -> str:
        """'L3 0.91, L0 0.42, ...' for the given layers (default: all, largest first)."""
        layers = self.larger_than(float("-inf")) if layers is None else layers
        return ", ".join(f"L{i} {self.share[i]:.2f}" for i in layers)


@torch.no_grad()
def layer_shares(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
) -> LayerShares:
    """Each layer's share of the behaviour (`LayerShares`), measured on `model` as it is
    (run it before attaching anything to measure the original model).

    One clean run records every MLP output and one corrupted run the residual stream
    entering every block. A patched run for layer L resumes there (the blocks before L
    see only corrupted tokens either way); a few consecutive layers share a forward pass,
    one copy of the corrupted batch each, resumed from the first of them."""
    check_tokens(clean_tokens, corrupted_tokens, model.cfg.d_vocab)
    n_layers, batch = model.cfg.n_layers, len(clean_tokens)
    mlp_out = [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    resid_pre = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    clean_logits, clean_cache = model.run_with_cache(clean_tokens.to(model.cfg.device), names_filter=mlp_out)
    corrupted_logits, corrupted_cache = model.run_with_cache(
        corrupted_tokens.to(model.cfg.device), names_filter=resid_pre
    )
    base = run_prefix(model, corrupted_tokens, 0)  # the positional and mask tensors a resumed run needs
    # Resuming a group at its first layer costs (group size) x (blocks after it): small
    # groups do less work, large ones fewer passes.
    group = max(1, min(copies_per_pass(batch, clean_tokens.shape[1], model.cfg.d_vocab), n_layers // 6))
    patched: list[float] = []
    for start in range(0, n_layers, group):
        layers = list(range(start, min(n_layers, start + group)))

        def patch(act: Tensor, hook: HookPoint, copy: int, layer: int) -> Tensor:
            act = act.clone()
            act[copy * batch : (copy + 1) * batch] = clean_cache[mlp_out[layer]]
            return act

        prefix = Prefix(corrupted_cache[resid_pre[start]], start, base.shortformer_pos_embed, base.attention_mask)
        hooks = [(mlp_out[L], partial(patch, copy=c, layer=L)) for c, L in enumerate(layers)]
        with model.hooks(fwd_hooks=hooks):
            logits = prefix.repeat(len(layers)).resume(model)
        patched += [float(metric(logits[c * batch : (c + 1) * batch])) for c in range(len(layers))]
    return LayerShares(float(metric(clean_logits)), float(metric(corrupted_logits)), patched)


@dataclass
class Agreement:
    """Attribution patching vs activation patching on the top nodes."""

    spearman: float
    """Spearman rank correlation of the two estimates over the nodes."""
    nodes: list[tuple[int, int]]
    """(position, unit) of each node."""
    attribution: list[float]
    """Attribution score of each node."""
    activation: list[float]
    """Activation-patching effect (patched metric - corrupted metric) of each node."""


def attribution_agreement(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    layer: int,
    n_nodes: int = 50,
) -> Agreement:
    """Spearman correlation between attribution and activation patching over the `n_nodes`
    unit nodes of largest |attribution| (each patched exactly, one cell at a time); the
    clean and corrupted batches are captured once for both."""
    from scipy.stats import spearmanr

    site = find_site(model, layer)
    check_tokens(clean_tokens, corrupted_tokens, model.cfg.d_vocab)
    clean = capture(model, clean_tokens, site)
    corrupted = capture(model, corrupted_tokens, site)
    attr = node_attributions(model, clean_tokens, corrupted_tokens, metric, layer, clean=clean, corrupted=corrupted).unit
    flat = attr.reshape(-1)
    top = flat.abs().argsort(descending=True)[:n_nodes]
    n_units = attr.shape[1]
    nodes = [(int(i) // n_units, int(i) % n_units) for i in top]
    pos = clean_tokens.shape[1]
    # copy 0: nothing patched (the baseline); copy i: node i alone
    mask = torch.zeros(len(nodes) + 1, pos, n_units, dtype=torch.bool)
    for i, (p, u) in enumerate(nodes):
        mask[i + 1, p, u] = True
    values = patched_metrics(model, site, corrupted, clean, {"unit": mask}, metric)
    activation = (values[1:] - values[0]).tolist()
    rho = float(spearmanr([float(flat[i]) for i in top], activation).statistic)
    return Agreement(rho, nodes, [float(flat[i]) for i in top], activation)


# Names that lived here before tasks, figures and the command line got their own files.
_MOVED = {
    "Task": "tasks", "ioi_task": "tasks", "IOI_NAMES": "tasks", "IOI_PLACES": "tasks", "IOI_OBJECTS": "tasks",
    "curve_figure": "figures", "patching_heatmap": "figures", "write_html": "figures", "write_json": "figures",
    "add_subcommand": "command", "run": "command", "module_folders": "command",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"mxd_lens.circuits.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'mxd_lens.circuits.curves' has no attribute {name!r}")


__all__ = [
    "FaithfulnessCurve",
    "faithfulness_curve",
    "curve_grid",
    "Agreement",
    "attribution_agreement",
    "LayerShares",
    "layer_shares",
    "Ranking",
]
