"""Slow, obvious reference implementations that the fast modules are held to.

Written the way the paper states the math, with no shared code from mxd_lens beyond
`ACT_FNS` (the activation functions are data, not math under test): TopK by sorting
each token, the MxD output as an explicit sum over all N experts of a_n W_n^T z with
W_n = D diag(c_n) built expert by expert, and dense transcoder decoding.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mxd_lens.functional import ACT_FNS


def topk_mask(pre: Float[Tensor, "tokens n"], k: int) -> Float[Tensor, "tokens n"]:
    """1.0 where a unit is among the k largest pre-activations of its token, else 0.

    Token by token with a full sort, so it shares nothing with `torch.topk`.
    """
    flat = pre.detach().reshape(-1, pre.shape[-1])
    mask = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        order = sorted(range(flat.shape[1]), key=lambda i: float(flat[t, i]), reverse=True)
        for i in order[:k]:
            mask[t, i] = 1.0
    return mask.reshape(pre.shape)


def dense_topk_relu(pre: Float[Tensor, "tokens n"], k: int) -> Float[Tensor, "tokens n"]:
    """TopK_k(ReLU(pre)) as a dense tensor: the k largest kept, ReLU'd, the rest exactly 0."""
    return torch.relu(pre) * topk_mask(pre, k)


def mxd_hidden(mxd, x: Float[Tensor, "tokens d_in"]) -> Float[Tensor, "tokens d_hidden"]:
    """z = phi(E^T x + b_E) (times E_glu^T x when gated)."""
    z = ACT_FNS[mxd.cfg.act_fn](x @ mxd.W_hidden + mxd.b_hidden)
    if mxd.cfg.glu:
        z = z * (x @ mxd.W_hidden_lin)
    return z


def mxd_expert_acts(mxd, x: Float[Tensor, "tokens d_in"]) -> Float[Tensor, "tokens n_experts"]:
    """a = TopK_k(ReLU(G^T x + b_G)), dense."""
    return dense_topk_relu(x @ mxd.W_enc + mxd.b_enc, mxd.cfg.k)


def expert_weight(mxd, n: int) -> Float[Tensor, "d_hidden d_out"]:
    """W_n = D diag(c_n), built as a matrix product with an explicit diagonal matrix."""
    return mxd.W_out @ torch.diag(mxd.W_dec[n])


def mxd_forward(
    mxd, x: Float[Tensor, "tokens d_in"], acts: Float[Tensor, "tokens n_experts"] | None = None
) -> Float[Tensor, "tokens d_out"]:
    """y = sum_n a_n W_n^T z + b: every one of the N experts applied as a full linear map.

    `acts` overrides a (to check hook edits); by default a is the TopK of the gate.
    """
    z = mxd_hidden(mxd, x)
    a = mxd_expert_acts(mxd, x) if acts is None else acts
    y = torch.zeros(x.shape[0], mxd.cfg.d_out, dtype=x.dtype)
    for n in range(mxd.cfg.n_experts):
        y = y + a[:, n : n + 1] * (z @ expert_weight(mxd, n))
    return y + mxd.b_dec


def transcoder_forward(tc, x: Float[Tensor, "tokens d_in"]) -> Float[Tensor, "tokens d_out"]:
    """y = W_dec^T TopK(ReLU(W_enc^T x + b_enc)) + b_dec (+ W_skip x), decoded densely."""
    a = dense_topk_relu(x @ tc.W_enc + tc.b_enc, tc.cfg.k)
    y = a @ tc.W_dec + tc.b_dec
    if getattr(tc, "W_skip", None) is not None:
        y = y + torch.einsum("oi,ti->to", tc.W_skip, x)
    return y
