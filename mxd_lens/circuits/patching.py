"""Activation and attribution patching of sparse units: MxD experts, transcoder and SAE latents.

The units are those of whichever mxd_lens replacement is attached at `layer`; their
activations sit at `blocks.{layer}.mlp.{module.acts_hook_name}` (after TopK), so
patching one unit changes exactly that unit's coefficient. TransformerLens's own
patching helpers build hook names with `get_act_name` and cannot address these hooks.

Clean and corrupted runs are captured once (`capture`: the prefix before `layer`, from
`mxd_lens.model_io.run_prefix`, and every node's activations); every patched run resumes
at `layer` from the corrupted prefix (`Prefix.resume`, which keeps the attention mask and
shortformer positions a full forward pass would use), and several patched copies of the
corrupted batch share one forward pass (`Prefix.repeat`). The functions that need
captures take them as optional arguments, so a caller that has them does not capture twice.

Besides the units, a replacement has more kinds of node, each one per position: its
error term (`hook_error`, present when attached with `use_error_term=True`) and the
architecture's own `extra_nodes` (an MxD's dense branch z, `hook_hidden`, which every
expert multiplies). With every node at its clean value the replacement's output is the
clean MLP output, so the node set accounts for the whole layer.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens.architectures.base import Replacement
from mxd_lens.model_io import Prefix, run_prefix
from mxd_lens.validation import check_layer, check_token_matrix

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]
"""Maps the logits of one batch of prompts to a scalar (e.g. a mean logit difference)."""

NODE_KINDS: tuple[str, ...] = ("unit", "error")
"""The node kinds every replacement can have: a unit's activation at one position, and
the error term at one position (with `use_error_term`). An architecture adds its own
per-position kinds in `Replacement.extra_nodes` (an MxD's dense hidden vector, 'dense');
`Site.node_hooks()` lists the kinds a given attached module has."""

_LOGIT_BUDGET = 2**26
"""Logit elements (x 4 bytes) one batched patching pass may hold: ~256 MB in fp32."""


# --- finding and checking what to patch ------------------------------------------------
@dataclass(frozen=True)
class Site:
    """The replacement attached at one layer and the full names of its hooks."""

    layer: int
    """Transformer block whose MLP is replaced."""
    module: Replacement
    """The attached replacement."""

    def name(self, hook: str) -> str:
        """Full hook name of one of the module's hook points, e.g. 'hook_error'."""
        return f"blocks.{self.layer}.mlp.{hook}"

    @property
    def acts_name(self) -> str:
        """Full name of the unit-activation hook (after TopK)."""
        return self.name(self.module.acts_hook_name)

    @property
    def resid_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"

    @property
    def has_error(self) -> bool:
        """True when the module was attached with `use_error_term=True`."""
        return self.module.splice is not None and self.module.splice.use_error_term

    def node_hooks(self) -> dict[str, str]:
        """Node kind -> full hook name, for the kinds this module has (units, the error
        term when attached with it, and the architecture's `extra_nodes`)."""
        return {kind: self.name(hook) for kind, hook in self.module.node_hooks(self.has_error).items()}


def find_site(model: HookedTransformer, layer: int) -> Site:
    """The replacement attached at `layer`, or a ValueError saying what is there instead."""
    if not isinstance(model, HookedTransformer):
        raise ValueError(f"expected a transformer_lens.HookedTransformer, got {type(model).__name__}")
    check_layer(layer, model.cfg.n_layers)
    module = getattr(model.blocks[layer], "mlp", None)
    if not isinstance(module, Replacement):
        raise ValueError(
            f"no mxd_lens replacement is attached at layer {layer} (its MLP is a "
            f"{type(module).__name__}); patch inside `with mxd_lens.attach(model, {{{layer}: module}}):`"
        )
    return Site(layer, module)


def check_tokens(clean: Tensor, corrupted: Tensor, vocab: int | None = None) -> None:
    """Both token tensors [batch, pos] integer ids (`check_token_matrix`) of one shape,
    else a ValueError saying which."""
    check_token_matrix(clean, vocab, name="clean_tokens")
    check_token_matrix(corrupted, vocab, name="corrupted_tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean_tokens has shape {tuple(clean.shape)} but corrupted_tokens has shape "
            f"{tuple(corrupted.shape)}; they must match (same batch and same length)"
        )


def check_indices(values: Sequence[int] | Tensor | None, size: int, what: str, bound_desc: str) -> list[int]:
    """Validate positions or unit indices: integers in [0, size); None means all of them."""
    if values is None:
        return list(range(size))
    raw = values.tolist() if isinstance(values, Tensor) else list(values)
    if not raw:
        raise ValueError(f"{what} is empty; pass None for all {size} of them")
    bad = [v for v in raw if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < size]
    if bad:
        raise ValueError(f"{what} {bad[:5]} out of range: expected integer indices in [0, {size}) ({bound_desc})")
    return [int(v) for v in raw]


# --- capturing activations ------------------------------------------------------------
@dataclass
class Capture:
    """One run of a batch up to the end of the patched layer: the prefix before it (what
    patched runs resume from) and every node kind's activations."""

    prefix: Prefix
    """The residual stream entering the layer, with its positional and mask tensors."""
    nodes: dict[str, Tensor] = field(default_factory=dict)
    """Node kind -> activations at its hook ([batch, pos, width])."""

    def __getitem__(self, kind: str) -> Tensor:
        """A node kind's activations; 'resid' is the residual stream entering the layer."""
        return self.prefix.resid if kind == "resid" else self.nodes[kind]

    @property
    def layer(self) -> int:
        return self.prefix.start


@torch.no_grad()
def capture(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], site: Site) -> Capture:
    """Run the blocks before `site.layer` once (`run_prefix`), then that block alone,
    recording every node kind's activations."""
    hooks = site.node_hooks()
    store: dict[str, Tensor] = {}

    def saver(kind: str) -> Callable[[Tensor, HookPoint], None]:
        def hook(act: Tensor, hook: HookPoint) -> None:
            store[kind] = act.detach().clone()

        return hook

    prefix = run_prefix(model, tokens, site.layer)
    with model.hooks(fwd_hooks=[(name, saver(kind)) for kind, name in hooks.items()]):
        prefix.resume(model, stop_at_layer=site.layer + 1)
    return Capture(prefix, store)


def _captures(
    model: HookedTransformer,
    site: Site,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    clean: Capture | None,
    corrupted: Capture | None,
) -> tuple[Capture, Capture]:
    """The given captures (checked against the site and the tokens), or fresh ones."""
    out = []
    for name, tokens, given in (("clean", clean_tokens, clean), ("corrupted", corrupted_tokens, corrupted)):
        if given is None:
            out.append(capture(model, tokens, site))
            continue
        if not isinstance(given, Capture):
            raise ValueError(f"{name} must be a Capture from mxd_lens.patching.capture, got {type(given).__name__}")
        if given.layer != site.layer or set(given.nodes) != set(site.node_hooks()):
            raise ValueError(
                f"the {name} capture is of layer {given.layer} with node kinds {sorted(given.nodes)}, but the "
                f"replacement at layer {site.layer} has node kinds {sorted(site.node_hooks())}; capture again "
                "with the module attached as it is now"
            )
        if tuple(given.prefix.resid.shape[:2]) != tuple(tokens.shape):
            raise ValueError(
                f"the {name} capture holds {tuple(given.prefix.resid.shape[:2])} [batch, pos] but "
                f"{name}_tokens has shape {tuple(tokens.shape)}"
            )
        out.append(given)
    return out[0], out[1]


# --- batched patched runs ---------------------------------------------------------------
def copies_per_pass(batch: int, pos: int, d_vocab: int) -> int:
    """How many copies of a [batch, pos] batch one forward pass may hold within the logit budget."""
    return max(1, _LOGIT_BUDGET // max(1, batch * pos * d_vocab))


@torch.no_grad()
def patched_metrics(
    model: HookedTransformer,
    site: Site,
    corrupted: Capture,
    clean: Capture,
    masks: dict[str, Tensor],
    metric: Metric,
) -> Float[Tensor, " copies"]:
    """Metric of the corrupted run with some nodes at their clean values, for many node sets.

    `masks[kind]` is a boolean [copies, pos, width] ('unit': width n_units; every other
    kind width 1, i.e. the whole vector at that position); copy c patches the nodes
    where `masks[kind][c]` is True. The copies are stacked along the batch and run from
    `layer` on the captured corrupted prefix, several per forward pass.
    """
    hooks = site.node_hooks()
    unknown = sorted(set(masks) - set(hooks))
    if unknown:
        raise ValueError(f"masks for node kinds {unknown}, but the replacement at layer {site.layer} has {sorted(hooks)}")
    n_copies = next(iter(masks.values())).shape[0]
    batch, pos = corrupted.prefix.resid.shape[:2]
    per_pass = copies_per_pass(batch, pos, model.cfg.d_vocab)
    device = corrupted.prefix.resid.device
    out = torch.empty(n_copies)
    for start in range(0, n_copies, per_pass):
        stop = min(n_copies, start + per_pass)
        c = stop - start

        def patcher(kind: str) -> Callable[[Tensor, HookPoint], Tensor]:
            mask = masks[kind][start:stop].to(device)  # [c, pos, width]

            def hook(act: Tensor, hook: HookPoint) -> Tensor:
                act = act.view(c, batch, *act.shape[1:])
                patched = torch.where(mask[:, None], clean[kind][None].to(act.dtype), act)
                return patched.view(c * batch, *act.shape[2:])

            return hook

        with model.hooks(fwd_hooks=[(hooks[kind], patcher(kind)) for kind in masks]):
            logits = corrupted.prefix.repeat(c).resume(model)
        logits = logits.view(c, batch, *logits.shape[1:])
        for i in range(c):
            out[start + i] = metric(logits[i]).detach().float().cpu()
    return out


def _unit_masks(cells: Tensor, pos: int, n_units: int, device: torch.device) -> dict[str, Tensor]:
    """One copy per (position, unit) cell, patching that cell only."""
    mask = torch.zeros(len(cells), pos, n_units, dtype=torch.bool, device=device)
    mask[torch.arange(len(cells), device=device), cells[:, 0], cells[:, 1]] = True
    return {"unit": mask}


def activation_patch(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    layer: int,
    units: Sequence[int] | Tensor | None = None,
    positions: Sequence[int] | Tensor | None = None,
    progress: bool = False,
    *,
    clean: Capture | None = None,
    corrupted: Capture | None = None,
) -> Float[Tensor, "n_positions n_units"]:
    """Metric of the corrupted run with one unit's activation at one position (all batch
    rows) set to its clean value, for every (position, unit) cell.

    Units are the experts or latents of the replacement attached at `layer` (None: all
    of them); positions default to all. Cells whose clean and corrupted activations are
    equal in every batch row are exact no-ops and get the unpatched corrupted metric
    without a run. With the error term on, the error stays at its corrupted value, so a
    cell measures the unit's own effect. `clean` / `corrupted`: captures of these tokens
    already made with `capture` (otherwise they are made here).
    """
    site = find_site(model, layer)
    check_tokens(clean_tokens, corrupted_tokens, model.cfg.d_vocab)
    pos = clean_tokens.shape[1]
    n_units = site.module.n_units
    positions = check_indices(positions, pos, "positions", f"the sequences have {pos} positions")
    units = check_indices(units, n_units, "units", f"the {site.module.architecture} has n_units={n_units}")
    clean, corrupted = _captures(model, site, clean_tokens, corrupted_tokens, clean, corrupted)
    device = corrupted.prefix.resid.device

    p_idx = torch.tensor(positions, device=device)
    u_idx = torch.tensor(units, device=device)
    # differs[i, j]: patching cell (positions[i], units[j]) changes anything at all
    a_clean = clean["unit"][:, p_idx][:, :, u_idx]
    a_corr = corrupted["unit"][:, p_idx][:, :, u_idx]
    differs = (a_clean != a_corr).any(dim=0)
    pairs = differs.nonzero()  # [cells, 2] indices into (positions, units)
    cells = torch.stack([p_idx[pairs[:, 0]], u_idx[pairs[:, 1]]], dim=1)

    baseline = patched_metrics(
        model, site, corrupted, clean, {"unit": torch.zeros(1, pos, n_units, dtype=torch.bool)}, metric
    )[0]
    result = torch.full((len(positions), len(units)), float(baseline))
    chunk = 4 * copies_per_pass(*clean_tokens.shape, model.cfg.d_vocab)
    starts = range(0, len(cells), chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"activation patching layer {layer}", unit="chunk")
    for start in starts:
        part = cells[start : start + chunk]
        values = patched_metrics(model, site, corrupted, clean, _unit_masks(part, pos, n_units, device), metric)
        sel = pairs[start : start + chunk].cpu()
        result[sel[:, 0], sel[:, 1]] = values
    return result


# --- attribution patching ---------------------------------------------------------------
@dataclass
class Attribution:
    """First-order estimate, for every node, of the metric change when it is patched clean:
    (clean activation - corrupted activation) . d metric / d activation at the corrupted
    run, summed over the batch (and over the vector for every per-position kind)."""

    nodes: dict[str, Tensor]
    """Node kind -> scores: 'unit' [pos, n_units]; every other kind (the error term,
    the architecture's `extra_nodes`) [pos], the whole vector at a position as one node."""
    corrupted_metric: float
    """Metric of the corrupted run (with the replacement attached)."""

    @property
    def unit(self) -> Float[Tensor, "pos n_units"]:
        """Per (position, unit)."""
        return self.nodes["unit"]

    @property
    def error(self) -> Float[Tensor, " pos"] | None:
        """Per position, the error term as one node (None without `use_error_term`)."""
        return self.nodes.get("error")

    @property
    def dense(self) -> Float[Tensor, " pos"] | None:
        """Per position, the 'dense' node kind (an MxD's hidden vector z; None for
        modules without one)."""
        return self.nodes.get("dense")


def node_attributions(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    layer: int,
    *,
    clean: Capture | None = None,
    corrupted: Capture | None = None,
) -> Attribution:
    """Attribution scores of every node kind with one forward and one backward pass over the
    corrupted batch from `layer` on (plus the captures, unless given: one run of each
    batch up to the end of `layer`).

    The error term is computed without gradient in the core (as in SAE-Lens), so it is a
    constant in the backward pass: the gradient at the units flows only through the
    replacement's own decoder and the layers after it, which is exactly the derivative of
    the patched runs of `activation_patch` (there too the error keeps its corrupted value).
    What the detached error hides is any path from the units back through earlier layers,
    which single-layer patching never uses.
    """
    site = find_site(model, layer)
    check_tokens(clean_tokens, corrupted_tokens, model.cfg.d_vocab)
    clean, corrupted = _captures(model, site, clean_tokens, corrupted_tokens, clean, corrupted)
    hooks = site.node_hooks()
    leaves: dict[str, Tensor] = {}

    def leaf(kind: str) -> Callable[[Tensor, HookPoint], Tensor]:
        # Swap the activation for a leaf so autograd returns exactly d metric / d act.
        def hook(act: Tensor, hook: HookPoint) -> Tensor:
            leaves[kind] = act.detach().requires_grad_(True)
            return leaves[kind]

        return hook

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, leaf(kind)) for kind, name in hooks.items()]):
        value = metric(corrupted.prefix.resume(model))
        kinds = list(leaves)
        grads = torch.autograd.grad(value, [leaves[k] for k in kinds], allow_unused=True)
    scores: dict[str, Tensor] = {}
    for kind, grad in zip(kinds, grads):
        delta = clean[kind] - corrupted[kind]
        grad = torch.zeros_like(delta) if grad is None else grad
        prod = (delta * grad).sum(0)  # over the batch
        scores[kind] = (prod if kind == "unit" else prod.sum(-1)).detach().float().cpu()
    ordered = {kind: scores[kind] for kind in hooks if kind in scores}  # 'unit' first
    return Attribution(nodes=ordered, corrupted_metric=float(value.detach()))


def attribution_patch(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    layer: int,
    *,
    clean: Capture | None = None,
    corrupted: Capture | None = None,
) -> Float[Tensor, "pos n_units"]:
    """(clean activation - corrupted activation) x d metric / d activation at the corrupted
    run, summed over the batch, for every (position, unit) of the replacement at `layer`:
    one forward and one backward pass score every unit.

    An attached replacement routes a hooked activation through its dense mixing path, so
    units the corrupted run did not select get their true gradient too (a unit off in the
    corrupted run and on in the clean one is scored by its full clean activation).
    See `node_attributions` for the error term and the other node kinds.
    """
    return node_attributions(
        model, clean_tokens, corrupted_tokens, metric, layer, clean=clean, corrupted=corrupted
    ).unit


__all__ = [
    "Metric",
    "Site",
    "Capture",
    "Attribution",
    "NODE_KINDS",
    "find_site",
    "check_tokens",
    "check_indices",
    "capture",
    "patched_metrics",
    "activation_patch",
    "attribution_patch",
    "node_attributions",
]
