"""A TopK SAE on an MLP's output (`blocks.L.hook_mlp_out`) as an mxd_lens module.

The wrapper has `cfg.input_site = "mlp_out"`, so `attach` runs the original MLP and feeds
the SAE that output (never the MLP's input), and its latent activations sit at
`hook_latent_acts` like a transcoder's, so patching, steering and inspection treat it
like the other modules.

    a = TopK_k(ReLU(W_enc^T y + b_enc))     y: the MLP output
    y_hat = W_dec^T a + b_dec

`OutputSiteSAE.from_sae_lens` folds SAE-Lens's subtraction of b_dec from the input into
b_enc (b_enc - W_enc^T b_dec), so the wrapper is exactly a TopK transcoder that reads the
MLP output, and saves and loads like one. (Any other SAE-Lens SAE is served as it is by
`mxd_lens.architectures.saelens_adapter`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mxd_lens.architectures.base import Replacement, ReplacementSAE, ReplacementSAEConfig
from mxd_lens.architectures.transcoder import TopKTranscoder, TranscoderConfig, TranscoderMath


@dataclass(kw_only=True)
class OutputSAEConfig(TranscoderConfig):
    """A TopK SAE reading and reconstructing the MLP output (d_in = d_out = d_model)."""

    input_site: str = "mlp_out"
    """Always 'mlp_out': the SAE encodes the MLP's output."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_site != "mlp_out":
            raise ValueError(f"input_site={self.input_site!r}; an OutputSiteSAE reads the MLP output ('mlp_out')")
        if self.d_in != self.d_out:
            raise ValueError(f"an SAE reconstructs its input: d_in={self.d_in} must equal d_out={self.d_out}")


class OutputSiteSAE(TopKTranscoder):
    """A TopK SAE on the MLP output. Hooks: `hook_in` (the MLP output), `hook_latent_pre`,
    `hook_latent_acts`, `hook_error`, `hook_out`."""

    cfg: OutputSAEConfig
    config_class = OutputSAEConfig
    architecture = "mlp_out_topk_sae"
    trainable = False  # trained by SAE-Lens's own runner (mxd_lens.training.sae_lens_runner)

    @classmethod
    def from_sae_lens(cls, sae: Any, layer: int | None = None, model_name: str | None = None) -> "OutputSiteSAE":
        """Wrap a trained SAE-Lens TopK SAE (inference or training class).

        SAE-Lens's `apply_b_dec_to_input` and `rescale_acts_by_decoder_norm` (scale
        pre-activations by ||W_dec_n||, divide the decoder by it) are folded into the
        weights exactly.
        """
        scfg = sae.cfg
        arch = scfg.architecture()
        if arch != "topk":
            raise ValueError(f"expected an SAE-Lens 'topk' SAE, got architecture {arch!r}")
        norm = getattr(scfg, "normalize_activations", "none")
        if norm not in ("none", None):
            raise ValueError(f"normalize_activations={norm!r} is not supported; train with 'none'")
        hook_name = getattr(scfg.metadata, "hook_name", None)
        if layer is None and hook_name:
            layer = int(hook_name.split(".")[1])
        cfg = OutputSAEConfig(
            d_in=scfg.d_in,
            d_out=scfg.d_in,
            d_sae=scfg.d_sae,
            k=scfg.k,
            hook_name=hook_name,
            hook_name_out=hook_name,
            layer=layer,
            model_name=model_name or getattr(scfg.metadata, "model_name", None),
            dtype=str(sae.W_enc.dtype).removeprefix("torch."),
            device=str(sae.W_enc.device),
        )
        module = cls(cfg)
        with torch.no_grad():
            W_enc, b_enc, W_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach()
            if scfg.apply_b_dec_to_input:
                b_enc = b_enc - sae.b_dec.detach() @ W_enc
            if getattr(scfg, "rescale_acts_by_decoder_norm", False):
                scale = W_dec.norm(dim=-1)
                W_enc, b_enc, W_dec = W_enc * scale, b_enc * scale, W_dec / scale[:, None]
            module.W_enc.copy_(W_enc)
            module.b_enc.copy_(b_enc)
            module.W_dec.copy_(W_dec)
            module.b_dec.copy_(sae.b_dec.detach())
        return module


@dataclass(kw_only=True)
class OutputSiteSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of an `OutputSiteSAE` folder."""

    input_site: str = "mlp_out"
    """Always 'mlp_out'."""

    module_class: ClassVar[type[Replacement]] = OutputSiteSAE


class OutputSiteSAEView(TranscoderMath, ReplacementSAE):
    """An `OutputSiteSAE` folder as an SAE-Lens SAE."""


__all__ = ["OutputSAEConfig", "OutputSiteSAE", "OutputSiteSAEConfig", "OutputSiteSAEView"]
