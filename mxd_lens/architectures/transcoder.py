"""TopK transcoders and skip transcoders: the neuron-level baselines MxD is compared with.

    a = TopK_k(ReLU(W_enc^T x + b_enc))
    y = W_dec^T a + b_dec  (+ W_skip x for a skip transcoder)

Weight names and shapes follow SAE-Lens (W_skip is [d_out, d_in] as there), so the
same tensors serve both libraries. This file holds the config, the modules and their
SAE-Lens views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mxd_lens.architectures.base import (
    HookFn,
    Replacement,
    ReplacementConfig,
    ReplacementSAE,
    ReplacementSAEConfig,
    Sizes,
    UnitMath,
)
from mxd_lens.functional import linear_init_, skip_out, transcoder_combine, unit_norm_rows_


@dataclass(kw_only=True)
class TranscoderConfig(ReplacementConfig):
    """A TopK transcoder: y = W_dec^T TopK_k(ReLU(W_enc^T x + b_enc)) + b_dec
    (plus W_skip x for a skip transcoder)."""

    d_sae: int
    """Number of latents (the transcoder's width)."""


class TranscoderMath(UnitMath):
    """A TopK transcoder's output: the mixture plus the output bias."""

    def combine(self, mix: Tensor, context: Tensor | None) -> Tensor:
        return transcoder_combine(mix, self.b_dec, context)


class SkipMath(TranscoderMath):
    """A skip transcoder's context is its skip term W_skip x, added to the output."""

    W_skip: Tensor
    context_doc: ClassVar[str | None] = "the skip term W_skip x"

    def context(self, x: Float[Tensor, "... d_in"], h: HookFn) -> Float[Tensor, "... d_out"]:
        return skip_out(x, self.W_skip)


class TopKTranscoder(TranscoderMath, Replacement):
    """A TopK transcoder. Hooks: `hook_in`, `hook_latent_pre`, `hook_latent_acts`,
    `hook_error`, `hook_out`."""

    cfg: TranscoderConfig
    config_class = TranscoderConfig
    architecture = "topk_transcoder"
    pre_hook_name = "hook_latent_pre"
    acts_hook_name = "hook_latent_acts"

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__(cfg)
        self._add_parameters()
        self._finish_init()

    def _add_parameters(self) -> None:
        """Parameters beyond the shared four (none for a plain transcoder)."""

    @classmethod
    def build(cls, sizes: Sizes, k: int, **common: Any) -> "TopKTranscoder":
        """A transcoder of width `sizes.width`."""
        return cls(TranscoderConfig(d_in=sizes.d_model, d_out=sizes.d_model, k=k, d_sae=sizes.width, **common))

    def reset_parameters(self) -> None:
        """Encoder as nn.Linear, zero encoder bias; decoder rows of norm 0.1 so that
        the initial output is small; zero output bias (and zero skip matrix)."""
        linear_init_(self.W_enc, self.cfg.d_in)
        with torch.no_grad():
            self.b_enc.zero_()
            self.W_dec.normal_()
            self.b_dec.zero_()
        unit_norm_rows_(self.W_dec)
        with torch.no_grad():
            self.W_dec.mul_(0.1)

    def latent_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """W_enc^T x + b_enc (before `hook_latent_pre`)."""
        return self.pre_acts(x)


class SkipTranscoder(SkipMath, TopKTranscoder):
    """A TopK transcoder plus a learned linear skip connection W_skip [d_out, d_in]
    (zero at init)."""

    architecture = "topk_skip_transcoder"

    def _add_parameters(self) -> None:
        self.W_skip = nn.Parameter(torch.zeros(self.cfg.d_out, self.cfg.d_in, **self._param_kwargs()))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.W_skip.zero_()

    def skip(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The skip term W_skip x."""
        return skip_out(x, self.W_skip)


# --- SAE-Lens ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TopKTranscoderSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of a TopK transcoder."""

    module_class: ClassVar[type[Replacement]] = TopKTranscoder


@dataclass(kw_only=True)
class TopKSkipTranscoderSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of a TopK skip transcoder."""

    module_class: ClassVar[type[Replacement]] = SkipTranscoder


class TopKTranscoderSAE(TranscoderMath, ReplacementSAE):
    """A TopK transcoder as an SAE-Lens SAE."""


class TopKSkipTranscoderSAE(SkipMath, ReplacementSAE):
    """A TopK skip transcoder as an SAE-Lens SAE; the skip term survives encode/decode."""

    W_skip: nn.Parameter


__all__ = [
    "TranscoderConfig",
    "TranscoderMath",
    "SkipMath",
    "TopKTranscoder",
    "SkipTranscoder",
    "TopKTranscoderSAEConfig",
    "TopKSkipTranscoderSAEConfig",
    "TopKTranscoderSAE",
    "TopKSkipTranscoderSAE",
]
