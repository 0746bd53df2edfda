"""TopK transcoders and skip transcoders: the neuron-level baselines MxD is compared with.

    a = TopK_k(ReLU(W_enc^T x + b_enc))
    y = W_dec^T a + b_dec  (+ W_skip x for a skip transcoder)

Weight names and shapes follow SAE-Lens (W_skip is [d_out, d_in] as there), so the
same tensors serve both libraries.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mxd_lens.config import TranscoderConfig
from mxd_lens.functional import (
    linear_init_,
    skip_out,
    topk_relu,
    transcoder_combine,
    unit_norm_rows_,
    unit_pre,
)
from mxd_lens.replacement import Replacement


class TopKTranscoder(Replacement):
    """A TopK transcoder. Hooks: `hook_in`, `hook_latent_pre`, `hook_latent_acts`,
    `hook_error`, `hook_out`."""

    cfg: TranscoderConfig
    architecture = "topk_transcoder"
    acts_hook_name = "hook_latent_acts"

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__(cfg)
        kw = self._param_kwargs()
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.empty(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out, **kw))
        self.b_dec = nn.Parameter(torch.empty(cfg.d_out, **kw))
        self.hook_in = HookPoint()
        self.hook_latent_pre = HookPoint()
        self.hook_latent_acts = HookPoint()
        self.reset_parameters()
        self.setup()

    def reset_parameters(self) -> None:
        """Encoder as nn.Linear, zero encoder bias; decoder rows of norm 0.1 so that
        the initial output is small; zero output bias."""
        linear_init_(self.W_enc, self.cfg.d_in)
        with torch.no_grad():
            self.b_enc.zero_()
            self.W_dec.normal_()
            self.b_dec.zero_()
        unit_norm_rows_(self.W_dec)
        with torch.no_grad():
            self.W_dec.mul_(0.1)

    def skip(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"] | None:
        """The skip term (None for a plain transcoder)."""
        return None

    def latent_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """W_enc^T x + b_enc (before `hook_latent_pre`)."""
        return unit_pre(x, self.W_enc, self.b_enc)

    def reconstruct(self, x: Float[Tensor, "... d_in"], hooked: bool = True) -> Float[Tensor, "... d_out"]:
        self.check_input(x)
        h = self.hook_fn(hooked)
        x = h(self.hook_in, x)
        sparse = topk_relu(h(self.hook_latent_pre, self.latent_pre(x)), self.cfg.k)
        return transcoder_combine(self.mix(sparse, self.W_dec, hooked), self.b_dec, self.skip(x))


class SkipTranscoder(TopKTranscoder):
    """A TopK transcoder plus a learned linear skip connection W_skip [d_out, d_in]
    (zero at init)."""

    architecture = "topk_skip_transcoder"

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__(cfg)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, **self._param_kwargs()))

    def skip(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return skip_out(x, self.W_skip)
