"""Inspecting the units of an attached replacement: MxD experts, transcoder or SAE latents.

Unit activations over a corpus are stored sparsely, as each token's K selected units and
their values (`[tokens, K]` indices and values), never as a dense tokens x n_units array.
From that record: top-activating contexts, activation histograms, and the logit effect
of a unit (its output contribution read through the unembedding, averaged over its top
contexts); `write_dashboard` puts them in one standalone plotly HTML page per unit.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens.functional import TopK, topk_relu
from mxd_lens.architectures.saelens_adapter import sparse_units
from mxd_lens.circuits.patching import find_site
from mxd_lens.validation import check_positive_int, check_token_matrix
from mxd_lens.architectures.base import Replacement



@dataclass
class UnitActivations:
    """Which K units fired at every token of a corpus, and how strongly."""

    tokens: Int[Tensor, "rows ctx"]
    """The corpus rows."""
    indices: Int[Tensor, "rows ctx k"]
    """The K units selected at each token (int32)."""
    values: Float[Tensor, "rows ctx k"]
    """Their activations (0 where TopK kept a non-positive pre-activation)."""
    n_units: int
    """Number of units of the module."""
    layer: int
    """Layer the module was attached at."""

    def unit_entries(self, unit: int) -> tuple[Int[Tensor, " hits"], Int[Tensor, " hits"], Float[Tensor, " hits"]]:
        """(rows, positions, values) of every token where `unit` is active (value > 0)."""
        self._check_unit(unit)
        hit = (self.indices == unit) & (self.values > 0)
        rows, cols, slot = hit.nonzero(as_tuple=True)
        return rows, cols, self.values[rows, cols, slot]

    def frequency(self) -> Float[Tensor, " n_units"]:
        """Fraction of tokens at which each unit is active."""
        active = self.indices[self.values > 0].long()
        return torch.bincount(active, minlength=self.n_units).float() / self.tokens.numel()

    def top_contexts(self, unit: int, n: int = 10) -> list["Context"]:
        """The `n` tokens where `unit` is most active, strongest first."""
        rows, cols, vals = self.unit_entries(unit)
        order = vals.argsort(descending=True)[:n]
        return [Context(int(rows[i]), int(cols[i]), float(vals[i])) for i in order]

    def _check_unit(self, unit: int) -> None:
        if isinstance(unit, bool) or not isinstance(unit, int) or not 0 <= unit < self.n_units:
            raise ValueError(f"unit={unit!r} is out of range: expected an index in [0, {self.n_units})")


def decode(tokenizer, ids: list[int]) -> str:
    """Token ids as text; '<id>' per token when the model has no tokenizer."""
    if tokenizer is None:
        return "".join(f"<{i}>" for i in ids)
    return tokenizer.decode(ids)


@dataclass
class Context:
    """One activating token of a unit."""

    row: int
    """Corpus row."""
    pos: int
    """Position of the peak token in the row."""
    value: float
    """The unit's activation there."""

    def text(self, tokenizer, tokens: Int[Tensor, "rows ctx"], before: int = 12, after: int = 4) -> tuple[str, str, str]:
        """(text before, peak token, text after) around the peak."""
        row = tokens[self.row].tolist()
        lo, hi = max(0, self.pos - before), min(len(row), self.pos + 1 + after)
        return (
            decode(tokenizer, row[lo : self.pos]),
            decode(tokenizer, row[self.pos : self.pos + 1]),
            decode(tokenizer, row[self.pos + 1 : hi]),
        )


@torch.no_grad()
def collect_activations(
    model: HookedTransformer,
    layer: int,
    tokens: Int[Tensor, "rows ctx"],
    batch_rows: int = 16,
    progress: bool = True,
) -> UnitActivations:
    """Record the K active units of every token of `tokens` for the replacement attached at
    `layer` (runs the model only up to that layer; the module keeps its sparse path)."""
    site = find_site(model, layer)
    check_token_matrix(tokens, model.cfg.d_vocab)
    batch_rows = check_positive_int("batch_rows", batch_rows)
    module = site.module
    k = module.cfg.k
    name = site.name(module.pre_hook_name)
    rows, ctx = tokens.shape
    indices = torch.empty(rows, ctx, k, dtype=torch.int32)
    values = torch.empty(rows, ctx, k, dtype=torch.float32)
    current: dict[str, Tensor] = {}

    def grab(pre: Tensor, hook: HookPoint) -> None:
        current["pre"] = pre

    starts = range(0, rows, batch_rows)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"unit activations layer {layer}", unit="batch")
    for start in starts:
        batch = tokens[start : start + batch_rows].to(model.cfg.device)
        model.run_with_hooks(batch, stop_at_layer=layer + 1, fwd_hooks=[(name, grab)])
        units = module.activate(current.pop("pre"))
        # dense activations (an SAE-Lens SAE's): each token's k strongest units
        sparse = units if isinstance(units, TopK) else sparse_units(units, k)
        indices[start : start + len(batch)] = sparse.indices.to(torch.int32).cpu()
        values[start : start + len(batch)] = sparse.values.float().cpu()
    return UnitActivations(tokens.cpu(), indices, values, module.n_units, layer)


def activation_histogram(acts: UnitActivations, unit: int, bins: int = 40):
    """Plotly histogram of the unit's non-zero activations."""
    import plotly.graph_objects as go

    _, _, vals = acts.unit_entries(unit)
    freq = float(acts.frequency()[unit])
    fig = go.Figure(go.Histogram(x=vals.tolist(), nbinsx=bins))
    fig.update_layout(title=f"unit {unit}: active on {freq:.3%} of tokens", xaxis_title="activation", yaxis_title="tokens")
    return fig


@dataclass
class LogitEffect:
    """A unit's output contribution read through the unembedding, averaged over contexts."""

    unit: int
    """The unit."""
    logits: Float[Tensor, " d_vocab"]
    """Mean direct effect on every vocabulary logit."""
    n_contexts: int
    """How many top contexts were averaged."""

    def top(self, tokenizer, n: int = 10, largest: bool = True) -> list[tuple[str, float]]:
        """The `n` most promoted (or, with largest=False, suppressed) tokens."""
        vals, idx = self.logits.topk(n, largest=largest)
        return [(decode(tokenizer, [i]), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]


def unit_contribution(
    module: Replacement, x: Float[Tensor, "tokens d_in"], unit: int, value: Float[Tensor, " tokens"]
) -> Float[Tensor, "tokens d_out"]:
    """What the unit adds to the module's output at these inputs with these activations
    (`Replacement.unit_contribution`: an MxD's a_n * c_n * (D^T z) depends on the input
    through z; a transcoder's or SAE's a_n * W_dec[n] is a fixed direction)."""
    return module.unit_contribution(x, unit, value)


@torch.no_grad()
def logit_effect(model: HookedTransformer, acts: UnitActivations, unit: int, n_contexts: int = 20) -> LogitEffect:
    """The unit's output contribution through the unembedding (W_U, without the final
    norm's per-token scale), averaged over its top `n_contexts` contexts."""
    site = find_site(model, acts.layer)
    contexts = acts.top_contexts(unit, n_contexts)
    if not contexts:
        raise ValueError(f"unit {unit} never fires in the recorded corpus; no contexts to average over")
    module = site.module
    rows = sorted({c.row for c in contexts})
    store: dict[str, Tensor] = {}

    def grab(x: Tensor, hook: HookPoint) -> None:
        store["x"] = x

    model.run_with_hooks(
        acts.tokens[rows].to(model.cfg.device), stop_at_layer=acts.layer + 1, fwd_hooks=[(site.name("hook_in"), grab)]
    )
    where = {r: i for i, r in enumerate(rows)}
    x = torch.stack([store["x"][where[c.row], c.pos] for c in contexts])
    value = torch.tensor([c.value for c in contexts], dtype=x.dtype, device=x.device)
    out = unit_contribution(module, x, unit, value).mean(0)
    logits = (out.to(model.W_U.dtype) @ model.W_U).float().cpu()
    return LogitEffect(unit, logits, len(contexts))


def write_dashboard(
    model: HookedTransformer,
    acts: UnitActivations,
    unit: int,
    path: str | Path,
    n_contexts: int = 12,
    n_logits: int = 10,
) -> Path:
    """One standalone HTML page for a unit: top contexts, histogram, logit effect."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from mxd_lens.circuits.figures import write_html

    tok = model.tokenizer
    contexts = acts.top_contexts(unit, n_contexts)
    effect = logit_effect(model, acts, unit) if contexts else None
    _, _, vals = acts.unit_entries(unit)
    fig = make_subplots(
        rows=2,
        cols=2,
        specs=[[{"type": "table", "colspan": 2}, None], [{"type": "xy"}, {"type": "xy"}]],
        row_heights=[0.55, 0.45],
        subplot_titles=("top-activating contexts", "activation histogram", "logit effect (top / bottom tokens)"),
    )
    cells = [[], [], []]
    for c in contexts:
        before, peak, after = c.text(tok, acts.tokens)
        cells[0].append(f"{c.value:.3f}")
        cells[1].append(f"{c.row}:{c.pos}")
        cells[2].append(f"{html.escape(before)}<b>[{html.escape(peak)}]</b>{html.escape(after)}")
    fig.add_trace(
        go.Table(header=dict(values=["activation", "row:pos", "context"]), cells=dict(values=cells, align="left"),
                 columnwidth=[1, 1, 8]),
        row=1, col=1,
    )  # fmt: skip
    fig.add_trace(go.Histogram(x=vals.tolist(), nbinsx=40, name="activations"), row=2, col=1)
    if effect is not None:
        items = effect.top(tok, n_logits) + effect.top(tok, n_logits, largest=False)[::-1]
        fig.add_trace(go.Bar(x=[v for _, v in items], y=[repr(t) for t, _ in items], orientation="h", name="logits"),
                      row=2, col=2)  # fmt: skip
    freq = float(acts.frequency()[unit])
    arch = find_site(model, acts.layer).module.architecture
    fig.update_layout(
        title=f"{arch} layer {acts.layer}, unit {unit}: active on {freq:.3%} of {acts.tokens.numel():,} tokens",
        height=900, showlegend=False, template="plotly_white",
    )  # fmt: skip
    return write_html(fig, path)


def most_active_units(acts: UnitActivations, n: int = 10) -> list[int]:
    """Units ranked by how often they fire (ties: lower index first)."""
    return acts.frequency().argsort(descending=True, stable=True)[:n].tolist()


__all__ = [
    "UnitActivations",
    "Context",
    "LogitEffect",
    "collect_activations",
    "activation_histogram",
    "unit_contribution",
    "logit_effect",
    "write_dashboard",
    "most_active_units",
]
