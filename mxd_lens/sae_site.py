"""A TopK SAE on an MLP's output (`blocks.L.hook_mlp_out`) as an mxd_lens replacement.

The SAE is trained by SAE-Lens's own runner (`LanguageModelSAETrainingRunner`, wandb off)
on our model and corpus; `OutputSiteSAE.from_sae_lens` wraps its weights. The wrapper has
`cfg.input_site = "mlp_out"`, so `attach` runs the original MLP and feeds the SAE that
output (never the MLP's input), and its latent activations sit at `hook_latent_acts`
like a transcoder's, so patching, steering and inspection treat all three alike.

    a = TopK_k(ReLU(W_enc^T y + b_enc))     y: the MLP output
    y_hat = W_dec^T a + b_dec

SAE-Lens's subtraction of b_dec from the input is folded into b_enc
(b_enc - W_enc^T b_dec), so the wrapper is exactly a TopK transcoder that reads the MLP
output, and saves and loads like one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mxd_lens.config import TranscoderConfig
from mxd_lens.io import ARCHITECTURES
from mxd_lens.saelens import register_module_class
from mxd_lens.transcoder import TopKTranscoder


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
    architecture = "mlp_out_topk_sae"

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


# `mxd_lens.load` reads saved OutputSiteSAE folders once this module is imported.
ARCHITECTURES.setdefault(OutputSiteSAE.architecture, (OutputSiteSAE, OutputSAEConfig))
register_module_class(OutputSiteSAE)  # its folders load in SAE-Lens too


@dataclass
class SAETrainConfig:
    """How `train_output_sae` runs SAE-Lens's training runner."""

    d_sae: int
    """Number of latents."""
    k: int
    """TopK K."""
    training_tokens: int = 200_000
    """Tokens of MLP output to train on."""
    lr: float = 4e-4
    """Adam learning rate."""
    batch_size_tokens: int = 1024
    """Tokens per optimiser step."""
    store_batch_size_prompts: int = 8
    """Rows the model runs per activation-store batch."""
    n_batches_in_buffer: int = 8
    """Activation-store buffer size, in store batches."""
    seed: int = 0
    """Seed of SAE-Lens's runner."""
    output_path: str | None = None
    """Where SAE-Lens writes its final SAE folder (None: nothing written)."""


def train_output_sae(
    model: Any,
    layer: int,
    tokens: Int[Tensor, "rows ctx"],
    cfg: SAETrainConfig,
) -> OutputSiteSAE:
    """Train a TopK SAE on `blocks.{layer}.hook_mlp_out` with SAE-Lens's runner
    (`train_sae_lens`) and return it wrapped as an `OutputSiteSAE`."""
    sae = train_sae_lens(model, layer, tokens, cfg)
    module = OutputSiteSAE.from_sae_lens(sae, layer=layer, model_name=getattr(model.cfg, "model_name", None))
    return module.to(next(model.parameters()).dtype)


def train_sae_lens(model: Any, layer: int, tokens: Int[Tensor, "rows ctx"], cfg: SAETrainConfig) -> Any:
    """SAE-Lens's `LanguageModelSAETrainingRunner` on `blocks.{layer}.hook_mlp_out`, with our
    model and token rows given as overrides and wandb off; returns SAE-Lens's trained
    TopK `TrainingSAE`."""
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [rows, ctx], got shape {tuple(tokens.shape)}")
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has layers 0..{n_layers - 1}")
    ctx = tokens.shape[1]
    available = tokens.numel()
    if cfg.training_tokens > available * 4:
        raise ValueError(
            f"training_tokens={cfg.training_tokens:,} but only {available:,} tokens were given; "
            "SAE-Lens would cycle them more than 4 times"
        )
    hook_name = f"blocks.{layer}.hook_mlp_out"
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=model.cfg.d_model,
            d_sae=cfg.d_sae,
            k=cfg.k,
            dtype="float32",
            device="cpu",
            apply_b_dec_to_input=True,
            normalize_activations="none",
        ),
        model_name=getattr(model.cfg, "model_name", "model"),
        hook_name=hook_name,
        dataset_path="in-memory",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=ctx,
        prepend_bos=False,
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.batch_size_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        n_batches_in_buffer=cfg.n_batches_in_buffer,
        lr=cfg.lr,
        lr_end=cfg.lr,
        seed=cfg.seed,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=cfg.output_path,
        n_batches_for_norm_estimate=1,
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_model=model, override_dataset=dataset)
    return runner.run()


__all__ = ["OutputSAEConfig", "OutputSiteSAE", "SAETrainConfig", "train_output_sae", "train_sae_lens"]
