"""Configuration of activation collection and training (dataclasses, a docstring per field).

Every config round-trips through JSON (`to_dict` / `from_dict`) and is saved beside the
weights and in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mxd_lens.config import JsonConfig, dtype_name
from mxd_lens.validation import check_non_negative_int as _check_non_negative
from mxd_lens.validation import check_positive_int as _check_positive

LossNorm = Literal["batch", "token"]
Schedule = Literal["constant", "cosine"]


def _check_dtype(name: str, value: str | None) -> None:
    if value is None or value == "auto":
        return
    try:
        dtype_name(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a floating-point dtype (e.g. 'float32', 'bfloat16')") from None


@dataclass(kw_only=True)
class ActivationConfig(JsonConfig):
    """How (MLP input, MLP output) pairs are collected from the language model."""

    model_batch_rows: int = 16
    """Token rows per forward pass of the language model."""
    buffer_tokens: int = 16_384
    """Tokens per shuffling chunk. The rows of a chunk are collected, then its tokens
    are served in a random order; the buffer holds one chunk, so its size in bytes is
    buffer_tokens * n_layers * (d_in + d_out) * itemsize(store_dtype)
    (`ActivationSource.buffer_bytes`). Must be at least the training batch size."""
    shuffle_rows: bool = True
    """Permute the token rows (seeded) before cutting them into chunks, so that a chunk
    mixes the whole corpus rather than a few consecutive pages."""
    autocast: str | None = None
    """Run the language model under torch.autocast with this dtype (e.g. 'bfloat16'):
    ~1.7x faster on CPUs with AMX, at a few % relative error in the MLP output
    (benchmarks/bench_activations.py measures it), but far slower on CPUs without bf16
    units; 'auto' picks bfloat16 only where it measures faster. None: the model's dtype."""
    store_dtype: str = "float32"
    """dtype in which activations are kept in memory and in the disk cache."""
    keep_in_memory: bool = True
    """Keep every collected chunk in memory, so later epochs do not re-run the model
    (memory: the whole shard of tokens, `ActivationSource.total_bytes`)."""
    cache_dir: str | None = None
    """Folder of safetensors shards (one per chunk, written atomically) reused by later
    epochs and later runs with the same model, tokens and settings; None: no disk cache."""
    check_site: bool = True
    """On the first batch, recompute blocks[L].mlp(input) and require it to equal the
    captured output: proof that the hooks carry the module `attach` replaces."""
    rank: int = 0
    """This process's index among `world_size` data-parallel workers."""
    world_size: int = 1
    """Number of data-parallel workers; each one reads the rows i with
    i % world_size == rank (after the seeded row permutation)."""

    def __post_init__(self) -> None:
        _check_positive("model_batch_rows", self.model_batch_rows)
        _check_positive("buffer_tokens", self.buffer_tokens)
        _check_positive("world_size", self.world_size)
        _check_non_negative("rank", self.rank)
        if self.rank >= self.world_size:
            raise ValueError(f"rank={self.rank} must be below world_size={self.world_size}")
        _check_dtype("autocast", self.autocast)
        _check_dtype("store_dtype", self.store_dtype)


@dataclass(kw_only=True)
class TrainerConfig(JsonConfig):
    """How replacement modules are trained (every module in a run gets the same settings)."""

    train_tokens: int = 1_000_000
    """Training tokens per module (several epochs over the activations if the token rows
    hold fewer)."""
    batch_size: int = 1024
    """Tokens per optimiser step (1024 at lr 1e-3 beat 4096 here: more steps per token)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW (no weight decay)."""
    warmup_steps: int = 50
    """Linear warm-up from 0 to `lr` over this many steps."""
    schedule: Schedule = "constant"
    """After warm-up: 'constant', or 'cosine' decay to lr * min_lr_ratio at the last step."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule as a fraction of `lr`."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.999
    """AdamW's second-moment decay."""
    seed: int = 0
    """Seeds the row permutation, the per-chunk shuffles and torch's RNG."""
    autocast: str | None = "auto"
    """Compute the training forward/backward under torch.autocast with this dtype
    (parameters and optimiser state stay in the modules' dtype); 'auto': bfloat16 where
    a quick probe measures it faster than float32 (AMX/AVX512-BF16 CPUs, CUDA), else
    none; None: no autocast."""
    loss_norm: LossNorm = "batch"
    """Normalisation of the squared error: 'batch' = sum||y_hat-y||^2 / sum||y||^2 over
    the batch (exactly the NMSE reported on held-out text; scale-invariant, weighs
    tokens by their target energy); 'token' = mean over tokens of ||e||^2/||y||^2."""
    init_bias_from_data: bool = True
    """Before the first step, set each module's output bias b_dec to the mean target of
    the first batch (the layer starts at the mean instead of 0)."""
    aux_k: int | None = None
    """AuxK: the number of dead units that reconstruct the residual y - y_hat in the
    auxiliary loss (None: d_out // 2)."""
    aux_coeff: float = 1.0 / 32
    """Weight of the AuxK loss that revives dead units (Gao et al. 2024); 0 disables it."""
    aux_tokens: int | None = 256
    """Tokens of each batch (a random subset, as batches are shuffled) on which the AuxK
    loss is computed; it costs about as much as the main step when most units are dead,
    so a subset keeps revival cheap. None: the whole batch."""
    dead_tokens: int = 100_000
    """A unit is dead when it has not fired in the last `dead_tokens` training tokens."""
    log_every: int = 10
    """Steps between progress-bar updates and history entries."""
    eval_every: int = 0
    """Steps between held-out NMSE evaluations (0: only at the end, if held-out tokens
    are given)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: none)."""
    checkpoint_dir: str | None = None
    """Folder of checkpoints `step_XXXXXXXX/` and the `LATEST` pointer."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep."""
    resume: bool = False
    """Continue from the latest checkpoint in `checkpoint_dir` (exactly, on CPU)."""
    device: str = "cpu"
    """Device of the training computation (the modules must already be there)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (needs `wandb`; off by default)."""
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    """How the activations are collected."""

    def __post_init__(self) -> None:
        if isinstance(self.activations, dict):
            self.activations = ActivationConfig.from_dict(self.activations)
        _check_positive("train_tokens", self.train_tokens)
        _check_positive("batch_size", self.batch_size)
        _check_non_negative("warmup_steps", self.warmup_steps)
        _check_positive("dead_tokens", self.dead_tokens)
        _check_positive("log_every", self.log_every)
        _check_non_negative("eval_every", self.eval_every)
        _check_non_negative("checkpoint_every", self.checkpoint_every)
        _check_positive("keep_checkpoints", self.keep_checkpoints)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a positive number")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; expected 'constant' or 'cosine'")
        if self.loss_norm not in ("batch", "token"):
            raise ValueError(f"loss_norm={self.loss_norm!r}; expected 'batch' or 'token'")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must lie in [0, 1]")
        if self.aux_k is not None:
            _check_positive("aux_k", self.aux_k)
        if self.aux_tokens is not None:
            _check_positive("aux_tokens", self.aux_tokens)
        if self.aux_coeff < 0:
            raise ValueError(f"aux_coeff={self.aux_coeff!r} must be >= 0")
        _check_dtype("autocast", self.autocast)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} needs a checkpoint_dir")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")
        if self.activations.buffer_tokens < self.batch_size:
            raise ValueError(
                f"activations.buffer_tokens={self.activations.buffer_tokens} is smaller than "
                f"batch_size={self.batch_size}; a chunk must hold at least one batch"
            )

    @property
    def total_steps(self) -> int:
        """Optimiser steps of a run: ceil(train_tokens / batch_size)."""
        return -(-self.train_tokens // self.batch_size)




def __getattr__(name: str) -> Any:
    if name == "resolve_autocast":  # moved to mxd_lens.precision (it needs torch)
        from mxd_lens.precision import resolve_autocast

        return resolve_autocast
    raise AttributeError(f"module 'mxd_lens.training.config' has no attribute {name!r}")


__all__ = ["ActivationConfig", "TrainerConfig"]
