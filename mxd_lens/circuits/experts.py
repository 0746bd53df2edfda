"""Inspecting the units of an attached replacement: MxD experts, transcoder or SAE latents.

Unit activations over a corpus are stored sparsely, as each token's K selected units and
their values (`[tokens, K]` indices and values), never as a dense tokens x n_units array.
From that record: top-activating contexts, activation histograms, the activation
density of all units, and the logit effect of a unit: what it wrote to the output on its
top contexts (`Replacement.unit_contribution`: a_n c_n * (D^T z) for an MxD expert, an
input-dependent direction, not W_dec[n]), averaged and read through the unembedding.
`write_dashboard` puts them in one standalone HTML page per unit (plotly figures, every
token label unique and drawn; a dead unit's page says it is dead). SAEDashboard's page
of the same units: `mxd_lens.circuits.saedashboard` (it reads W_dec[n] as the direction).
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

from mxd_lens.functional import TopK
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


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable-character table (GPT-2's, which
    SmolLM2, Llama 3 and most current tokenizers use): printable Latin-1 bytes stand for
    themselves, the other 68 bytes are shifted to 256 + their rank."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + shifted
            shifted += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_DECODER = _byte_decoder()


def token_label(tokenizer, token: int) -> str:
    """A label that no other token shares: the decoded text (repr, so spaces and newlines
    show) and the id. A byte token that decodes to no character on its own (the UTF-8
    replacement character '\ufffd' of a partial multi-byte sequence) shows its bytes."""
    if tokenizer is None:
        return f"<{token}>"
    text = tokenizer.decode([token])
    if "\ufffd" in text and hasattr(tokenizer, "convert_ids_to_tokens"):
        raw = tokenizer.convert_ids_to_tokens(token)
        if isinstance(raw, str) and raw and all(c in _BYTE_DECODER for c in raw):
            return f"{bytes(_BYTE_DECODER[c] for c in raw)!r} #{token}"
        return f"{raw!r} #{token}"
    return f"{text!r} #{token}"


def activation_histogram(acts: UnitActivations, unit: int, bins: int = 40):
    """Plotly histogram of the unit's non-zero activations."""
    import plotly.graph_objects as go

    _, _, vals = acts.unit_entries(unit)
    freq = float(acts.frequency()[unit])
    fig = go.Figure(go.Histogram(x=vals.tolist(), nbinsx=bins))
    fig.update_layout(
        title=f"unit {unit}: active on {freq:.3%} of tokens",
        xaxis_title="activation (where the unit is active)", yaxis_title="tokens", template="plotly_white",
    )  # fmt: skip
    return fig


def density_histogram(acts: UnitActivations, unit: int | None = None, bins: int = 40):
    """Plotly histogram of every unit's activation density (log10 of the fraction of
    tokens it is active on), dead units counted apart; `unit`, if given, marked."""
    import math

    import plotly.graph_objects as go

    freq = acts.frequency()
    alive = freq[freq > 0]
    n_dead = int((freq == 0).sum())
    fig = go.Figure(go.Histogram(x=alive.log10().tolist(), nbinsx=bins, name="live units"))
    title = f"activation density of all {acts.n_units:,} units ({n_dead:,} never active on this corpus)"
    if unit is not None:
        f = float(freq[unit])
        if f > 0:
            fig.add_vline(x=math.log10(f), line_color="red", line_dash="dash",
                          annotation_text=f"unit {unit}: {f:.3%}", annotation_position="top")  # fmt: skip
        else:
            title += f"; unit {unit} is one of the dead"
    fig.update_layout(
        title=title, xaxis_title="log10(fraction of tokens the unit is active on)", yaxis_title="units",
        template="plotly_white", showlegend=False,
    )  # fmt: skip
    return fig


@dataclass
class LogitEffect:
    """A unit's output contribution read through the unembedding, averaged over contexts."""

    unit: int
    """The unit."""
    logits: Float[Tensor, " d_vocab"]
    """Mean direct effect on every vocabulary logit (`direction @ W_U`)."""
    n_contexts: int
    """How many top contexts were averaged."""
    direction: Float[Tensor, " d_out"] | None = None
    """Mean of what the unit wrote to the module's output over those contexts
    (`Replacement.unit_contribution` at each: a_n c_n * (D^T z) for an MxD expert,
    a_n W_dec[n] for a transcoder latent)."""

    def top(self, tokenizer, n: int = 10, largest: bool = True) -> list[tuple[str, float]]:
        """The `n` most promoted (or, with largest=False, suppressed) tokens."""
        vals, idx = self.logits.topk(n, largest=largest)
        return [(decode(tokenizer, [i]), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]

    def top_ids(self, n: int = 10, largest: bool = True) -> list[tuple[int, float]]:
        """Like `top`, with token ids (labels: `token_label`)."""
        vals, idx = self.logits.topk(n, largest=largest)
        return list(zip(idx.tolist(), vals.tolist()))


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
    return LogitEffect(unit, logits, len(contexts), out.float().cpu())


def _bar_figure(labels: list[str], values: list[float], title: str, x_title: str, colors: list[str] | None = None):
    """Horizontal bars, one per label, every label drawn: bars sit at numeric positions
    with the labels as explicit tick text (a categorical axis would merge equal labels
    and plotly thins out dense tick labels)."""
    import plotly.graph_objects as go

    y = list(range(len(labels)))
    fig = go.Figure(go.Bar(x=values, y=y, orientation="h", marker_color=colors, hovertext=labels))
    fig.update_layout(
        title=title, template="plotly_white", showlegend=False, height=max(320, 26 * len(labels) + 140),
        margin=dict(l=220), xaxis_title=x_title,
        yaxis=dict(title="token", tickmode="array", tickvals=y, ticktext=labels, autorange="reversed"),
    )  # fmt: skip
    return fig


def _direction_note(module: Replacement, effect: LogitEffect, model: HookedTransformer, n_logits: int) -> str:
    """How the page's output direction was computed, and how far it is from W_dec[n]."""
    unit = effect.unit
    w = getattr(module, "W_dec", None)
    if module.context_doc is not None:  # the unit's output depends on the input (an MxD's experts)
        how = (
            f"At a token this unit writes a<sub>n</sub>(x) &middot; c<sub>n</sub> &odot; ({html.escape(module.context_doc)}): "
            "an input-dependent direction. The output direction and logit effect below are the mean of what it "
            f"actually wrote on its top {effect.n_contexts} contexts, read through W_U (no final-norm scale). "
            "They are <b>not</b> W_dec[n] = c<sub>n</sub> alone, which is what SAEDashboard / Neuronpedia show."
        )
    else:
        how = (
            f"At a token this unit writes a<sub>n</sub>(x) &middot; W_dec[n], a fixed direction. The logit effect below "
            f"is its mean over the top {effect.n_contexts} contexts, read through W_U (no final-norm scale)."
        )
    if w is None or effect.direction is None or w.shape[-1] != effect.direction.shape[-1]:
        return how
    c = w[unit].detach().float().cpu()
    d = effect.direction
    cos = float(torch.nn.functional.cosine_similarity(c, d, dim=0))
    naive = set((c.to(model.W_U.dtype) @ model.W_U.detach().cpu()).float().topk(n_logits).indices.tolist())
    shared = len(naive & {i for i, _ in effect.top_ids(n_logits)})
    return (
        f"{how} Cosine(mean written direction, W_dec[{unit}]) = {cos:.3f}; the top {n_logits} tokens of "
        f"W_dec[{unit}] &middot; W_U share {shared} of {n_logits} with the top {n_logits} below."
    )


def write_dashboard(
    model: HookedTransformer,
    acts: UnitActivations,
    unit: int,
    path: str | Path,
    n_contexts: int = 12,
    n_logits: int = 10,
) -> Path:
    """One standalone HTML page for a unit: top-activating contexts, its activation
    histogram, the activation density of all units (this one marked) and its logit
    effect (what it wrote on its top contexts, through W_U; the page says how). A unit
    that never fired on the recorded corpus gets a page saying so, with the density figure."""
    from mxd_lens import atomic

    acts._check_unit(unit)
    n_contexts = check_positive_int("n_contexts", n_contexts)
    n_logits = check_positive_int("n_logits", n_logits)
    tok = model.tokenizer
    module = find_site(model, acts.layer).module
    contexts = acts.top_contexts(unit, n_contexts)
    freq = float(acts.frequency()[unit])
    title = (f"{module.architecture} layer {acts.layer}, unit {unit}: active on {freq:.3%} of "
             f"{acts.tokens.numel():,} tokens")  # fmt: skip
    figures = []
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if not contexts:
        parts.append(
            f'<p class="dead"><b>Unit {unit} never fired</b> on the {acts.tokens.numel():,} tokens recorded '
            f"({acts.tokens.shape[0]} rows of {acts.tokens.shape[1]}): it is dead on this corpus, so there are no "
            "top contexts, activation histogram or logit effect to show. Where it sits among all units:</p>"
        )
    else:
        effect = logit_effect(model, acts, unit, n_contexts)
        parts.append(f"<p>{_direction_note(module, effect, model, n_logits)}</p>")
        rows = []
        for c in contexts:
            before, peak, after = c.text(tok, acts.tokens)
            label = token_label(tok, int(acts.tokens[c.row, c.pos]))
            rows.append(
                f"<tr><td>{c.value:.3f}</td><td>{c.row}:{c.pos}</td><td>{html.escape(label)}</td>"
                f"<td class='ctx'>{html.escape(before)}<mark>{html.escape(peak)}</mark>{html.escape(after)}</td></tr>"
            )
        parts.append(
            f"<h2>Top {len(contexts)} activating contexts</h2><table><tr><th>activation</th><th>row:pos</th>"
            f"<th>token</th><th>context (peak token marked)</th></tr>{''.join(rows)}</table>"
        )
        figures.append(activation_histogram(acts, unit))
        items = effect.top_ids(n_logits) + effect.top_ids(n_logits, largest=False)[::-1]
        figures.append(
            _bar_figure(
                [token_label(tok, i) for i, _ in items], [v for _, v in items],
                f"logit effect of unit {unit}: top {n_logits} promoted / suppressed tokens",
                f"mean direct logit change on its top {effect.n_contexts} contexts",
                ["#2a7ab9" if v >= 0 else "#c0392b" for _, v in items],
            )
        )  # fmt: skip
    figures.append(density_histogram(acts, unit))
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0, default_height=fig.layout.height or 420))
    style = (
        "body{font-family:sans-serif;margin:24px;max-width:1300px} table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top} td.ctx{white-space:pre-wrap;"
        "font-family:monospace} mark{background:#ffd54f;font-weight:bold} p.dead{font-size:18px;color:#b03a2e}"
    )
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")  # fmt: skip
    return atomic.write_text(path, page)


def most_active_units(acts: UnitActivations, n: int = 10) -> list[int]:
    """Units ranked by how often they fire (ties: lower index first)."""
    return acts.frequency().argsort(descending=True, stable=True)[:n].tolist()


__all__ = [
    "UnitActivations",
    "Context",
    "LogitEffect",
    "collect_activations",
    "activation_histogram",
    "density_histogram",
    "token_label",
    "unit_contribution",
    "logit_effect",
    "write_dashboard",
    "most_active_units",
]
