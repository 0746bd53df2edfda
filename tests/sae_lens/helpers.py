"""Builders shared by the SAE-Lens interop tests: real modules with every weight random."""

from __future__ import annotations

import torch

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig
from mxd_lens.architectures.output_sae import OutputSAEConfig, OutputSiteSAE
from mxd_lens.replacement import Replacement

ARCHS = ("mxd", "topk_transcoder", "topk_skip_transcoder")
"""The architectures that map the MLP input to its output."""
OUTPUT_SAE = "mlp_out_topk_sae"
"""A TopK SAE on the MLP output, loadable by SAE-Lens like the others."""


def make_module(
    arch: str,
    d_model: int = 16,
    layer: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    scale: float = 0.3,
    **extra,
) -> Replacement:
    """A module of `arch` for a model of width d_model at `layer`, all parameters random
    (so that no zero init can hide a dropped term such as the skip or the dense branch)."""
    common = dict(
        d_in=d_model,
        d_out=d_model,
        k=3,
        layer=layer,
        hook_name=f"blocks.{layer}.ln2.hook_normalized",
        hook_name_out=f"blocks.{layer}.hook_mlp_out",
        dtype=dtype,
        **extra,
    )
    torch.manual_seed(seed)
    if arch == "mxd":
        module = MxD(MxDConfig(d_hidden=2 * d_model + 3, n_experts=13, act_fn="silu", glu=True, **common))
    elif arch == "topk_transcoder":
        module = TopKTranscoder(TranscoderConfig(d_sae=21, **common))
    elif arch == "topk_skip_transcoder":
        module = SkipTranscoder(TranscoderConfig(d_sae=21, **common))
    elif arch == "mlp_out_topk_sae":  # reads and reconstructs the MLP output: one hook
        common.update(hook_name=common["hook_name_out"], input_site="mlp_out")
        module = OutputSiteSAE(OutputSAEConfig(d_sae=21, **common))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module
