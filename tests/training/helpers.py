"""Small builders shared by the training tests."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig


def tiny_model(seed: int = 0, **overrides) -> HookedTransformer:
    """A random 2-layer gated pre-norm HookedTransformer (fold_ln=True style: RMSPre)."""
    kw = dict(
        n_layers=2, d_model=32, d_mlp=48, n_ctx=16, d_head=8, n_heads=4, d_vocab=61,
        act_fn="silu", gated_mlp=True, normalization_type="RMSPre", seed=seed,
    )
    kw.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**kw))
    model.eval()
    return model


def tiny_tokens(rows: int, ctx: int = 16, vocab: int = 61, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, ctx), generator=torch.Generator().manual_seed(seed))


def tiny_modules(d: int = 32, seed: int = 0) -> dict[str, MxD | TopKTranscoder]:
    """One module of each architecture at odd sizes."""
    torch.manual_seed(seed)
    return {
        "mxd": MxD(MxDConfig(d_in=d, d_out=d, d_hidden=24, n_experts=37, k=5, act_fn="silu", glu=True)),
        "tc": TopKTranscoder(TranscoderConfig(d_in=d, d_out=d, d_sae=53, k=5)),
        "stc": SkipTranscoder(TranscoderConfig(d_in=d, d_out=d, d_sae=53, k=5)),
    }
