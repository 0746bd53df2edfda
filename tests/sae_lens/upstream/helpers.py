# Adapted from SAE-Lens (https://github.com/decoderesearch/SAELens), tests/helpers.py
# (the stored revision 01c61cc4, whose API matches sae-lens 6.54.12 as installed).
# Copyright (c) 2023 Joseph Bloom. MIT License: see tests/sae_lens/upstream/LICENSE-SAELens.
#
# Copied unchanged: assert_close, assert_not_close, random_params.
# Changed: the architecture lists and `build_sae_cfg_for_arch` build mxd_lens's SAE-Lens
# classes (MxD, TopK transcoder, TopK skip transcoder; our TopK SAE on the MLP output where a
# test needs an SAE that reconstructs its own input) instead of SAE-Lens's own; the hub models SAE-Lens's tests load (tiny-stories-1M, solu-1l) are replaced by tiny random
# HookedTransformers of the same shape family built locally (the hub is unreachable here).
"""What the copied SAE-Lens tests share: config builders for our architectures, the
tiny local models that stand in for SAE-Lens's hub models, and SAE-Lens's asserts."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import SAE, SAEConfig, SAEMetadata
from transformer_lens import HookedTransformerConfig

import mxd_lens  # noqa: F401  (registers our architectures with SAE-Lens)
from mxd_lens.architectures.mxd import MxDSAEConfig
from mxd_lens.architectures.output_sae import OutputSiteSAEConfig
from mxd_lens.architectures.transcoder import TopKSkipTranscoderSAEConfig, TopKTranscoderSAEConfig

ALL_ARCHITECTURES = ["mxd", "topk_transcoder", "topk_skip_transcoder"]
"""Every architecture the copied tests run on (SAE-Lens: standard, gated, jumprelu, topk...)."""
ALL_FOLDABLE_ARCHITECTURES = list(ALL_ARCHITECTURES)
"""All of ours fold their decoder norms (SAE-Lens's TopK does not unless
rescale_acts_by_decoder_norm): the units are selected on the unfolded pre-activations."""

OUTPUT_SITE_SAE = "mlp_out_topk_sae"
"""Our TopK SAE on the MLP output (input hook == output hook), where a test is about an SAE
that reconstructs its own input (test_hooked_sae.py's error term)."""

_CONFIG_CLASSES: dict[str, type[SAEConfig]] = {
    "mxd": MxDSAEConfig,
    "topk_transcoder": TopKTranscoderSAEConfig,
    "topk_skip_transcoder": TopKSkipTranscoderSAEConfig,
    OUTPUT_SITE_SAE: OutputSiteSAEConfig,
}


def build_sae_cfg_for_arch(architecture: str, **kwargs: Any) -> SAEConfig:
    """SAE-Lens's defaults (d_in=64, d_sae=256, float32, cpu, no normalisation) plus what
    our configs need: d_out (= d_in unless given), k (16, at most d_sae) and, for an MxD,
    the dense width d_hidden (32)."""
    cfg: dict[str, Any] = {
        "d_in": 64,
        "d_sae": 256,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
    }
    cfg.update(kwargs)
    cfg.setdefault("d_out", cfg["d_in"])
    cfg.setdefault("k", min(16, cfg["d_sae"]))
    if architecture == "mxd":
        cfg.setdefault("d_hidden", 32)
    return _CONFIG_CLASSES[architecture](**cfg)


def build_hooked_sae(
    architecture: str, d_model: int, layer: int, model_name: str, seed: int = 0, **metadata: Any
) -> SAE:
    """Our `architecture` as a transcoder of block `layer`'s MLP (SAE-Lens's transcoder tests'
    hooks: blocks.L.mlp.hook_in -> blocks.L.hook_mlp_out; an SAE on the MLP output reads and
    writes blocks.L.hook_mlp_out), d_sae = 2 d_model as SAE-Lens's test SAEs, k = 8. Every weight is drawn from N(0, 0.1^2): our initialisations set an
    MxD's dense decoder D and a skip transcoder's W_skip to zero, which would hide the
    dense branch and the skip term (and give an MxD's gate no gradient)."""
    dense_width = {"d_hidden": 4 * d_model} if architecture == "mxd" else {}
    hook_out = f"blocks.{layer}.hook_mlp_out"
    reads_output = _CONFIG_CLASSES[architecture].input_site == "mlp_out"
    cfg = build_sae_cfg_for_arch(
        architecture,
        d_in=d_model,
        d_sae=2 * d_model,
        k=8,
        metadata=SAEMetadata(
            model_name=model_name,
            hook_name=hook_out if reads_output else f"blocks.{layer}.mlp.hook_in",
            hook_name_out=hook_out,
            hook_head_index=None,
            prepend_bos=True,
            **metadata,
        ),
        **dense_width,
    )
    sae = SAE.from_dict(cfg.to_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return sae


# --- the local stand-ins for SAE-Lens's hub models ----------------------------------------
TINYSTORIES_MODEL = "tiny-stories-1M-like (local, random)"
"""Name recorded in the test SAEs' metadata; the model itself is `tiny_stories_like_cfg`."""
SOLU_1L_MODEL = "solu-1l-like (local, random)"


@lru_cache(maxsize=1)
def local_tokenizer() -> Any:
    """The default model's tokenizer (SmolLM2's, from the local cache): the string prompts
    of SAE-Lens's tests need one, and the GPT-Neo/GPT-2 tokenizers of the hub models are
    not available offline."""
    from transformers import AutoTokenizer

    from mxd_lens.sources.model import default_model_folder, prepare_default_model

    prepare_default_model()
    return AutoTokenizer.from_pretrained(str(default_model_folder()))


def tiny_stories_like_cfg(n_layers: int = 4) -> HookedTransformerConfig:
    """tiny-stories-1M's block shape (d_model 64, 16 heads of width 4, d_mlp 256, LayerNorm,
    gelu_new, learned positions) with `n_layers` layers (SAE-Lens's tests use blocks 0-2;
    the hub model has 8), random weights (seed 0) and the local tokenizer's vocabulary."""
    return HookedTransformerConfig(
        d_model=64,
        n_layers=n_layers,
        n_heads=16,
        d_head=4,
        d_mlp=256,
        n_ctx=64,
        d_vocab=len(local_tokenizer()),
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=0,
        device="cpu",
    )


def solu_1l_like_cfg() -> HookedTransformerConfig:
    """solu-1l's family (one block, SoLU-LN MLP, LayerNorm), at d_model 64 with random
    weights (seed 0) instead of the hub model's d_model 512."""
    return HookedTransformerConfig(
        d_model=64,
        n_layers=1,
        n_heads=4,
        d_head=16,
        d_mlp=256,
        n_ctx=64,
        d_vocab=len(local_tokenizer()),
        act_fn="solu_ln",
        normalization_type="LN",
        seed=0,
        device="cpu",
    )


# --- copied from SAE-Lens unchanged ---------------------------------------------------------
def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    allow_subclasses: bool = True,
    atol: float | None = 1e-8,
    rtol: float | None = 1e-5,
    equal_nan: bool = False,
    check_device: bool = True,
    check_dtype: bool = True,
    check_layout: bool = True,
    check_stride: bool = False,
    msg: str | None = None,
) -> None:
    """
    torch.testing.assert_close() with torch.allclose() defaults (atol=1e-8, rtol=1e-5).

    Pass a message string to customize the error header instead of writing lambda functions.
    """
    final_msg = msg and (lambda error_msg: f"{msg}\n\n{error_msg}")

    torch.testing.assert_close(
        actual,
        expected=expected,
        allow_subclasses=allow_subclasses,
        atol=atol,
        rtol=rtol,
        equal_nan=equal_nan,
        check_device=check_device,
        check_dtype=check_dtype,
        check_layout=check_layout,
        check_stride=check_stride,
        msg=final_msg,
    )


def assert_not_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    allow_subclasses: bool = True,
    atol: float | None = 1e-8,
    rtol: float | None = 1e-5,
    equal_nan: bool = False,
    check_device: bool = True,
    check_dtype: bool = True,
    check_layout: bool = True,
    check_stride: bool = False,
    msg: str | None = None,
) -> None:
    """
    Assert that two tensors are NOT close to each other.
    """
    with pytest.raises(AssertionError):
        assert_close(
            actual,
            expected=expected,
            allow_subclasses=allow_subclasses,
            atol=atol,
            rtol=rtol,
            equal_nan=equal_nan,
            check_device=check_device,
            check_dtype=check_dtype,
            check_layout=check_layout,
            check_stride=check_stride,
            msg=msg,
        )


def random_params(model: torch.nn.Module) -> None:
    """
    Fill the parameters of a model with random values.
    """
    for param in model.parameters():
        param.data = torch.rand_like(param)
    for buffer in model.buffers():
        buffer.data = torch.rand_like(buffer)
