"""Mean-pooled unit activations of texts: what sparse probes read.

Each text is run through the model as a row of its own, `[sep, text tokens...]` (the
separator that starts every training row, truncated to `max_tokens`), up to the block
whose MLP the units belong to. A text's feature vector is the mean over its positions
of the units' activations, special positions (`mxd_lens.model_io.special_positions`:
the separator, BOS/EOS/pad) and padding excluded.

Feature sources (`FeatureSource`), computed from one forward pass per batch:

* any mxd_lens `Replacement` (MxD experts' gate coefficients after TopK, transcoder and
  skip-transcoder latents), or any SAE-Lens SAE through `as_module`: `module.encode` of
  the MLP's input (or, for an SAE on the MLP output, of that output);
* the dense MLP's own hidden neurons (`blocks.L.mlp.hook_post`), the neuron baseline;
* random directions in the MLP input space (`random_directions`), the chance anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mxd_lens.architectures.saelens_adapter import as_module
from mxd_lens.model_io import capture_mlp_io, model_device, special_positions, special_token_ids
from mxd_lens.validation import check_layer

__all__ = [
    "MLPActivations",
    "FeatureSource",
    "module_source",
    "neuron_source",
    "random_source",
    "random_directions",
    "text_tokens",
    "pooled_features",
]


@dataclass
class MLPActivations:
    """One batch of texts at one MLP: what every feature source reads."""

    mlp_in: Float[Tensor, "batch pos d_model"]
    """The MLP's input (what `attach` hands a replacement)."""
    mlp_out: Float[Tensor, "batch pos d_model"]
    """The MLP's output."""
    neurons: Float[Tensor, "batch pos d_mlp"] | None
    """The MLP's hidden activations (`hook_post`; None when the MLP has no such hook, e.g.
    while a replacement is attached in its place)."""


FeatureSource = Callable[[MLPActivations], Float[Tensor, "batch pos units"]]
"""Per-token unit activations of a batch, from the MLP's activations."""


def module_source(module) -> FeatureSource:
    """The units of an mxd_lens replacement or SAE-Lens SAE: `encode` of what it reads
    (the MLP input, or the MLP output for input_site='mlp_out'), dense, without hooks."""
    module = as_module(module)
    reads_output = module.cfg.input_site == "mlp_out"

    def source(acts: MLPActivations) -> Tensor:
        x = acts.mlp_out if reads_output else acts.mlp_in
        enc = module.encode(x.to(module.dtype), hooked=False)
        return enc.dense(module.n_units)

    return source


def neuron_source(acts: MLPActivations) -> Tensor:
    """The dense MLP's hidden neurons."""
    if acts.neurons is None:
        raise ValueError("the MLP has no hook_post (is a replacement attached in its place?); probe its "
                         "neurons on the model as it is")
    return acts.neurons


def random_directions(d_in: int, n: int, seed: int = 0) -> Float[Tensor, "d_in n"]:
    """`n` random unit vectors in R^d_in (Gaussian, normalised), as columns."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d_in, n, generator=g)
    return r / r.norm(dim=0, keepdim=True)


def random_source(d_in: int, n: int, seed: int = 0) -> FeatureSource:
    """Projections of the MLP input on `n` random directions: a linear read-out with no
    learned structure, what probing numbers are anchored against."""
    directions = random_directions(d_in, n, seed)

    def source(acts: MLPActivations) -> Tensor:
        return acts.mlp_in @ directions.to(acts.mlp_in.device, acts.mlp_in.dtype)

    return source


def text_tokens(
    tokenizer, texts: Sequence[str], max_tokens: int, sep_token_id: int = 0
) -> list[list[int]]:
    """Each text as `[sep, tokens...]`, at most `max_tokens` tokens in all."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}; a text needs at least the separator and one token")
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [[sep_token_id, *ids][:max_tokens] for ids in encoded]


def _padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[Int[Tensor, "b p"], Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        real[i, : len(r)] = True
    return tokens, real


@torch.no_grad()
def pooled_features(
    model: HookedTransformer,
    layer: int,
    texts: Sequence[str],
    sources: Mapping[str, FeatureSource],
    max_tokens: int = 64,
    batch_size: int = 16,
    sep_token_id: int = 0,
    progress: bool = True,
) -> dict[str, Float[Tensor, "texts units"]]:
    """Source name -> [texts, units] mean-pooled activations (float32, on the CPU).

    Texts are right-padded within a batch (the model is causal, so padding after a text
    never changes it) and padding and special positions are excluded from the mean; a
    text with no position left is a ValueError naming it.
    """
    check_layer(layer, model.cfg.n_layers)
    if not texts:
        raise ValueError("texts is empty; expected at least one text")
    if not sources:
        raise ValueError("sources is empty; expected {name: feature source}")
    rows = text_tokens(model.tokenizer, texts, max_tokens, sep_token_id)
    specials = special_token_ids(model)
    device = model_device(model)
    out: dict[str, list[Tensor]] = {name: [] for name in sources}
    neurons: dict[str, Tensor] = {}
    hook_name = f"blocks.{layer}.mlp.hook_post"

    def keep(t: Tensor, hook) -> None:
        neurons["post"] = t.detach()

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths batch together
    bar = tqdm(total=len(rows), unit="text", desc=f"features L{layer}", disable=not progress)
    pooled_rows: list[tuple[int, dict[str, Tensor]]] = []
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            tokens, real = _padded([rows[i] for i in idx], sep_token_id)
            keep_mask = real & ~special_positions(tokens, specials)
            empty = (~keep_mask.any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"text {idx[empty[0]]} ({texts[idx[empty[0]]][:40]!r}) has no non-special token")
            with capture_mlp_io(model, [layer]) as seen:
                hooks = [(hook_name, keep)] if hook_name in model.hook_dict else []
                model.run_with_hooks(tokens.to(device), stop_at_layer=layer + 1, fwd_hooks=hooks)
            mlp_in, mlp_out = seen[layer]
            acts = MLPActivations(mlp_in, mlp_out, neurons.pop("post", None))
            w = keep_mask.to(device, torch.float32)
            w = w / w.sum(1, keepdim=True)
            batch_out = {}
            for name, source in sources.items():
                unit_acts = source(acts).float()
                batch_out[name] = torch.einsum("bp,bpu->bu", w, unit_acts).cpu()
            pooled_rows.extend((i, {n: v[j] for n, v in batch_out.items()}) for j, i in enumerate(idx))
            bar.update(len(idx))
    finally:
        bar.close()
    pooled_rows.sort(key=lambda r: r[0])
    for _, values in pooled_rows:
        for name in sources:
            out[name].append(values[name])
    return {name: torch.stack(v) for name, v in out.items()}
