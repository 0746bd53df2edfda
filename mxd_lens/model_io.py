"""Running a HookedTransformer around layer L: the one implementation that training,
evaluation and patching share.

`run_prefix` runs the blocks before layer L once, and `Prefix.resume` runs the rest
(with whatever is spliced in now), keeping the attention mask and shortformer positions
a full forward pass would give the later blocks. Captures and ablations are module
hooks on `model.blocks[L].mlp` itself, the module `attach` replaces: a forward hook sees
exactly its input and output, whatever norms surround it (Gemma's and OLMo-2's
normalisation after the MLP, a model loaded with fold_ln=False), which the named
TransformerLens hooks (`ln2.hook_normalized`, `hook_mlp_out`) do not.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mxd_lens.validation import check_layer


def model_dtype(model: HookedTransformer) -> torch.dtype:
    """The dtype of the model's weights (cfg.dtype can disagree after a .to())."""
    return next(model.parameters()).dtype


def model_device(model: HookedTransformer) -> torch.device:
    """The device of the model's weights."""
    return next(model.parameters()).device


@dataclass
class Prefix:
    """The residual stream entering layer `start`, and what `forward` needs to resume."""

    resid: Float[Tensor, "rows ctx d_model"]
    """The residual stream entering block `start`."""
    start: int
    """The first block `resume` runs."""
    shortformer_pos_embed: Float[Tensor, "rows ctx d_model"] | None
    """A shortformer model's positional embedding, added to every attention input."""
    attention_mask: Int[Tensor, "rows ctx"] | None
    """1 for real tokens, 0 for padding (None: no padding)."""

    def resume(self, model: HookedTransformer, stop_at_layer: int | None = None) -> Tensor:
        """The model from layer `start` on (whatever is spliced in now): the logits
        [rows, ctx, vocab], or with `stop_at_layer` the residual stream entering that
        layer [rows, ctx, d_model] (`stop_at_layer=start + 1` runs block `start` alone)."""
        return model(
            self.resid,
            start_at_layer=self.start,
            stop_at_layer=stop_at_layer,
            shortformer_pos_embed=self.shortformer_pos_embed,
            attention_mask=self.attention_mask,
        )

    @property
    def rows(self) -> int:
        """Number of token rows."""
        return self.resid.shape[0]

    def repeat(self, copies: int) -> "Prefix":
        """`copies` copies of the batch stacked along the rows (copy c holds rows
        c*rows..(c+1)*rows-1), with the positional and mask tensors repeated alike: many
        patched variants of one batch then share one forward pass."""

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat(copies, *([1] * (t.ndim - 1)))

        return Prefix(rep(self.resid), self.start, rep(self.shortformer_pos_embed), rep(self.attention_mask))


def run_prefix(
    model: HookedTransformer,
    tokens: Int[Tensor, "rows ctx"],
    start: int,
    attention_mask: Int[Tensor, "rows ctx"] | None = None,
) -> Prefix:
    """Embed and run blocks 0..start-1. Keeps the positional and mask tensors that a
    full forward would pass to later blocks (shortformer models, left padding: the mask
    TransformerLens derives from a left-padding tokenizer, or `attention_mask` as
    `model(tokens, attention_mask=...)` takes it)."""
    check_layer(start, model.cfg.n_layers, "start")
    device = model_device(model)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    resid, _, pos_embed, mask = model.input_to_embed(tokens.to(device), attention_mask=attention_mask)
    if start > 0:
        resid = model(
            resid, start_at_layer=0, stop_at_layer=start, shortformer_pos_embed=pos_embed, attention_mask=mask
        )
    return Prefix(resid, start, pos_embed, mask)


def post_mlp_norm(model: HookedTransformer) -> str | None:
    """The normalisation a block applies to its MLP's output before `hook_mlp_out` (Gemma's
    `ln2_post`, OLMo-2's post-norm `ln2`), or None when `blocks.L.hook_mlp_out` carries
    the MLP's own output. Only code that reads the named TransformerLens hook needs this;
    the module hooks of `capture_mlp_io` see the MLP's output in every model."""
    from transformer_lens.components import transformer_block

    if getattr(model.cfg, "use_normalization_before_and_after", False):
        return "ln2_post (normalisation after the MLP)"
    if model.cfg.original_architecture in getattr(transformer_block, "POST_NORM_ARCHITECTURES", ()):
        return f"ln2 (the post-norm of {model.cfg.original_architecture})"
    return None


@contextmanager
def capture_mlp_io(
    model: HookedTransformer, layers: tuple[int, ...] | list[int]
) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """{layer: (input, output)} of `model.blocks[layer].mlp` in the forward passes run
    inside the context (the last pass's, detached): the module `attach` replaces, so
    these are its true input and output whatever norms surround it."""
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(layer: int):
        return lambda module, args, output: seen.__setitem__(layer, (args[0].detach(), output.detach()))

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


def special_token_ids(model: HookedTransformer) -> list[int]:
    """Token ids that mark structure rather than text: the tokenizer's special tokens
    (BOS/EOS/pad and the separator that starts each row; for the default model 0, 1, 2).

    Positions holding them are where attention sinks put massive MLP activations, so
    training and evaluation exclude them by default (see `special_positions`)."""
    tok = model.tokenizer
    if tok is None:
        return []
    ids = set(getattr(tok, "all_special_ids", None) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(i for i in ids if 0 <= i < model.cfg.d_vocab)


def special_positions(tokens: Int[Tensor, "rows ctx"], ids: list[int] | tuple[int, ...]) -> Bool[Tensor, "rows ctx"]:
    """True where `tokens` holds one of `ids` (the one definition of an excluded position)."""
    if not ids:
        return torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    return torch.isin(tokens, torch.tensor(list(ids), dtype=tokens.dtype, device=tokens.device))


__all__ = [
    "Prefix",
    "batches",
    "capture_mlp_io",
    "constant_mlp_outputs",
    "model_device",
    "model_dtype",
    "post_mlp_norm",
    "run_prefix",
    "special_positions",
    "special_token_ids",
]
