"""Data-dependent initialisations and the training options that go with them.

The trainer calls four functions, each a no-op under the default `TrainerConfig`, so
today's training is unchanged unless an option is switched on:

| when | function | options |
| --- | --- | --- |
| before training (on rank 0's weights, then broadcast) | `prepare_` | `warm_start_dense`, `expert_init_noise` |
| at step 0, on the step's own batch | `init_from_data_` | `gate_init`, `center_encoder`, `warm_start_dense` (gate scale; `warm_start_gate_scale`: a flat gate), `zero_decoder`, `unit_norm_decoder` |
| building the optimiser | `optimizer_groups` | `gate_lr_scale`, `experts_lr_scale`, `dense_lr_scale` |
| around every optimiser step | `constrain_grads_` / `constrain_rows_` | `unit_norm_decoder` |

Everything goes through the Replacement/UnitMath interface (W_enc, b_enc, W_dec,
`param_groups`, `warm_start_from_mlp`, `unit_norm_decoder`), so the same option means
the same thing for every architecture: an MxD's gate G, b_G is its W_enc, b_enc, exactly
as a transcoder's encoder is.

Data statistics are computed from the step's batch `x` as the trainer sees it. With
several data-parallel processes each holds a share of the global batch; every statistic
here is a sum over tokens reduced with `distributed.all_reduce_` and divided by the
global batch size (`TrainerConfig.batch_size`), as the trainer's own output-bias
initialisation does, so every process computes the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mxd_lens.architectures.base import Replacement
from mxd_lens.functional import TopK, remove_parallel_grad_, unit_norm_rows_
from mxd_lens.training import distributed
from mxd_lens.training.config import TrainerConfig


# --- before training ----------------------------------------------------------------------
@torch.no_grad()
def prepare_(module: Replacement, model: Any, layer: int, cfg: TrainerConfig) -> bool:
    """Data-free initialisations that need the model: the warm start of a dense branch
    from `model.blocks[layer].mlp` (`warm_start_dense`; architectures without a dense
    branch ignore it) and diversified expert rows (`expert_init_noise`). Call on every
    process before the weights are broadcast from rank 0. True when the module changed."""
    changed = False
    if cfg.warm_start_dense:
        changed = module.warm_start_from_mlp(model.blocks[layer].mlp) or changed
    if cfg.expert_init_noise is not None and module.unit_norm_decoder:
        diversified_rows_(module.W_dec, cfg.expert_init_noise)
        changed = True
    return changed


@torch.no_grad()
def diversified_rows_(rows: Float[Tensor, "n d"], noise: float, generator: torch.Generator | None = None) -> None:
    """rows[n] = (1 + noise * eps_n) / ||1 + noise * eps_n||, eps_n ~ N(0, I): unit rows
    spread about the constant direction 1/sqrt(d). noise -> 0 makes every expert the same
    map (collapse); noise >> 1 approaches random directions (the paper's uniform init
    normalised). The rows' NORM is not a lever: the unit-norm constraint resets it after
    every step, so the spread is the only scale the expert rows have."""
    eps = torch.randn(rows.shape, generator=generator, dtype=torch.float32).to(rows.device)
    rows.copy_((1.0 + noise * eps).to(rows.dtype))
    unit_norm_rows_(rows)


# --- at step 0 ----------------------------------------------------------------------------
def _global_mean(t: Float[Tensor, "tokens d"], cfg: TrainerConfig, ctx: distributed.DistContext) -> Tensor:
    """The mean over the global batch of a per-token statistic (float64)."""
    return distributed.all_reduce_(t.double().sum(0), ctx) / cfg.batch_size


@torch.no_grad()
def kmeans_columns(
    x: Float[Tensor, "tokens d_in"],
    init: Float[Tensor, "d_in n"],
    iters: int,
    ctx: distributed.DistContext = distributed.DistContext(),
) -> Float[Tensor, "d_in n"]:
    """Spherical k-means (Lloyd) of the token directions x_t / ||x_t||, with the columns of
    `init` as the starting centroids; returns unit centroid directions [d_in, n].

    Each iteration assigns every token to the centroid of highest cosine and moves each
    centroid to the normalised sum of its tokens (sums reduced over the processes); a
    centroid that no token chose keeps its direction. Starting from the module's own
    (rank-0, broadcast) columns makes the result identical on every process. With more
    centroids than tokens (a first batch of 512 tokens, thousands of experts) at most
    `tokens` columns move to the data and the others stay random."""
    xs = x.double()
    xs = xs / xs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cent = init.double()
    cent = cent / cent.norm(dim=0, keepdim=True).clamp_min(1e-12)
    n = cent.shape[1]
    for _ in range(iters):
        assign = (xs @ cent).argmax(-1)
        sums = torch.zeros(n, xs.shape[1], dtype=torch.float64, device=xs.device).index_add_(0, assign, xs)
        counts = torch.zeros(n, dtype=torch.float64, device=xs.device).index_add_(
            0, assign, torch.ones_like(assign, dtype=torch.float64)
        )
        distributed.all_reduce_many_([sums, counts], ctx)
        moved = counts > 0
        new = sums.T / sums.norm(dim=-1).clamp_min(1e-12)
        cent = torch.where(moved[None, :], new, cent)
    return cent


@torch.no_grad()
def center_encoder_(module: Replacement, mean_x: Float[Tensor, " d_in"]) -> None:
    """b_enc = -W_enc^T mean(x): the units' pre-activations have mean zero on the data
    (sparsify's initialisation), so TopK starts by ranking how each token differs from
    the average token rather than by a shared offset."""
    module.b_enc.copy_(-(mean_x.to(module.W_enc.dtype) @ module.W_enc))


@torch.no_grad()
def init_from_data_(module: Replacement, x: Float[Tensor, "tokens d_in"], cfg: TrainerConfig,
                    ctx: distributed.DistContext = distributed.DistContext()) -> None:
    """The step-0 initialisations from the step's batch `x` (this process's share), in
    this order: k-means gate/encoder columns (`gate_init='kmeans'`, each column keeping
    its norm), the data-centred encoder bias (`center_encoder`), the gate scale of a
    warm-started dense branch (`warm_start_dense`: W_enc and b_enc divided by the mean of
    sum_n a_n over the batch, so that on average C^T a ~ 1 and the layer starts near the
    MLP; TopK-ReLU is positively homogeneous, so this scales every a by the same factor;
    with `warm_start_gate_scale` the gate is first flattened, G *= scale and
    b_G = 1/K - G^T mean(x), so that the sum is ~1 on every token),
    a zero decoder (`zero_decoder`, only where the decoder rows are free) and unit decoder
    rows (`unit_norm_decoder`)."""
    x = x.to(module.W_enc.dtype)
    if cfg.gate_init == "kmeans":
        norms = module.W_enc.norm(dim=0, keepdim=True)
        mean = _global_mean(x, cfg, ctx)
        centred = x.double() - mean  # cluster how tokens differ from the mean token
        cent = kmeans_columns(centred, module.W_enc, cfg.kmeans_iters, ctx)
        module.W_enc.copy_((cent * norms.double()).to(module.W_enc.dtype))
    if cfg.center_encoder:
        center_encoder_(module, _global_mean(x, cfg, ctx))
    if cfg.warm_start_dense and "dense" in module.param_groups():
        if cfg.warm_start_gate_scale is not None:  # a nearly flat gate: sum_n a_n ~ 1 on every token
            module.W_enc.mul_(cfg.warm_start_gate_scale)
            mean = _global_mean(x, cfg, ctx).to(module.W_enc.dtype)
            module.b_enc.copy_(1.0 / module.cfg.k - mean @ module.W_enc)
        units = module.activate(module.pre_acts(x))
        values = units.values if isinstance(units, TopK) else units
        mean_sum = float(_global_mean(values.sum(-1, keepdim=True), cfg, ctx))
        if mean_sum > 0:
            module.W_enc.div_(mean_sum)
            module.b_enc.div_(mean_sum)
    if cfg.zero_decoder and not module.unit_norm_decoder:
        module.W_dec.zero_()
    if cfg.unit_norm_decoder:
        unit_norm_rows_(module.W_dec)


# --- the optimiser ------------------------------------------------------------------------
def lr_scales(cfg: TrainerConfig) -> dict[str, float]:
    """Learning-rate multiplier by parameter-group name (`Replacement.param_groups`)."""
    return {"gate": cfg.gate_lr_scale, "experts": cfg.experts_lr_scale, "dense": cfg.dense_lr_scale}


def optimizer_groups(module: Replacement, cfg: TrainerConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per `module.param_groups()` entry with trainable
    parameters, each with its `lr_scale` (the trainer sets lr = schedule * lr_scale every
    step). Groups without a multiplier (a transcoder's single 'all') get 1."""
    scales = lr_scales(cfg)
    groups = []
    for name, params in module.param_groups().items():
        params = [p for p in params if p is not None and p.requires_grad]
        if params:
            scale = scales.get(name, 1.0)
            groups.append({"params": params, "name": name, "lr_scale": scale, "lr": cfg.lr * scale})
    return groups


# --- around every step --------------------------------------------------------------------
def constrain_grads_(module: Replacement, cfg: TrainerConfig) -> None:
    """`unit_norm_decoder`: drop each decoder row's gradient parallel to the row (before the
    step), the MxD authors' handling of their expert rows applied to a transcoder. A module
    that constrains its rows itself (an MxD) already did this."""
    if cfg.unit_norm_decoder and not module.unit_norm_decoder:
        remove_parallel_grad_(module.W_dec)


def constrain_rows_(module: Replacement, cfg: TrainerConfig) -> None:
    """`unit_norm_decoder`: rescale every decoder row to unit norm (after the step)."""
    if cfg.unit_norm_decoder and not module.unit_norm_decoder:
        unit_norm_rows_(module.W_dec)


__all__ = [
    "center_encoder_",
    "constrain_grads_",
    "constrain_rows_",
    "diversified_rows_",
    "init_from_data_",
    "kmeans_columns",
    "lr_scales",
    "optimizer_groups",
    "prepare_",
]
