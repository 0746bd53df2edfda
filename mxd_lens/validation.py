"""The checks every entry point shares, each written once: every refusal is a ValueError
that names the offending value and what was expected. Imports torch only where a tensor
is checked."""

from __future__ import annotations

from typing import Any, Mapping


def check_positive_int(name: str, value: Any) -> int:
    """`value` as a positive int (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    """`value` as an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    return value


def check_layer(layer: Any, n_layers: int, name: str = "layer") -> int:
    """A block index in [0, n_layers)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"{name}={layer!r} is out of range: the model has layers 0..{n_layers - 1}")
    return layer


def check_token_matrix(tokens: Any, vocab: int | None = None, min_ctx: int = 1, name: str = "tokens") -> None:
    """A non-empty integer tensor [rows, ctx >= min_ctx] of ids in [0, vocab)."""
    from torch import Tensor
    import torch

    if not isinstance(tokens, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids [rows, ctx], got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, ctx], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] < 1 or tokens.shape[1] < min_ctx:
        raise ValueError(
            f"{name} has shape {tuple(tokens.shape)}; expected at least 1 row of at least "
            f"{min_ctx} token{'' if min_ctx == 1 else 's'}"
        )
    if vocab is not None:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} ids span [{lo}, {hi}] but the model's vocabulary is [0, {vocab})")


def check_tensors(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[tuple[int, ...], Any]],
    dtype: Any,
    where: str,
) -> None:
    """Every expected tensor name present with its shape (and `dtype`, unless None), nothing else."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: tensor names do not match cfg.json: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(got_shape)} but cfg.json implies {tuple(shape)}")
        if dtype is not None and got_dtype != dtype:
            raise ValueError(
                f"{where}: tensor {name!r} is {got_dtype} but cfg.json says dtype={str(dtype).removeprefix('torch.')}"
            )


__all__ = ["check_layer", "check_non_negative_int", "check_positive_int", "check_tensors", "check_token_matrix"]
