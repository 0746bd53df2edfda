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

This file holds everything about the architecture: `MxDConfig`, the math shared by the
module and its SAE-Lens view (`MxDMath`), the TransformerLens-side module `MxD`, and the
SAE-Lens classes `MxDSAEConfig` / `MxDSAE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mxd_lens.architectures.base import (
    HookFn,
    Replacement,
    ReplacementConfig,
    ReplacementSAE,
    ReplacementSAEConfig,
    Sizes,
    UnitMath,
)
from mxd_lens.functional import (
    ACT_FNS,
    act_fn,
    linear_init_,
    mxd_combine,
    mxd_hidden,
    remove_parallel_grad_,
    unit_norm_rows_,
)
from mxd_lens.params import match_n_experts
from mxd_lens.validation import check_positive_int


@dataclass(kw_only=True)
class MxDConfig(ReplacementConfig):
    """A Mixture of Decoders: y = (C^T a) * (D^T z) + b with a = TopK_k(ReLU(G^T x + b_G))."""

    d_hidden: int
    """H: width of the dense hidden layer z (the original MLP's d_mlp in the paper)."""
    n_experts: int
    """N: number of experts (rows of C and columns of the gate G)."""
    act_fn: str = "gelu"
    """phi, the activation of the hidden units: 'gelu', 'gelu_new', 'relu' or 'silu'."""
    glu: bool = False
    """Gated hidden layer z = phi(E^T x + b_E) * (E_glu^T x), for gated-MLP models
    (Llama, SmolLM2, Gemma)."""

    units_field: ClassVar[str] = "n_experts"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("d_hidden", self.d_hidden)
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; expected one of {sorted(ACT_FNS)}")


class MxDMath(UnitMath):
    """The MxD's math, for the module and its SAE-Lens view: the context is the dense
    branch D^T z, which the expert mixture C^T a modulates."""

    W_hidden: Tensor
    b_hidden: Tensor
    W_hidden_lin: Tensor | None
    W_out: Tensor
    hidden_hook_name: ClassVar[str]
    """The hook point on z (`hook_hidden` on the module, `hook_mxd_hidden` in SAE-Lens)."""
    context_doc: ClassVar[str | None] = "the dense branch D^T z"

    def hidden(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_hidden"]:
        """z, the dense hidden units (before the hidden hook)."""
        return mxd_hidden(x, self.W_hidden, self.b_hidden, self._act, self.W_hidden_lin)

    def context(self, x: Float[Tensor, "... d_in"], h: HookFn) -> Float[Tensor, "... d_out"]:
        return h(getattr(self, self.hidden_hook_name), self.hidden(x)) @ self.W_out

    def mix_output(self, mix: Tensor, context: Tensor | None) -> Tensor:
        return mix * context

    def combine(self, mix: Tensor, context: Tensor | None) -> Tensor:
        return mxd_combine(mix, context, self.b_dec)

    def fold_input_scale_(self, factor: float) -> None:
        # z = phi(E^T x + b_E) (* E_glu^T x) is not homogeneous in x: E (and E_glu) absorb
        # the scale so that z is unchanged; C /= factor and b /= factor (SAE-Lens's part)
        # then divide the output by it.
        with torch.no_grad():
            for p in (self.W_hidden, self.W_hidden_lin):
                if p is not None:
                    p.mul_(factor)


class MxD(MxDMath, Replacement):
    """A Mixture of Decoders layer. Hooks: `hook_in`, `hook_hidden` (z),
    `hook_gate_pre` (gate logits before ReLU/TopK), `hook_expert_acts` (a),
    `hook_error`, `hook_out`."""

    cfg: MxDConfig
    config_class = MxDConfig
    architecture = "mxd"
    pre_hook_name = "hook_gate_pre"
    acts_hook_name = "hook_expert_acts"
    hidden_hook_name = "hook_hidden"
    extra_nodes = {"dense": "hook_hidden"}
    unit_norm_decoder = True

    def __init__(self, cfg: MxDConfig) -> None:
        super().__init__(cfg)
        kw = self._param_kwargs()
        d_in, d_out, h = cfg.d_in, cfg.d_out, cfg.d_hidden
        self.W_hidden = nn.Parameter(torch.empty(d_in, h, **kw))
        self.b_hidden = nn.Parameter(torch.empty(h, **kw))
        self.W_hidden_lin = nn.Parameter(torch.empty(d_in, h, **kw)) if cfg.glu else None
        self.W_out = nn.Parameter(torch.empty(h, d_out, **kw))
        self._act = act_fn(cfg.act_fn)
        self.hook_hidden = HookPoint()
        self._finish_init()

    @classmethod
    def build(cls, sizes: Sizes, k: int, **common: Any) -> "MxD":
        """The MxD with the most experts whose parameter count does not exceed the TopK
        transcoder's of width `sizes.width` (the paper's matching), H = the model's d_mlp."""
        n = match_n_experts(sizes.d_model, sizes.d_model, sizes.d_hidden, sizes.width, sizes.glu)
        act = sizes.act_fn if sizes.act_fn in ACT_FNS else "gelu"
        return cls(MxDConfig(d_in=sizes.d_model, d_out=sizes.d_model, k=k, d_hidden=sizes.d_hidden,
                             n_experts=n, act_fn=act, glu=sizes.glu, **common))

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

    def gate_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_experts"]:
        """G^T x + b_G, the expert logits (before `hook_gate_pre`)."""
        return self.pre_acts(x)

    # --- inspection --------------------------------------------------------------
    def expert_weight(self, n: int) -> Float[Tensor, "d_hidden d_out"]:
        """Expert n's full linear map W_n = D diag(c_n), acting on z."""
        if not 0 <= n < self.cfg.n_experts:
            raise ValueError(f"expert index n={n} is out of range [0, {self.cfg.n_experts})")
        return self.W_out * self.W_dec[n]

    def metrics(self) -> dict[str, float]:
        return {"expert_cos": expert_cosine(self)}

    # --- training: the paper's handling of C --------------------------------------
    def normalize_experts_(self) -> None:
        """Rescale every expert row c_n to unit norm (after each optimiser step)."""
        unit_norm_rows_(self.W_dec)

    def remove_parallel_grads_(self) -> None:
        """Drop the gradient component of each c_n parallel to c_n (before each step)."""
        remove_parallel_grad_(self.W_dec)

    def before_optimizer_step(self) -> None:
        self.remove_parallel_grads_()

    def after_optimizer_step(self) -> None:
        self.normalize_experts_()

    def param_groups(self) -> dict[str, list[nn.Parameter | None]]:
        """'gate' (G, b_G), 'experts' (C) and 'dense' (E, b_E, E_glu, D and the output bias b)."""
        return {
            "gate": [self.W_enc, self.b_enc],
            "experts": [self.W_dec],
            "dense": [self.W_hidden, self.b_hidden, self.W_hidden_lin, self.W_out, self.b_dec],
        }

    @torch.no_grad()
    def warm_start_from_mlp(self, mlp: nn.Module) -> bool:
        """Make the dense branch the MLP's own: E, b_E (and E_glu) from the MLP's input
        weights, so z = phi(E^T x + b_E) (* E_glu^T x) equals the MLP's hidden units
        (TransformerLens's hook_post) exactly; D = sqrt(d_out) * W_out and b = b_out; every
        expert row c_n = 1/sqrt(d_out) (unit norm, all equal).

        Then (C^T a) * (D^T z) + b = (sum_n a_n) * (W_out^T z) + b: the MLP's output
        exactly when sum_n a_n = 1 (the trainer's `warm_start_dense` rescales the gate on
        the first batch so that this holds on average). With all rows equal every expert is
        the same map, which is collapse: diversify the rows afterwards (the trainer's
        `expert_init_noise`: c_n = normalise(1 + noise * eps_n)), which moves the start
        away from the MLP by about `noise` relative error per output coordinate; the unit-norm
        constraint is why the sqrt(d_out) sits in D rather than in the rows.

        Refuses an MLP whose hidden units this layer cannot reproduce: another width or
        activation, a norm inside the MLP (SoLU), or a gated MLP with a bias added after
        the product (TransformerLens's GatedMLP adds b_in there)."""
        cfg = self.cfg
        W_in, b_in, W_out = (getattr(mlp, name, None) for name in ("W_in", "b_in", "W_out"))
        W_gate = getattr(mlp, "W_gate", None)
        if W_in is None or W_out is None:
            raise ValueError(f"warm_start_from_mlp needs a TransformerLens MLP with W_in and W_out, got {type(mlp).__name__}")
        if tuple(W_in.shape) != (cfg.d_in, cfg.d_hidden) or tuple(W_out.shape) != (cfg.d_hidden, cfg.d_out):
            raise ValueError(
                f"warm_start_from_mlp: the MLP has W_in {tuple(W_in.shape)}, W_out {tuple(W_out.shape)}; this MxD needs "
                f"({cfg.d_in}, {cfg.d_hidden}) and ({cfg.d_hidden}, {cfg.d_out}) (d_hidden = the MLP's d_mlp)"
            )
        mlp_cfg = getattr(mlp, "cfg", None)
        act = getattr(mlp_cfg, "act_fn", None)
        if act != cfg.act_fn:
            raise ValueError(f"warm_start_from_mlp: the MLP's act_fn is {act!r}, this MxD's is {cfg.act_fn!r}")
        if mlp_cfg is not None and mlp_cfg.is_layer_norm_activation():
            raise ValueError(f"warm_start_from_mlp: act_fn={act!r} normalises inside the MLP, which an MxD cannot reproduce")
        if (W_gate is not None) != cfg.glu:
            raise ValueError(f"warm_start_from_mlp: the MLP is {'' if W_gate is not None else 'not '}gated but glu={cfg.glu}")
        kw = {"dtype": self.W_hidden.dtype, "device": self.W_hidden.device}
        if W_gate is not None:  # TransformerLens: post = act(x W_gate) * (x W_in) + b_in
            if b_in is not None and bool(b_in.abs().max() > 0):
                raise ValueError("warm_start_from_mlp: this gated MLP adds b_in after the product; an MxD has no such bias")
            self.W_hidden.copy_(W_gate.to(**kw))
            self.b_hidden.zero_()
            self.W_hidden_lin.copy_(W_in.to(**kw))
        else:  # post = act(x W_in + b_in)
            self.W_hidden.copy_(W_in.to(**kw))
            self.b_hidden.copy_(b_in.to(**kw) if b_in is not None else torch.zeros_like(self.b_hidden))
        self.W_out.copy_(W_out.to(**kw) * cfg.d_out**0.5)
        b_out = getattr(mlp, "b_out", None)
        self.b_dec.copy_(b_out.to(**kw) if b_out is not None else torch.zeros_like(self.b_dec))
        self.W_dec.fill_(cfg.d_out**-0.5)
        return True


def expert_cosine(mxd: MxD, n_sample: int = 512, seed: int = 0) -> float:
    """Mean |cosine| between the flattened expert maps W_n = D diag(c_n) of a random
    sample of `n_sample` experts, over all pairs of the sample: near 1 means collapse.

    Never forms a W_n: column o of W_n is c_no D_:o, so
    <W_n, W_m>_F = sum_o c_no c_mo ||D_:o||^2, and the whole sample's Gram matrix is
    C_s diag(||D_:o||^2) C_s^T. Pairs with a zero map (e.g. D = 0 at init) have no
    cosine and are left out; NaN when no pair is left (or N < 2).
    """
    if not isinstance(mxd, MxD):
        raise ValueError(f"expert_cosine needs an MxD, got {type(mxd).__name__}")
    if isinstance(n_sample, bool) or not isinstance(n_sample, int) or n_sample < 2:
        raise ValueError(f"n_sample={n_sample!r} must be an integer >= 2 (cosines need pairs)")
    n = mxd.cfg.n_experts
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=generator)[: min(n_sample, n)].to(mxd.W_dec.device)
    with torch.no_grad():
        C = mxd.W_dec[sample].double()  # [s, d_out]: rows c_n
        col_sq = mxd.W_out.double().pow(2).sum(0)  # [d_out]: ||D_:o||^2
        gram = (C * col_sq) @ C.T
        norms = gram.diagonal().clamp_min(0).sqrt()
        i, j = torch.triu_indices(len(sample), len(sample), offset=1, device=gram.device)
        denom = norms[i] * norms[j]
        valid = denom > 0
        if not bool(valid.any()):
            return float("nan")
        return float((gram[i, j][valid].abs() / denom[valid]).mean())


# --- SAE-Lens ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class MxDSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of a Mixture of Decoders (d_sae = number of experts)."""

    d_hidden: int
    """Width of the dense hidden layer z."""
    act_fn: str = "gelu"
    """Activation of the hidden units: 'gelu', 'gelu_new', 'relu' or 'silu'."""
    glu: bool = False
    """Gated hidden layer z = act(E^T x + b_E) * (E_glu^T x)."""

    module_class: ClassVar[type[Replacement]] = MxD


class MxDSAE(MxDMath, ReplacementSAE):
    """A Mixture of Decoders as an SAE-Lens SAE (experts are the features). Hooks are
    SAE-Lens's plus `hook_mxd_hidden` (the dense hidden units z)."""

    hidden_hook_name = "hook_mxd_hidden"
    W_hidden: nn.Parameter
    b_hidden: nn.Parameter
    W_out: nn.Parameter

    def __init__(self, cfg: MxDSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        if not cfg.glu:
            self.W_hidden_lin = None
        self._act = act_fn(cfg.act_fn)
        self.hook_mxd_hidden = HookPoint()
        self.setup()


__all__ = ["MxDConfig", "MxDMath", "MxD", "MxDSAEConfig", "MxDSAE", "expert_cosine"]
