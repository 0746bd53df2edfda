"""The affine map between what mxd_lens modules read and what other tools read.

mxd_lens loads models with fold_ln=True: the MLP of block L then reads
`blocks.L.ln2.hook_normalized` (x / rms(x), or LayerNorm's centred version), the norm's
weight (and bias) having been folded into the MLP's own input weights. Our modules are
trained on exactly that input. Hugging Face's MLP, and so every tool that hooks it
(sparsify's `layers.L.mlp`, circuit-tracer's `mlp.hook_in`), reads the norm's output:

    x_hf = x_ours * weight + bias          (bias: LayerNorm only)

so a module exported to those tools reads x_ours = (x_hf - bias) / weight: its encoder
rows and skip columns are divided by the weight (and the bias moves into the encoder and
output biases). After fold_ln the weight no longer exists in the model, so it is read from
the model's Hugging Face weights through TransformerLens's own conversion
(`get_pretrained_state_dict`: `blocks.L.ln2.w`, which already applies architecture quirks
such as Gemma's 1 + w), without building or processing a HookedTransformer.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

MIN_NORM_WEIGHT = 1e-6
"""Smallest |weight| (relative to the layer's largest) an export divides by: a smaller entry
makes the exported encoder rows that many times larger than the rest, so any rounding of
the tool's activation there is amplified as much (and 0 cannot be divided at all)."""


@dataclass(frozen=True)
class MlpInputNorm:
    """The Hugging Face MLP input of one layer as a function of the module's input:
    x_hf = x_ours * weight + bias."""

    weight: Float[Tensor, " d_model"]
    """The norm's effective weight (all ones when the MLP reads the residual stream directly)."""
    bias: Float[Tensor, " d_model"] | None
    """The norm's bias (LayerNorm), None for RMSNorm."""

    def check_divisible(self, layer: int, min_relative: float = MIN_NORM_WEIGHT) -> None:
        """Raise ValueError naming the entries too small to divide by."""
        w = self.weight.abs()
        limit = float(w.max()) * min_relative
        bad = (w <= limit).nonzero().flatten().tolist()
        if bad:
            shown = ", ".join(f"[{i}]={float(self.weight[i]):.3g}" for i in bad[:5])
            raise ValueError(
                f"layer {layer}: the norm before the MLP has {len(bad)} weight entr{'y' if len(bad) == 1 else 'ies'} "
                f"at most {min_relative:g} x its largest |weight| {float(w.max()):.3g} ({shown}); the exported "
                "encoder divides by them, which would blow those inputs up by that factor (and 0 cannot be divided): "
                "such a module cannot be expressed on the Hugging Face MLP input "
                "(lower the threshold with min_norm_weight= / --min-norm-weight if you accept that)"
            )


@dataclass(frozen=True)
class ModelNorms:
    """What exporters need to know about the model the modules were trained on."""

    name: str
    """The model's name (its folder's name, or the default model's)."""
    source: str
    """Where the weights were read (a Hugging Face folder)."""
    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Width of the residual stream."""
    norms: dict[int, MlpInputNorm]
    """Per layer, the map from the module's input to the Hugging Face MLP input."""


def _resolve_folder(model: str | os.PathLike[str] | None) -> tuple[Path, str]:
    from mxd_lens.sources.model import DEFAULT_MODEL_NAME, _DEFAULT_ALIASES, _ensure_hf_folder

    if model is None or str(model).lower() in _DEFAULT_ALIASES:
        folder, _ = _ensure_hf_folder()
        return folder, DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {str(model)!r} is not a local Hugging Face model folder (no config.json there); exporting "
            "needs the norm weights of the model the modules were trained on: pass its folder, or nothing "
            "for the default SmolLM2-135M-Instruct"
        )
    return path, path.name


def model_norms(model: Any = None) -> ModelNorms:
    """The MLP-input norms of every layer of `model`: None (the default model), a local
    Hugging Face folder, or a HookedTransformer (loaded with fold_ln=False its `ln2`
    weights are read directly; with fold_ln=True from the folder it was loaded from)."""
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        if model.cfg.normalization_type in ("LN", "RMS"):
            norms = {
                layer: MlpInputNorm(
                    block.ln2.w.detach().float().cpu(),
                    None if getattr(block.ln2, "b", None) is None else block.ln2.b.detach().float().cpu(),
                )
                for layer, block in enumerate(model.blocks)
            }
            return ModelNorms(model.cfg.model_name, "HookedTransformer", model.cfg.n_layers, model.cfg.d_model, norms)
        source = getattr(model, "mxd_lens_processing", {}).get("source")
        if source is None or not Path(source).is_dir():
            raise ValueError(
                "this HookedTransformer has its norm weights folded into the MLPs (fold_ln=True) and no local "
                "folder to read them from; pass the model's Hugging Face folder, or the model loaded with "
                "fold_ln=False"
            )
        model = source
    folder, name = _resolve_folder(model)
    return _folder_norms(folder, name)


def _folder_norms(folder: Path, name: str) -> ModelNorms:
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig, AutoModelForCausalLM

    from mxd_lens.sources import _tl_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = AutoConfig.from_pretrained(str(folder))
        match = _tl_config.match_official_name(folder, hf_config)
        cfg, _ = _tl_config.build_config(match, folder, hf_config, fold_ln=False, device="cpu", n_ctx_cap=2048)
        flags = _tl_config.processing_flags(vars(cfg), True)
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        state = loading.get_pretrained_state_dict(match.official_name, cfg, hf_model=hf_model, dtype=torch.float32)
    del hf_model
    norms: dict[int, MlpInputNorm] = {}
    for layer in range(cfg.n_layers):
        weight = state.get(f"blocks.{layer}.ln2.w")
        if not flags["fold_ln"] or weight is None:
            # Not folded by mxd_lens (post-norm OLMo 2...): the MLP reads the same input in both.
            norms[layer] = MlpInputNorm(torch.ones(cfg.d_model), None)
            continue
        bias = state.get(f"blocks.{layer}.ln2.b")
        norms[layer] = MlpInputNorm(weight.detach().float().clone(), None if bias is None else bias.detach().float().clone())
    return ModelNorms(name, str(folder.resolve()), cfg.n_layers, cfg.d_model, norms)


# --- the map, applied to a transcoder's parameters -------------------------------------------
def to_hf_input(
    norm: MlpInputNorm,
    W_enc: Float[Tensor, "d_in n"],
    b_enc: Float[Tensor, " n"],
    b_dec: Float[Tensor, " d_out"],
    W_skip: Float[Tensor, "d_out d_in"] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(W_enc, b_enc, b_dec, W_skip) of the same transcoder reading x_hf instead of x_ours
    (x_ours = (x_hf - bias) / weight), in float64 arithmetic, cast back."""
    dtype = W_enc.dtype
    w = norm.weight.to(torch.float64)
    W_enc_hf = W_enc.double() / w[:, None]
    b_enc_hf = b_enc.double()
    b_dec_hf = b_dec.double()
    W_skip_hf = None if W_skip is None else W_skip.double() / w[None, :]
    if norm.bias is not None:
        b = norm.bias.to(torch.float64)
        b_enc_hf = b_enc_hf - b @ W_enc_hf
        if W_skip_hf is not None:
            b_dec_hf = b_dec_hf - W_skip_hf @ b
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return cast(W_enc_hf), cast(b_enc_hf), cast(b_dec_hf), cast(W_skip_hf)


def from_hf_input(
    norm: MlpInputNorm,
    W_enc_hf: Float[Tensor, "d_in n"],
    b_enc_hf: Float[Tensor, " n"],
    b_dec_hf: Float[Tensor, " d_out"],
    W_skip_hf: Float[Tensor, "d_out d_in"] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The inverse of `to_hf_input` (multiplies by the weight: always safe)."""
    dtype = W_enc_hf.dtype
    w = norm.weight.to(torch.float64)
    b_enc = b_enc_hf.double()
    b_dec = b_dec_hf.double()
    if norm.bias is not None:
        b = norm.bias.to(torch.float64)
        b_enc = b_enc + b @ W_enc_hf.double()
        if W_skip_hf is not None:
            b_dec = b_dec + W_skip_hf.double() @ b
    W_enc = W_enc_hf.double() * w[:, None]
    W_skip = None if W_skip_hf is None else W_skip_hf.double() * w[None, :]
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return cast(W_enc), cast(b_enc), cast(b_dec), cast(W_skip)


__all__ = ["MIN_NORM_WEIGHT", "MlpInputNorm", "ModelNorms", "from_hf_input", "model_norms", "to_hf_input"]
