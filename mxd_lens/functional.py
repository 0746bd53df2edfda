"""The math shared by every replacement layer, written once.

MxD, the TopK transcoders and the SAE-Lens classes all call these functions, so the
TransformerLens-side and SAE-Lens-side modules cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
"""Activation functions of the dense hidden units z, by the names TransformerLens uses."""


def act_fn(name: str) -> Callable[[Tensor], Tensor]:
    """Look up an activation function, with an error that lists the known ones."""
    try:
        return ACT_FNS[name]
    except KeyError:
        raise ValueError(f"act_fn={name!r} is not supported; expected one of {sorted(ACT_FNS)}") from None


class TopK(NamedTuple):
    """The K largest ReLU'd pre-activations of each token, as a sparse (values, indices) pair."""

    values: Float[Tensor, "tokens k"]
    """ReLU of the selected pre-activations (some may be 0 when fewer than k are positive)."""
    indices: Int[Tensor, "tokens k"]
    """Which units were selected."""


def topk_relu(pre: Float[Tensor, "tokens n"], k: int) -> TopK:
    """TopK_k(ReLU(pre)): exactly k kept per token (ReLU then makes some of them 0)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return TopK(F.relu(values), indices)


def densify(sparse: TopK, n: int) -> Float[Tensor, "tokens n"]:
    """Scatter a sparse TopK into a dense [tokens, n] tensor (differentiable in the values)."""
    dense = sparse.values.new_zeros(*sparse.values.shape[:-1], n)
    return dense.scatter(-1, sparse.indices, sparse.values)


def sparse_mix(sparse: TopK, rows: Float[Tensor, "n d_out"]) -> Float[Tensor, "tokens d_out"]:
    """sum_k values[t, k] * rows[indices[t, k]]: touches only the selected rows.

    `embedding_bag` gathers and sums the K rows in one kernel and its backward writes
    gradients only into those rows, so neither pass ever forms a [tokens, n] product.
    """
    out = F.embedding_bag(
        sparse.indices, rows, per_sample_weights=sparse.values.to(rows.dtype), mode="sum"
    )
    return out.to(torch.promote_types(sparse.values.dtype, rows.dtype))


def dense_mix(acts: Float[Tensor, "tokens n"], rows: Float[Tensor, "n d_out"]) -> Float[Tensor, "tokens d_out"]:
    """acts @ rows: the reference form of `sparse_mix`, used when hooks may edit acts."""
    return acts @ rows


def mxd_hidden(
    x: Float[Tensor, "tokens d_in"],
    W_hidden: Float[Tensor, "d_in d_hidden"],
    b_hidden: Float[Tensor, " d_hidden"],
    act: Callable[[Tensor], Tensor],
    W_hidden_lin: Float[Tensor, "d_in d_hidden"] | None = None,
) -> Float[Tensor, "tokens d_hidden"]:
    """z = phi(E^T x + b_E), times (E_glu^T x) in the gated variant."""
    z = act(x @ W_hidden + b_hidden)
    if W_hidden_lin is not None:
        z = z * (x @ W_hidden_lin)
    return z


def mxd_combine(
    mix: Float[Tensor, "tokens d_out"],
    dense_out: Float[Tensor, "tokens d_out"],
    bias: Float[Tensor, " d_out"],
) -> Float[Tensor, "tokens d_out"]:
    """y = (C^T a) * (D^T z) + b: the expert mixture modulates the dense decoder's output."""
    return mix * dense_out + bias


def unit_norm_rows_(weight: Tensor, eps: float = 1e-12) -> None:
    """Rescale every row of `weight` to unit L2 norm, in place."""
    with torch.no_grad():
        weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(eps))


def remove_parallel_grad_(weight: Tensor) -> None:
    """Drop the part of each row's gradient that is parallel to the row itself.

    With rows kept at unit norm that component only changes the norm, which the
    renormalisation after the step would undo anyway; removing it keeps Adam's
    moment estimates about directions only.
    """
    if weight.grad is None:
        return
    with torch.no_grad():
        w = weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        weight.grad.sub_((weight.grad * w).sum(-1, keepdim=True) * w)


def linear_init_(weight: Tensor, fan_in: int) -> None:
    """nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), in place."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def unit_pre(
    x: Float[Tensor, "tokens d_in"], W_enc: Float[Tensor, "d_in n"], b_enc: Float[Tensor, " n"]
) -> Float[Tensor, "tokens n"]:
    """W_enc^T x + b_enc: an MxD's gate logits (G, b_G) or a transcoder's latent pre-activations."""
    return x @ W_enc + b_enc


def skip_out(x: Float[Tensor, "tokens d_in"], W_skip: Float[Tensor, "d_out d_in"]) -> Float[Tensor, "tokens d_out"]:
    """W_skip x, with W_skip stored [d_out, d_in] as in SAE-Lens."""
    return x @ W_skip.T


def topk_mix(sparse: TopK, rows: Float[Tensor, "n d_out"]) -> Float[Tensor, "... d_out"]:
    """`sparse_mix` for any number of leading (batch, position) dimensions."""
    lead, k = sparse.values.shape[:-1], sparse.values.shape[-1]
    flat = TopK(sparse.values.reshape(-1, k), sparse.indices.reshape(-1, k))
    return sparse_mix(flat, rows).reshape(*lead, rows.shape[-1])


class _SelectedPre(torch.autograd.Function):
    """pre[t, idx[t, j]] for pre = x @ W + b computed without autograd, with a backward
    that touches only the selected units: dL/dW = x^T G with G the [tokens, n] matrix
    that is non-zero at the K selected entries per token, as one sparse-dense product
    (K/n of the dense product's work; the dense gradient of pre is exactly zero
    elsewhere, since TopK passes no gradient to unselected units)."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor, pre: Tensor, idx: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, W, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, W, idx = ctx.saved_tensors
        tokens, k = idx.shape
        n = W.shape[1]
        flat_idx, flat_grad = idx.reshape(-1), grad.reshape(-1)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            rows = torch.arange(tokens, device=idx.device).repeat_interleave(k)
            g = torch.sparse_coo_tensor(
                torch.stack([flat_idx, rows]), flat_grad.to(W.dtype), (n, tokens), check_invariants=False
            )
            grad_W = torch.sparse.mm(g, x.to(W.dtype)).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n, dtype=W.dtype, device=W.device).index_add_(0, flat_idx, flat_grad.to(W.dtype))
        if ctx.needs_input_grad[0]:
            grad_x = (grad.unsqueeze(-1).to(W.dtype) * W.t()[idx]).sum(1).to(x.dtype)
        return grad_x, grad_W, grad_b, None, None


def select_topk(
    x: Float[Tensor, "tokens d_in"],
    W: Float[Tensor, "d_in n"],
    b: Float[Tensor, " n"],
    pre: Float[Tensor, "tokens n"],
    idx: Int[Tensor, "tokens k"],
) -> TopK:
    """TopK(ReLU(pre[idx]), idx) for pre = x @ W + b computed without autograd: the
    gradient reaches only the selected units of W and b (the training fast path)."""
    return TopK(torch.relu(_SelectedPre.apply(x, W, b, pre, idx)), idx)


def squared_error_sums(y_hat: Tensor, y: Tensor) -> tuple[float, float]:
    """(sum ||y_hat - y||^2, sum ||y||^2) in float64: NMSE over many batches is the ratio
    of these sums (`nmse` of one batch with norm='batch' is the same ratio)."""
    y = y.double()
    return float((y_hat.double() - y).pow(2).sum()), float(y.pow(2).sum())


def nmse(y_hat: Tensor, y: Tensor, norm: str = "batch") -> Tensor:
    """Normalised squared error in fp32 over the leading dimensions.

    'batch': sum ||y_hat - y||^2 / sum ||y||^2 (the training loss and the reported
    NMSE: scale-invariant, weighs tokens by their target energy); 'token': the mean over
    tokens of ||e||^2 / ||y||^2.
    """
    err = (y_hat.float() - y.float()).pow(2).sum(-1)
    energy = y.float().pow(2).sum(-1)
    if norm == "batch":
        return err.sum() / energy.sum().clamp_min(1e-12)
    if norm == "token":
        return (err / energy.clamp_min(1e-12)).mean()
    raise ValueError(f"norm={norm!r}; expected 'batch' or 'token'")


def transcoder_combine(
    mix: Float[Tensor, "tokens d_out"], b_dec: Float[Tensor, " d_out"], skip: Float[Tensor, "tokens d_out"] | None = None
) -> Float[Tensor, "tokens d_out"]:
    """y = W_dec^T a + b_dec (+ W_skip x for a skip transcoder)."""
    y = mix + b_dec
    return y if skip is None else y + skip
