"""Activation and attribution patching of sparse units: MxD experts, transcoder and SAE latents.

The units are those of whichever mxd_lens replacement is attached at `layer`; their
activations sit at `blocks.{layer}.mlp.{module.acts_hook_name}` (after TopK), so
patching one unit changes exactly that unit's coefficient. TransformerLens's own
patching helpers build hook names with `get_act_name` and cannot address these hooks.

Every patched run starts at `layer` from the cached corrupted residual stream and
several patched copies of the corrupted batch share one forward pass.

Besides the units, a replacement has up to two more kinds of node, each one per
position: its error term (`hook_error`, present when attached with
`use_error_term=True`) and, for an MxD, the dense branch z (`hook_hidden`), which every
expert multiplies. With every node at its clean value the replacement's output is the
clean MLP output, so the node set accounts for the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens.architectures.base import Replacement

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]
"""Maps the logits of one batch of prompts to a scalar (e.g. a mean logit difference)."""

NODE_KINDS: tuple[str, ...] = ("unit", "error", "dense")
"""Node kinds: a unit's activation at one position; the error term at one position;
an MxD's dense hidden vector z at one position."""

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
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer!r} is out of range: the model has layers 0..{n_layers - 1}")
    module = getattr(model.blocks[layer], "mlp", None)
    if not isinstance(module, Replacement):
        raise ValueError(
            f"no mxd_lens replacement is attached at layer {layer} (its MLP is a "
            f"{type(module).__name__}); patch inside `with mxd_lens.attach(model, {{{layer}: module}}):`"
        )
    return Site(layer, module)


def check_tokens(clean: Tensor, corrupted: Tensor) -> None:
    """Both token tensors [batch, pos] integers of one shape, else a ValueError saying which."""
    for name, t in (("clean_tokens", clean), ("corrupted_tokens", corrupted)):
        if not isinstance(t, Tensor) or t.ndim != 2 or t.dtype.is_floating_point:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an integer tensor [batch, pos], got {shape}")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean_tokens has shape {tuple(clean.shape)} but corrupted_tokens has shape "
            f"{tuple(corrupted.shape)}; they must match (same batch and same length)"
        )


def check_indices(values: Sequence[int] | Tensor | None, size: int, what: str, bound_desc: str) -> list[int]:
    """Validate positions or unit indices: integers in [0, size); None means all of them."""
    if values is None:
        return list(range(size))
    out = [int(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    if not out:
        raise ValueError(f"{what} is empty; pass None for all {size} of them")
    bad = [v for v in out if not 0 <= v < size]
    if bad:
        raise ValueError(f"{what} {bad[:5]} out of range: expected indices in [0, {size}) ({bound_desc})")
    return out


# --- capturing activations ------------------------------------------------------------
@torch.no_grad()
def capture(model: HookedTransformer, tokens: Tensor, site: Site) -> dict[str, Tensor]:
    """One run up to the end of `layer`: the residual entering it ('resid') and every
    node kind's activations ('unit', 'error', 'dense')."""
    names = {"resid": site.resid_name, **site.node_hooks()}
    store: dict[str, Tensor] = {}

    def saver(kind: str) -> Callable[[Tensor, HookPoint], None]:
        def hook(act: Tensor, hook: HookPoint) -> None:
            store[kind] = act.detach().clone()

        return hook

    model.run_with_hooks(
        tokens.to(model.cfg.device),
        stop_at_layer=site.layer + 1,
        fwd_hooks=[(name, saver(kind)) for kind, name in names.items()],
    )
    return store


# --- batched patched runs ---------------------------------------------------------------
def _copies_per_pass(batch: int, pos: int, d_vocab: int) -> int:
    return max(1, _LOGIT_BUDGET // max(1, batch * pos * d_vocab))


@torch.no_grad()
def patched_metrics(
    model: HookedTransformer,
    site: Site,
    corrupted: dict[str, Tensor],
    clean: dict[str, Tensor],
    masks: dict[str, Tensor],
    metric: Metric,
) -> Float[Tensor, " copies"]:
    """Metric of the corrupted run with some nodes at their clean values, for many node sets.

    `masks[kind]` is a boolean [copies, pos, width] ('unit': width n_units, 'error' and
    'dense': width 1, i.e. the whole vector at that position); copy c patches the nodes
    where `masks[kind][c]` is True. The copies are stacked along the batch and run from
    `layer` on the cached corrupted residual, several per forward pass.
    """
    n_copies = next(iter(masks.values())).shape[0]
    batch, pos = corrupted["resid"].shape[:2]
    per_pass = _copies_per_pass(batch, pos, model.cfg.d_vocab)
    hooks = site.node_hooks()
    out = torch.empty(n_copies)
    for start in range(0, n_copies, per_pass):
        stop = min(n_copies, start + per_pass)
        c = stop - start

        def patcher(kind: str) -> Callable[[Tensor, HookPoint], Tensor]:
            mask = masks[kind][start:stop].to(corrupted["resid"].device)  # [c, pos, width]

            def hook(act: Tensor, hook: HookPoint) -> Tensor:
                act = act.view(c, batch, *act.shape[1:])
                patched = torch.where(mask[:, None], clean[kind][None].to(act.dtype), act)
                return patched.view(c * batch, *act.shape[2:])

            return hook

        fwd = [(hooks[kind], patcher(kind)) for kind in masks]
        resid = corrupted["resid"].repeat(c, 1, 1)
        logits = model.run_with_hooks(resid, start_at_layer=site.layer, fwd_hooks=fwd)
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
) -> Float[Tensor, "n_positions n_units"]:
    """Metric of the corrupted run with one unit's activation at one position (all batch
    rows) set to its clean value, for every (position, unit) cell.

    Units are the experts or latents of the replacement attached at `layer` (None: all
    of them); positions default to all. Cells whose clean and corrupted activations are
    equal in every batch row are exact no-ops and get the unpatched corrupted metric
    without a run. With the error term on, the error stays at its corrupted value, so a
    cell measures the unit's own effect.
    """
    site = find_site(model, layer)
    check_tokens(clean_tokens, corrupted_tokens)
    pos = clean_tokens.shape[1]
    n_units = site.module.n_units
    positions = check_indices(positions, pos, "positions", f"the sequences have {pos} positions")
    units = check_indices(units, n_units, "units", f"the {site.module.architecture} has n_units={n_units}")
    clean = capture(model, clean_tokens, site)
    corrupted = capture(model, corrupted_tokens, site)
    device = corrupted["resid"].device

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
    chunk = 4 * _copies_per_pass(*clean_tokens.shape, model.cfg.d_vocab)
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
    run, summed over the batch (and over the vector for error and dense nodes)."""

    unit: Float[Tensor, "pos n_units"]
    """Per (position, unit)."""
    error: Float[Tensor, " pos"] | None
    """Per position, the error term as one node (None without `use_error_term`)."""
    dense: Float[Tensor, " pos"] | None
    """Per position, an MxD's dense hidden vector z as one node (None for other modules)."""
    corrupted_metric: float
    """Metric of the corrupted run (with the replacement attached)."""


def node_attributions(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    layer: int,
) -> Attribution:
    """Attribution scores of every node kind with one forward and one backward pass over the
    corrupted batch (plus a forward pass over the clean batch up to `layer`, for the clean
    activations).

    The error term is computed without gradient in the core (as in SAE-Lens), so it is a
    constant in the backward pass: the gradient at the units flows only through the
    replacement's own decoder and the layers after it, which is exactly the derivative of
    the patched runs of `activation_patch` (there too the error keeps its corrupted value).
    What the detached error hides is any path from the units back through earlier layers,
    which single-layer patching never uses.
    """
    site = find_site(model, layer)
    check_tokens(clean_tokens, corrupted_tokens)
    clean = capture(model, clean_tokens, site)
    corrupted = capture(model, corrupted_tokens, site)
    hooks = site.node_hooks()
    leaves: dict[str, Tensor] = {}

    def leaf(kind: str) -> Callable[[Tensor, HookPoint], Tensor]:
        # Swap the activation for a leaf so autograd returns exactly d metric / d act.
        def hook(act: Tensor, hook: HookPoint) -> Tensor:
            leaves[kind] = act.detach().requires_grad_(True)
            return leaves[kind]

        return hook

    with torch.enable_grad():
        logits = model.run_with_hooks(
            corrupted["resid"],
            start_at_layer=layer,
            fwd_hooks=[(name, leaf(kind)) for kind, name in hooks.items()],
        )
        value = metric(logits)
        kinds = list(leaves)
        grads = torch.autograd.grad(value, [leaves[k] for k in kinds], allow_unused=True)
    scores: dict[str, Tensor] = {}
    for kind, grad in zip(kinds, grads):
        delta = clean[kind] - corrupted[kind]
        grad = torch.zeros_like(delta) if grad is None else grad
        prod = (delta * grad).sum(0)  # over the batch
        scores[kind] = (prod if kind == "unit" else prod.sum(-1)).detach().float().cpu()
    return Attribution(
        unit=scores["unit"],
        error=scores.get("error"),
        dense=scores.get("dense"),
        corrupted_metric=float(value.detach()),
    )


def attribution_patch(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    layer: int,
) -> Float[Tensor, "pos n_units"]:
    """(clean activation - corrupted activation) x d metric / d activation at the corrupted
    run, summed over the batch, for every (position, unit) of the replacement at `layer`:
    one forward and one backward pass score every unit.

    An attached replacement routes a hooked activation through its dense mixing path, so
    units the corrupted run did not select get their true gradient too (a unit off in the
    corrupted run and on in the clean one is scored by its full clean activation).
    See `node_attributions` for the error term and the MxD dense branch.
    """
    return node_attributions(model, clean_tokens, corrupted_tokens, metric, layer).unit


__all__ = [
    "Metric",
    "Site",
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
