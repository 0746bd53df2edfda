"""Steering a model through the units of an attached replacement.

`steer(model, layer, {unit: value}, mode="add" | "clamp")` edits the unit activations
(after TopK) at every forward pass inside the context, `model.generate` included. For an
MxD, adding v to expert n adds v * c_n * (D^T z): a direction that depends on the input,
unlike a transcoder or SAE latent's fixed decoder row (Oldfield et al. 2025 steer with
+100 on one expert).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Mapping

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens.circuits.patching import check_indices, find_site

Mode = Literal["add", "clamp"]


@contextmanager
def steer(
    model: HookedTransformer,
    layer: int,
    units: Mapping[int, float],
    mode: Mode = "add",
) -> Iterator[HookedTransformer]:
    """Inside the context, add `units[n]` to unit n's activation ('add') or set it to
    `units[n]` ('clamp'), at every position, for the replacement attached at `layer`."""
    site = find_site(model, layer)
    if mode not in ("add", "clamp"):
        raise ValueError(f"mode={mode!r}; expected 'add' or 'clamp'")
    if not units:
        raise ValueError("units is empty; expected {unit index: value}")
    n_units = site.module.n_units
    keys = check_indices(list(units), n_units, "units", f"the {site.module.architecture} has n_units={n_units}")
    idx = torch.tensor(keys, dtype=torch.long)
    val = torch.tensor([float(v) for v in units.values()])

    def hook(acts: Tensor, hook: HookPoint) -> Tensor:
        i, v = idx.to(acts.device), val.to(acts.device, acts.dtype)
        acts = acts.clone()
        if mode == "add":
            acts[..., i] += v
        else:
            acts[..., i] = v
        return acts

    with model.hooks(fwd_hooks=[(site.acts_name, hook)]):
        yield model


def add_units(model: HookedTransformer, layer: int, units: Mapping[int, float]):
    """`steer(..., mode="add")`."""
    return steer(model, layer, units, "add")


def clamp_units(model: HookedTransformer, layer: int, units: Mapping[int, float]):
    """`steer(..., mode="clamp")`."""
    return steer(model, layer, units, "clamp")


__all__ = ["steer", "add_units", "clamp_units"]
