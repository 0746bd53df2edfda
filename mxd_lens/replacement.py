"""The base class of every module that can stand in for a transformer's MLP.

A replacement computes its own reconstruction of the MLP output (`reconstruct`);
this class adds what `attach` needs around it: input checks, running the original
MLP first for output-site modules, and SAE-Lens-style error terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from mxd_lens.config import ReplacementConfig, parse_dtype
from mxd_lens.functional import TopK, dense_mix, densify, topk_mix


@dataclass
class Splice:
    """Set by `attach` while a module sits in place of an MLP. Not an nn.Module
    attribute, so the original MLP never joins this module's parameters or hooks."""

    original: nn.Module
    """The MLP this module replaces."""
    use_error_term: bool
    """Add back (original output - unhooked reconstruction), without gradient."""


def has_hooks(hook: HookPoint) -> bool:
    """True when anything (forward or backward) is registered on the hook point."""
    return bool(hook._forward_hooks or hook._backward_hooks)


HookFn = Callable[[HookPoint, Tensor], Tensor]


def _through(hook: HookPoint, x: Tensor) -> Tensor:
    return hook(x)


def _bypass(hook: HookPoint, x: Tensor) -> Tensor:
    return x


class Replacement(HookedRootModule):
    """A sparse module that maps an MLP's input to its output.

    Subclasses define `reconstruct(x, hooked)`; hooks common to all of them:
    `hook_error` (the error term, only with `use_error_term`) and `hook_out` (what the
    transformer block receives).
    """

    cfg: ReplacementConfig
    architecture: str = "replacement"
    """Name under which the module is saved and registered with SAE-Lens."""
    acts_hook_name: str = "hook_acts"
    """Name of the hook point that carries the sparse unit activations."""

    def __init__(self, cfg: ReplacementConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.hook_error = HookPoint()
        self.hook_out = HookPoint()
        self.splice: Splice | None = None
        self.sae_metadata: dict | None = None
        """SAE-Lens metadata read from or written to cfg.json (context_size, dataset_path...)."""

    # --- what subclasses provide -------------------------------------------------
    def reconstruct(self, x: Float[Tensor, "... d_in"], hooked: bool = True) -> Float[Tensor, "... d_out"]:
        raise NotImplementedError

    @property
    def n_units(self) -> int:
        """Number of sparse units (experts or latents)."""
        return self.cfg.n_units

    @property
    def acts_hook(self) -> HookPoint:
        """The hook point carrying the unit activations (experts or latents)."""
        return getattr(self, self.acts_hook_name)

    # --- shared machinery --------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _param_kwargs(self) -> dict:
        return {"dtype": parse_dtype(self.cfg.dtype), "device": torch.device(self.cfg.device)}

    def check_input(self, x: Tensor) -> None:
        """Shape check only: no data-dependent test that would force a GPU sync."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"{type(self).__name__} has d_in={self.cfg.d_in} but the input has last dimension "
                f"{x.shape[-1]} (shape {tuple(x.shape)})"
            )

    def mix(
        self, sparse: TopK, rows: Float[Tensor, "n d_out"], hooked: bool
    ) -> Float[Tensor, "... d_out"]:
        """sum_n a_n rows[n], where a is what leaves the activation hook.

        With no hook registered the activations cannot have been edited, so only the K
        selected rows are touched (forward and backward). When a hook is registered, the
        dense activations go through it and the mixing is dense: an expert switched on
        by a hook contributes exactly its term, and a backward hook sees the true
        gradient of every unit, selected or not.
        """
        if hooked and has_hooks(self.acts_hook):
            acts = self.acts_hook(densify(sparse, self.n_units))
            return dense_mix(acts, rows)
        return topk_mix(sparse, rows)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        self.check_input(x)
        x = x.to(self.dtype)
        splice = self.splice
        target = None
        if self.cfg.input_site == "mlp_out":
            if splice is None:
                raise RuntimeError(
                    f"{type(self).__name__} reads the MLP's output (input_site='mlp_out'); "
                    "call it on that output directly with .reconstruct(), or attach() it"
                )
            target = splice.original(x).to(self.dtype)
            x = target
        y = self.reconstruct(x, hooked=True)
        if splice is not None and splice.use_error_term:
            with torch.no_grad():
                if target is None:
                    target = splice.original(x).to(self.dtype)
                error = target - self.reconstruct(x, hooked=False)
            y = y + self.hook_error(error)
        return self.hook_out(y)

    @staticmethod
    def hook_fn(hooked: bool) -> HookFn:
        """`h(hook_point, tensor)`: through the hook point, or straight past it."""
        return _through if hooked else _bypass

    def save(self, path: str | Path) -> Path:
        """Write this module to a folder (SAE-Lens layout); read back with `mxd_lens.load`."""
        from mxd_lens.io import save

        return save(self, path)

    def n_params(self) -> int:
        """Total number of parameters, counted from the module itself."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.cfg.to_dict().items() if v is not None)
