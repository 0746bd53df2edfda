"""Training a TopK SAE on an MLP's output with SAE-Lens's own runner
(`LanguageModelSAETrainingRunner`, wandb off) on our model and corpus, returned as an
`OutputSiteSAE` (mxd_lens trains MxDs and transcoders itself; an SAE on the MLP output is
SAE-Lens's home ground, so SAE-Lens trains it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Int
from torch import Tensor

from mxd_lens.architectures.output_sae import OutputSiteSAE
from mxd_lens.model_io import post_mlp_norm
from mxd_lens.validation import check_layer, check_token_matrix


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
    check_token_matrix(tokens, model.cfg.d_vocab)
    check_layer(layer, model.cfg.n_layers)
    norm = post_mlp_norm(model)
    if norm is not None:
        # SAE-Lens's runner reads the named hook, which is then the normalised output,
        # while an OutputSiteSAE is attached on the MLP's own output: it would be trained
        # on one thing and run on another.
        raise ValueError(
            f"blocks.{layer}.hook_mlp_out of this model is after {norm}, not the MLP's output, so "
            "SAE-Lens's runner cannot train an SAE on the MLP output here; train an MxD or a "
            "transcoder with mxd_lens.training.fit, which captures the MLP's own input and output"
        )
    ctx = tokens.shape[1]
    available = tokens.numel()
    if cfg.training_tokens > available * 4:
        raise ValueError(
            f"training_tokens={cfg.training_tokens:,} but only {available:,} tokens were given; "
            "SAE-Lens would cycle them more than 4 times"
        )
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

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


__all__ = ["SAETrainConfig", "train_output_sae", "train_sae_lens"]
