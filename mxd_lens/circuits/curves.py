"""Circuit faithfulness curves: how few nodes of a replacement recover a behaviour.

Nodes are ranked by attribution; the top n are set to their clean values in the
corrupted run (the rest stay corrupted) and the fraction of the layer's clean-vs-corrupted
metric difference that comes back is recorded as n grows. The layer's difference is
that of patching the whole MLP output at `layer` to its clean value: with every node
(units, the error term and an MxD's dense branch) clean the replacement outputs exactly
the clean MLP output, so the curve ends at 1. Patching a single layer can only move what
flows through that layer, and `layer_share` says how much of the full clean-vs-corrupted
difference that is.

The error term is a node of its own (one per position): `error_fraction` is what it
carries alone, the part of the behaviour an unfaithful replacement leaves unexplained.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens import atomic
from mxd_lens.circuits.patching import (
    Metric,
    capture,
    check_tokens,
    find_site,
    attribution_patch,
    node_attributions,
    patched_metrics,
)

Ranking = Literal["signed", "abs"]


# --- a task ------------------------------------------------------------------------
@dataclass
class Task:
    """Clean / corrupted prompt pairs of one length and the answer pair of each prompt."""

    clean: Int[Tensor, "batch pos"]
    """Clean prompts (the behaviour happens)."""
    corrupted: Int[Tensor, "batch pos"]
    """Corrupted prompts (the answer flips)."""
    good: Int[Tensor, " batch"]
    """Token the clean prompt should predict next."""
    bad: Int[Tensor, " batch"]
    """Competing token (what the corrupted prompt predicts)."""
    labels: list[str] = field(default_factory=list)
    """One string per position of the first clean prompt, for plots."""

    def metric(self) -> Metric:
        """Mean logit difference logit(good) - logit(bad) at the last position."""
        rows = torch.arange(len(self.good))
        good, bad = self.good, self.bad

        def logit_diff(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
            last = logits[:, -1]
            return (last[rows, good.to(last.device)] - last[rows, bad.to(last.device)]).mean()

        return logit_diff


IOI_NAMES = [
    ("Mary", "John"), ("Alice", "Bob"), ("Sarah", "Tom"), ("Emma", "James"), ("Anna", "David"),
    ("Lisa", "Mark"), ("Kate", "Paul"), ("Susan", "Peter"), ("Laura", "Michael"), ("Jane", "Robert"),
    ("Rachel", "Daniel"), ("Helen", "George"),
]  # fmt: skip
IOI_PLACES = ["store", "park", "school", "office", "beach", "market"]
IOI_OBJECTS = ["a drink", "a book", "a gift", "an apple", "a letter", "a ball"]


def ioi_task(tokenizer: Any, n_prompts: int = 12, prefix_token: int = 0) -> Task:
    """Indirect-object identification: "When A and B went to the P, B gave O to" -> " A".

    The corrupted prompt repeats A instead of B, which flips the answer to " B"; the
    metric is logit(" A") - logit(" B"). Every prompt starts with `prefix_token`
    (SmolLM2's <|endoftext|>) and all prompts have one length.
    """
    if not 1 <= n_prompts <= len(IOI_NAMES):
        raise ValueError(f"n_prompts={n_prompts}; expected 1..{len(IOI_NAMES)}")

    def enc(text: str) -> list[int]:
        return [prefix_token] + tokenizer(text, add_special_tokens=False)["input_ids"]

    clean, corrupted, good, bad = [], [], [], []
    for i, (a, b) in enumerate(IOI_NAMES[:n_prompts]):
        place, obj = IOI_PLACES[i % len(IOI_PLACES)], IOI_OBJECTS[i % len(IOI_OBJECTS)]
        clean.append(enc(f"When {a} and {b} went to the {place}, {b} gave {obj} to"))
        corrupted.append(enc(f"When {a} and {b} went to the {place}, {a} gave {obj} to"))
        ga, gb = enc(f" {a}")[1:], enc(f" {b}")[1:]
        if len(ga) != 1 or len(gb) != 1:
            raise ValueError(f"names {a!r}/{b!r} are not single tokens for this tokenizer")
        good.append(ga[0])
        bad.append(gb[0])
    lengths = {len(t) for t in clean + corrupted}
    if len(lengths) != 1:
        raise ValueError(f"the IOI prompts tokenise to different lengths {sorted(lengths)}; they must match")
    labels = [tokenizer.decode([t]) for t in clean[0]]
    return Task(torch.tensor(clean), torch.tensor(corrupted), torch.tensor(good), torch.tensor(bad), labels)


# --- the curve ------------------------------------------------------------------------
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
    """How many of the top-n nodes are units (the rest are error or dense nodes)."""
    clean_metric: float
    """Metric of the clean run (replacement attached)."""
    corrupted_metric: float
    """Metric of the corrupted run (replacement attached)."""
    full_patch_metric: float
    """Metric of the corrupted run with every node clean (= the clean MLP output)."""
    error_fraction: float | None
    """Fraction recovered by the error nodes alone (None without an error term)."""
    units_fraction: float
    """Fraction recovered by every unit node (and dense node) without the error term."""
    n_candidate_nodes: int
    """Nodes whose clean and corrupted activations differ (the others are no-ops)."""
    top_nodes: list[tuple[str, int, int, float]] = field(default_factory=list)
    """The highest-ranked nodes: (kind, position, unit or -1, attribution)."""
    n_params: int = 0
    """Parameter count of the replacement."""
    k: int = 0
    """Its TopK K."""

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
    corrupted activations are equal are skipped (patching them changes nothing).
    """
    if rank not in ("signed", "abs"):
        raise ValueError(f"rank={rank!r}; expected 'signed' or 'abs'")
    site = find_site(model, layer)
    check_tokens(clean_tokens, corrupted_tokens)
    module = site.module
    clean = capture(model, clean_tokens, site)
    corrupted = capture(model, corrupted_tokens, site)
    attr = node_attributions(model, clean_tokens, corrupted_tokens, metric, layer)
    pos, n_units = clean_tokens.shape[1], module.n_units

    # Flat node list: units (pos * n_units), then error (pos), then dense (pos).
    kinds = ["unit"] + [k for k in ("error", "dense") if getattr(attr, k) is not None]
    scores = [attr.unit.reshape(-1)] + [getattr(attr, k) for k in kinds[1:]]
    differs = [(clean["unit"] != corrupted["unit"]).any(0).reshape(-1).cpu()]
    differs += [(clean[k] != corrupted[k]).any(0).any(-1).cpu() for k in kinds[1:]]
    kind_id = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    score = torch.cat(scores)
    live = torch.cat(differs)

    def masks_for(selected: list[Tensor]) -> dict[str, Tensor]:
        """selected[c]: flat node indices patched in copy c."""
        out = {
            "unit": torch.zeros(len(selected), pos * n_units, dtype=torch.bool),
            **{k: torch.zeros(len(selected), pos, dtype=torch.bool) for k in kinds[1:]},
        }
        offsets = [0] + [pos * n_units + pos * i for i in range(len(kinds))]
        for c, idx in enumerate(selected):
            for i, k in enumerate(kinds):
                sel = idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - offsets[i]
                out[k][c, sel] = True
        out["unit"] = out["unit"].view(len(selected), pos, n_units)
        for k in kinds[1:]:
            out[k] = out[k].unsqueeze(-1)
        return out

    all_live = live.nonzero().squeeze(-1)
    kind_of = kind_id[all_live]
    error_nodes = all_live[kind_of == kinds.index("error")] if "error" in kinds else None
    non_error = all_live[kind_of != kinds.index("error")] if "error" in kinds else all_live
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
    n_units_in_top = [int((kind_id[order[:n]] == 0).sum()) for n in grid]

    with torch.no_grad():
        clean_metric = float(metric(model(clean_tokens.to(model.cfg.device))))
    top = []
    for idx in order[:n_top_nodes].tolist():
        k = kinds[int(kind_id[idx])]
        if k == "unit":
            top.append((k, idx // n_units, idx % n_units, float(score[idx])))
        else:
            p = idx - pos * n_units - pos * (kinds.index(k) - 1)
            top.append((k, p, -1, float(score[idx])))
    return FaithfulnessCurve(
        label=label or module.architecture,
        n_nodes=grid,
        fraction=[frac(float(v)) for v in values],
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
    unit nodes of largest |attribution| (each patched exactly, one cell at a time)."""
    from scipy.stats import spearmanr

    attr = attribution_patch(model, clean_tokens, corrupted_tokens, metric, layer)
    flat = attr.reshape(-1)
    top = flat.abs().argsort(descending=True)[:n_nodes]
    n_units = attr.shape[1]
    nodes = [(int(i) // n_units, int(i) % n_units) for i in top]
    site = find_site(model, layer)
    clean = capture(model, clean_tokens, site)
    corrupted = capture(model, corrupted_tokens, site)
    pos = clean_tokens.shape[1]
    # copy 0: nothing patched (the baseline); copy i: node i alone
    mask = torch.zeros(len(nodes) + 1, pos, n_units, dtype=torch.bool)
    for i, (p, u) in enumerate(nodes):
        mask[i + 1, p, u] = True
    values = patched_metrics(model, site, corrupted, clean, {"unit": mask}, metric)
    activation = (values[1:] - values[0]).tolist()
    rho = float(spearmanr([float(flat[i]) for i in top], activation).statistic)
    return Agreement(rho, nodes, [float(flat[i]) for i in top], activation)


# --- figures ----------------------------------------------------------------------------
def curve_figure(curves: Sequence[FaithfulnessCurve], title: str = "Circuit faithfulness"):
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
    )
    fig.update_layout(title=title, xaxis=dict(title="unit", type="category"), yaxis=dict(autorange="reversed"))
    return fig


def write_html(fig: Any, path: str | Path) -> Path:
    """A standalone plotly HTML file, atomically."""
    return atomic.write_html(fig, path)


def write_json(obj: Any, path: str | Path) -> Path:
    """JSON (tensors' floats included), atomically."""
    return atomic.write_json(path, obj, default=float)


# --- CLI -------------------------------------------------------------------------------
def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxd-lens circuit`: faithfulness curves of saved modules on the IOI task."""
    p = subparsers.add_parser(
        "circuit",
        help="faithfulness curves (and patching heatmaps) of saved modules on the IOI task",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("modules", nargs="*", help="module folders (written by module.save / mxd-lens train)")
    p.add_argument("--run", help="a run folder of `mxd-lens demo`: every subfolder holding a cfg.json is used")
    p.add_argument("--layer", type=int, help="layer the modules replace (default: their cfg.layer)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--n-prompts", type=int, default=12, help="IOI prompt pairs (1..12)")
    p.add_argument("--no-error-term", action="store_true", help="attach without the error term")
    p.add_argument("--out", default="circuit_out", help="output folder for curves.html / curves.json")
    p.set_defaults(func=run)
    return p


def module_folders(paths: Sequence[str], run_dir: str | None) -> list[Path]:
    folders = [Path(p) for p in paths]
    if run_dir is not None:
        root = Path(run_dir)
        if not root.is_dir():
            raise ValueError(f"--run {run_dir!r} is not a folder")
        folders += sorted(d for d in root.iterdir() if (d / "cfg.json").is_file())
    if not folders:
        raise ValueError("no modules given: pass module folders or --run DIR")
    return folders


def run(args: argparse.Namespace) -> int:
    """The `circuit` subcommand: one curve per module, overlaid in one figure."""
    import mxd_lens.sae_site  # noqa: F401  (registers the output-site SAE with `load`)
    from mxd_lens import attach, load
    from mxd_lens.sources import load_model

    folders = module_folders(args.modules, args.run)
    model = load_model(args.model)
    task = ioi_task(model.tokenizer, args.n_prompts)
    curves = []
    for folder in folders:
        module = load(folder, dtype=next(model.parameters()).dtype)
        layer = args.layer if args.layer is not None else module.cfg.layer
        if layer is None:
            raise ValueError(f"{folder}: the module records no layer; pass --layer")
        with attach(model, {layer: module}, use_error_term=not args.no_error_term):
            curves.append(faithfulness_curve(model, task.clean, task.corrupted, task.metric(), layer, label=folder.name))
        c = curves[-1]
        print(
            f"{folder.name}: layer {layer}, 80% at {c.nodes_to_recover(0.8)} nodes "
            f"({c.units_to_recover(0.8)} units); error alone {c.error_fraction}; layer share {c.layer_share:.3f}"
        )
    out = Path(args.out)
    write_html(curve_figure(curves, "IOI circuit faithfulness"), out / "curves.html")
    write_json([c.to_dict() for c in curves], out / "curves.json")
    print(f"wrote {out / 'curves.html'} and {out / 'curves.json'}")
    return 0


__all__ = [
    "Task",
    "ioi_task",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "curve_grid",
    "Agreement",
    "attribution_agreement",
    "curve_figure",
    "patching_heatmap",
    "write_html",
    "write_json",
    "add_subcommand",
    "run",
]
