"""Mixture of Decoders (Oldfield et al. 2025): a sparse, full-rank replacement for an MLP.

    z = phi(E^T x + b_E)                    dense hidden units (times E_glu^T x if gated)
    a = TopK_k(ReLU(G^T x + b_G))           expert coefficients, k non-zero per token
    y = (C^T a) * (D^T z) + b

Expert n is the full-rank linear map W_n = D diag(c_n) applied to z, and
sum_n a_n W_n^T z = (C^T a) * (D^T z), so the layer never forms the W_n.

Parameter names (SAE-Lens reads W_enc/b_enc/W_dec/b_dec as the sparse units' encoder
and decoder; here the experts are the units):

| name | paper | shape |
| --- | --- | --- |
| W_enc, b_enc | G, b_G: expert gate | [d_in, n_experts], [n_experts] |
| W_dec | C: expert matrix, row n = c_n | [n_experts, d_out] |
| b_dec | b: output bias | [d_out] |
| W_hidden, b_hidden | E, b_E: dense encoder | [d_in, d_hidden], [d_hidden] |
| W_hidden_lin | E_glu: linear half of a gated layer | [d_in, d_hidden] |
| W_out | D: dense decoder | [d_hidden, d_out] |
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mxd_lens.config import MxDConfig
from mxd_lens.functional import (
    act_fn,
    linear_init_,
    mxd_combine,
    mxd_hidden,
    remove_parallel_grad_,
    topk_relu,
    unit_pre,
    unit_norm_rows_,
)
from mxd_lens.replacement import Replacement


class MxD(Replacement):
    """A Mixture of Decoders layer. Hooks: `hook_in`, `hook_hidden` (z),
    `hook_gate_pre` (gate logits before ReLU/TopK), `hook_expert_acts` (a),
    `hook_error`, `hook_out`."""

    cfg: MxDConfig
    architecture = "mxd"
    acts_hook_name = "hook_expert_acts"

    def __init__(self, cfg: MxDConfig) -> None:
        super().__init__(cfg)
        kw = self._param_kwargs()
        d_in, d_out, h, n = cfg.d_in, cfg.d_out, cfg.d_hidden, cfg.n_experts
        self.W_hidden = nn.Parameter(torch.empty(d_in, h, **kw))
        self.b_hidden = nn.Parameter(torch.empty(h, **kw))
        self.W_hidden_lin = nn.Parameter(torch.empty(d_in, h, **kw)) if cfg.glu else None
        self.W_out = nn.Parameter(torch.empty(h, d_out, **kw))
        self.W_enc = nn.Parameter(torch.empty(d_in, n, **kw))
        self.b_enc = nn.Parameter(torch.empty(n, **kw))
        self.W_dec = nn.Parameter(torch.empty(n, d_out, **kw))
        self.b_dec = nn.Parameter(torch.empty(d_out, **kw))
        self._act = act_fn(cfg.act_fn)

        self.hook_in = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_gate_pre = HookPoint()
        self.hook_expert_acts = HookPoint()
        self.reset_parameters()
        self.setup()

    def reset_parameters(self) -> None:
        """The paper's init: nn.Linear defaults for E and G, D = 0 (the layer starts at
        its bias), each c_n uniform(-1, 1) scaled to unit norm, b = 0."""
        d_in = self.cfg.d_in
        for p in (self.W_hidden, self.b_hidden, self.W_hidden_lin, self.W_enc, self.b_enc):
            if p is not None:
                linear_init_(p, d_in)
        with torch.no_grad():
            self.W_out.zero_()
            self.W_dec.uniform_(-1.0, 1.0)
            self.b_dec.zero_()
        unit_norm_rows_(self.W_dec)

    # --- the math ----------------------------------------------------------------
    def hidden(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_hidden"]:
        """z, the dense hidden units (before `hook_hidden`)."""
        return mxd_hidden(x, self.W_hidden, self.b_hidden, self._act, self.W_hidden_lin)

    def gate_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_experts"]:
        """G^T x + b_G, the expert logits (before `hook_gate_pre`)."""
        return unit_pre(x, self.W_enc, self.b_enc)

    def reconstruct(self, x: Float[Tensor, "... d_in"], hooked: bool = True) -> Float[Tensor, "... d_out"]:
        self.check_input(x)
        h = self.hook_fn(hooked)
        x = h(self.hook_in, x)
        z = h(self.hook_hidden, self.hidden(x))
        sparse = topk_relu(h(self.hook_gate_pre, self.gate_pre(x)), self.cfg.k)
        return mxd_combine(self.mix(sparse, self.W_dec, hooked), z @ self.W_out, self.b_dec)

    # --- inspection --------------------------------------------------------------
    def expert_weight(self, n: int) -> Float[Tensor, "d_hidden d_out"]:
        """Expert n's full linear map W_n = D diag(c_n), acting on z."""
        if not 0 <= n < self.cfg.n_experts:
            raise ValueError(f"expert index n={n} is out of range [0, {self.cfg.n_experts})")
        return self.W_out * self.W_dec[n]

    # --- training helpers (the paper's handling of C) --------------------------------
    def normalize_experts_(self) -> None:
        """Rescale every expert row c_n to unit norm (after each optimiser step)."""
        unit_norm_rows_(self.W_dec)

    def remove_parallel_grads_(self) -> None:
        """Drop the gradient component of each c_n parallel to c_n (before each step)."""
        remove_parallel_grad_(self.W_dec)
