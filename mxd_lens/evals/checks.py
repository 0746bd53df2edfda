"""Input checks of an evaluation: every refusal is a ValueError naming the bad value."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor
from transformer_lens import HookedTransformer

from mxd_lens.attach import check_attachable
from mxd_lens.model_io import model_device, model_dtype
from mxd_lens.architectures.base import Replacement
from mxd_lens.validation import check_layer, check_positive_int, check_token_matrix


def check_tokens(model: HookedTransformer, tokens: object) -> None:
    """Raise ValueError unless `tokens` is a non-empty [rows, ctx >= 2] tensor of ids of
    the model's vocabulary (ctx >= 2: at least one next-token prediction per row)."""
    check_token_matrix(tokens, model.cfg.d_vocab, min_ctx=2)


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
    """`batch_size` as a positive int."""
    return check_positive_int("batch_size", batch_size)


def check_layers(model: HookedTransformer, layers: object) -> tuple[int, ...]:
    """A non-empty collection of the model's layer indices, sorted and deduplicated."""
    n = model.cfg.n_layers
    values = list(layers) if isinstance(layers, (list, tuple, set, frozenset)) else None
    if not values:
        raise ValueError(f"layers={layers!r}: expected one or more layers in 0..{n - 1}")
    for layer in values:
        try:
            check_layer(layer, n)
        except ValueError:
            raise ValueError(f"layers={values!r}: expected one or more layers in 0..{n - 1}") from None
    return tuple(sorted(set(values)))
