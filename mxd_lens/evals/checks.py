"""Input checks of an evaluation: every refusal is a ValueError naming the bad value."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens.attach import check_attachable
from mxd_lens.model_io import model_device, model_dtype
from mxd_lens.architectures.base import Replacement


def check_tokens(model: HookedTransformer, tokens: object) -> None:
    """Raise ValueError unless `tokens` is a non-empty [rows, ctx >= 2] tensor of ids."""
    if not isinstance(tokens, Tensor):
        raise ValueError(f"tokens must be a torch.Tensor of token ids [rows, ctx], got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D [rows, ctx], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}; expected at least 1 row of at least 2 tokens "
            "(one next-token prediction)"
        )
    lo, hi, vocab = int(tokens.min()), int(tokens.max()), model.cfg.d_vocab
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token ids span [{lo}, {hi}] but the model's vocabulary is [0, {vocab})")


def check_candidates(
    model: HookedTransformer, candidates: Mapping[str, Mapping[int, Replacement]]
) -> tuple[int, ...]:
    """Every candidate must be attachable, and all must replace the same layers (the
    ablation baselines are shared). Returns those layers, sorted."""
    if not isinstance(candidates, Mapping) or not candidates:
        raise ValueError("candidates must be a non-empty mapping {name: {layer: module}}")
    layers: tuple[int, ...] | None = None
    first = ""
    for name, replacements in candidates.items():
        if not isinstance(replacements, Mapping):
            raise ValueError(f"candidate {name!r}: expected a mapping {{layer: module}}, got {type(replacements).__name__}")
        try:
            check_attachable(model, replacements)
        except ValueError as err:
            raise ValueError(f"candidate {name!r}: {err}") from None
        these = tuple(sorted(replacements))
        if layers is None:
            layers, first = these, name
        elif these != layers:
            raise ValueError(
                f"candidate {name!r} replaces layers {list(these)} but candidate {first!r} replaces "
                f"{list(layers)}: candidates share one set of ablation baselines, so evaluate "
                "different layer sets in separate calls"
            )
    assert layers is not None
    return layers


def check_mean_outputs(
    model: HookedTransformer, mean_outputs: Mapping[int, Tensor], layers: tuple[int, ...]
) -> dict[int, Tensor]:
    """One [d_model] mean MLP output per replaced layer, moved to the model's dtype/device."""
    if not isinstance(mean_outputs, Mapping):
        raise ValueError(f"mean_outputs must be a mapping {{layer: [d_model] tensor}}, got {type(mean_outputs).__name__}")
    missing = sorted(set(layers) - set(mean_outputs))
    extra = sorted(set(mean_outputs) - set(layers))
    if missing or extra:
        raise ValueError(
            f"mean_outputs has layers {sorted(mean_outputs)} but the candidates replace {list(layers)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (layer without replacement: {extra})" if extra else "")
        )
    out = {}
    for layer in layers:
        mean = mean_outputs[layer]
        if not isinstance(mean, Tensor) or tuple(mean.shape) != (model.cfg.d_model,):
            shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
            raise ValueError(f"mean_outputs[{layer}] has shape {shape}; expected ({model.cfg.d_model},)")
        out[layer] = mean.detach().to(model_device(model), model_dtype(model))
    return out


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    return batch_size


