"""Running a HookedTransformer in pieces for evaluation.

`run_prefix` runs the blocks before the first replaced layer once per batch, and
`Prefix.resume` runs the rest, so the clean model, every candidate and every ablation
share that prefix. Forward hooks sit on `model.blocks[L].mlp` itself (the module
`attach` replaces), so inputs, outputs and ablations are those of the MLP module,
whatever norms surround it (e.g. Gemma's ln2_post after the MLP).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mxd_lens.attach import model_device, model_dtype
from mxd_lens.evals.checks import check_batch_size, check_tokens


@dataclass
class Prefix:
    """The residual stream entering layer `start`, and what `forward` needs to resume."""

    resid: Float[Tensor, "rows ctx d_model"]
    start: int
    shortformer_pos_embed: Tensor | None
    attention_mask: Tensor | None

    def resume(self, model: HookedTransformer) -> Float[Tensor, "rows ctx vocab"]:
        """Logits of the model from layer `start` on (whatever is spliced in now)."""
        return model(
            self.resid,
            start_at_layer=self.start,
            shortformer_pos_embed=self.shortformer_pos_embed,
            attention_mask=self.attention_mask,
        )


def run_prefix(model: HookedTransformer, tokens: Int[Tensor, "rows ctx"], start: int) -> Prefix:
    """Embed and run blocks 0..start-1. Keeps the positional and mask tensors that a
    full forward would pass to later blocks (shortformer models, left padding)."""
    resid, _, pos_embed, mask = model.input_to_embed(tokens)
    if start > 0:
        resid = model(
            resid, start_at_layer=0, stop_at_layer=start, shortformer_pos_embed=pos_embed, attention_mask=mask
        )
    return Prefix(resid, start, pos_embed, mask)


@contextmanager
def capture_mlp_io(model: HookedTransformer, layers: tuple[int, ...]) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """{layer: (input, output)} of `model.blocks[layer].mlp`: the module `attach` replaces,
    so these are its true input and output whatever norms surround it."""
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(layer: int):
        return lambda module, args, output: seen.__setitem__(layer, (args[0], output))

    handles = [model.blocks[layer].mlp.register_forward_hook(hook(layer)) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def constant_mlp_outputs(model: HookedTransformer, outputs: Mapping[int, Tensor | None]) -> Iterator[None]:
    """Replace each listed MLP's output by a constant vector (None: zeros) for the duration."""

    def hook(value: Tensor | None):
        def replace(module, args, output: Tensor) -> Tensor:
            return torch.zeros_like(output) if value is None else value.expand_as(output).clone()

        return replace

    handles = [model.blocks[layer].mlp.register_forward_hook(hook(v)) for layer, v in outputs.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batches(tokens: Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[Tensor]:
    """Row batches of `tokens` under a tqdm bar counted in tokens."""
    bar = tqdm(total=tokens.numel(), unit="tok", unit_scale=True, desc=desc, disable=not progress)
    try:
        for batch in tokens.split(batch_size):
            yield batch
            bar.update(batch.numel())
    finally:
        bar.close()


def mlp_output_means(
    model: HookedTransformer,
    tokens: Int[Tensor, "rows ctx"],
    layers: tuple[int, ...] | list[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, Float[Tensor, " d_model"]]:
    """Mean output of `model.blocks[L].mlp` over every position of `tokens`, per layer
    (the mean-ablation vectors), accumulated in float64; stops after the last layer."""
    check_tokens(model, tokens)
    batch_size = check_batch_size(batch_size)
    layers = tuple(sorted(layers))
    n_layers = model.cfg.n_layers
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers]
    if not layers or bad:
        raise ValueError(f"layers={list(layers)!r}: expected one or more layers in 0..{n_layers - 1}")
    sums = {layer: torch.zeros(model.cfg.d_model, dtype=torch.float64) for layer in layers}
    device = model_device(model)
    with torch.no_grad():
        for batch in batches(tokens, batch_size, progress, "mean MLP outputs"):
            with capture_mlp_io(model, layers) as io:
                model(batch.to(device), stop_at_layer=layers[-1] + 1)
            for layer in layers:
                sums[layer] += io[layer][1].double().sum((0, 1)).cpu()
    return {l: (s / tokens.numel()).to(device, model_dtype(model)) for l, s in sums.items()}


