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
Parallel = Literal["data", "modules"]


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
    exclude_special_tokens: bool = True
    """Drop the pairs at positions holding special tokens (`mxd_lens.model_io.special_positions`
    of `special_token_ids(model)`: BOS/EOS/pad and the separator that starts each row).
    Attention sinks put massive MLP outputs there (norm ~500x the rest at the default
    model's layer 11), which would otherwise dominate an energy-weighted loss."""
    rank: int = 0
    """This process's index among `world_size` data-parallel workers (`fit` sets it from
    the torch.distributed process group)."""
    world_size: int = 1
    """Number of data-parallel workers. The rows are permuted (seeded) and cut into chunks
    of `buffer_tokens // ctx` rows over ALL workers; worker r collects the rows at
    positions r, r + world_size, ... of every chunk, and serves its own tokens of each
    global batch (`ActivationSource.shares`)."""

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
    """How replacement modules are trained (every module in a run gets the same settings,
    except the per-method overrides of `per_method`)."""

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
    center_encoder: bool = False
    """At the first step, b_enc = -W_enc^T mean(x) over the first batch (sparsify's
    data-centred encoder): every unit's pre-activation has mean zero on that batch. The
    transcoders' encoder and an MxD's gate alike (both are W_enc, b_enc). One seed at
    layer 12, K=32 (with `zero_decoder`) took the transcoders from 65% to 34-35% dead
    latents; off until benchmarks/tune.py measures it against every method."""
    zero_decoder: bool = False
    """At the first step, W_dec = 0 (sparsify's zero decoder) where the decoder rows are
    free. Does not apply to unit-norm decoder rows (an MxD's expert rows c_n, or any
    module under `unit_norm_decoder`): a zero row has no direction; an MxD's dense
    decoder D already starts at 0."""
    unit_norm_decoder: bool = False
    """The MxD authors' transcoder recipe: every decoder row kept at unit norm (rescaled
    after each step, its parallel gradient removed before it), as an MxD does with its
    expert rows (`mxd_lens.functional.unit_norm_rows_` / `remove_parallel_grad_`)."""
    gate_init: Literal["default", "kmeans"] = "default"
    """'kmeans': at the first step, the encoder/gate columns W_enc become spherical k-means
    centroids of the first batch's mean-centred inputs (`kmeans_iters` Lloyd iterations
    started from the columns themselves, each column keeping its norm; with more units
    than tokens only up to `tokens` columns move). 'default': the architecture's init."""
    kmeans_iters: int = 5
    """Lloyd iterations of `gate_init='kmeans'`."""
    gate_lr_scale: float = 1.0
    """Learning-rate multiplier of the 'gate' parameter group (an MxD's G, b_G;
    `Replacement.param_groups`). Architectures with one group ('all') ignore the three
    multipliers."""
    experts_lr_scale: float = 1.0
    """Learning-rate multiplier of the 'experts' group (an MxD's expert rows C)."""
    dense_lr_scale: float = 1.0
    """Learning-rate multiplier of the 'dense' group (an MxD's E, b_E, E_glu, D and b)."""
    warm_start_dense: bool = False
    """Before training, copy the model's own MLP into each module's dense branch
    (`Replacement.warm_start_from_mlp`: an MxD's E, b_E, E_glu exactly, D = sqrt(d_out)
    W_out, equal expert rows), then at the first step divide the gate by the batch mean
    of sum_n a_n so that the layer starts near the MLP. Needs `expert_init_noise`
    (equal rows are collapse). Architectures without a dense branch ignore it."""
    warm_start_gate_scale: float | None = None
    """With `warm_start_dense`: at the first step, multiply the gate G by this (e.g. 0.01)
    and set b_G = 1/K - G^T mean(x) before the gate is rescaled, so that every token's K
    coefficients are nearly equal and sum to ~1 on EVERY token rather than on average:
    the layer then starts at the MLP itself for each token (up to the rows' diversity),
    while the experts chosen still depend on x through the small G. None: only the
    rescale (sum_n a_n = 1 on average, varying by token)."""
    expert_init_noise: float | None = None
    """Expert rows c_n = normalise(1 + noise * eps_n), eps_n ~ N(0, I), before training
    (architectures whose rows are unit norm: an MxD). The rows' norm is no lever (the
    constraint resets it), their spread about the constant direction is: small noise
    makes the experts similar maps, large noise approaches random directions. None: the
    architecture's init (an MxD's uniform(-1, 1) rows normalised)."""
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
    parallel: Parallel = "data"
    """How several processes (torchrun, a process group) share the work; one process
    ignores it. Both collect disjoint shares of the rows and give the modules of one
    process. 'data': every process trains every module on its tokens of each global
    batch, gradients all-reduced every step (moves every module's gradients). 'modules'
    (as sparsify's distribute_modules): the batches are assembled from all processes'
    shares (one all-reduce of the activations per step) and each process trains only its
    modules (sorted names, module i on rank i % N) on the full batch; ranks without a
    module only collect. Better when modules outnumber processes and their gradients
    outweigh a batch's activations (docs/scaling.md has the measurement)."""
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    """How the activations are collected."""
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings that differ by method, e.g. (as `--per-method` JSON) {"mxd": {"lr": 0.001},
    "transcoder": {"center_encoder": true}}: keys are method or architecture names (`mxd_lens.registry`),
    values override the `PER_MODULE_FIELDS` of this config for every module of that method
    in a run (`for_architecture`). The modules of one run share their batches, so the
    batch size, token budget and data settings cannot differ. The demo uses it for the
    per-method winners of benchmarks/tune.py."""

    def __post_init__(self) -> None:
        if isinstance(self.activations, dict):
            self.activations = ActivationConfig.from_dict(self.activations)
        self._check_per_method()
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
        if self.parallel not in ("data", "modules"):
            raise ValueError(f"parallel={self.parallel!r}; expected 'data' or 'modules'")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must lie in [0, 1]")
        if self.aux_k is not None:
            _check_positive("aux_k", self.aux_k)
        if self.aux_tokens is not None:
            _check_positive("aux_tokens", self.aux_tokens)
        if self.aux_coeff < 0:
            raise ValueError(f"aux_coeff={self.aux_coeff!r} must be >= 0")
        if self.zero_decoder and self.unit_norm_decoder:
            raise ValueError("zero_decoder=True and unit_norm_decoder=True contradict: a zero row has no unit norm")
        if self.gate_init not in ("default", "kmeans"):
            raise ValueError(f"gate_init={self.gate_init!r}; expected 'default' or 'kmeans'")
        _check_positive("kmeans_iters", self.kmeans_iters)
        for name in ("gate_lr_scale", "experts_lr_scale", "dense_lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")
        if self.expert_init_noise is not None and not (
            isinstance(self.expert_init_noise, (int, float)) and self.expert_init_noise >= 0
        ):
            raise ValueError(f"expert_init_noise={self.expert_init_noise!r} must be a number >= 0 or None")
        if self.warm_start_gate_scale is not None:
            if isinstance(self.warm_start_gate_scale, bool) or not isinstance(self.warm_start_gate_scale, (int, float)) \
                    or not self.warm_start_gate_scale > 0:
                raise ValueError(f"warm_start_gate_scale={self.warm_start_gate_scale!r} must be a positive number or None")
            if not self.warm_start_dense:
                raise ValueError("warm_start_gate_scale is set but warm_start_dense=False: it shapes a warm start's gate")
        if self.warm_start_dense and self.expert_init_noise is None:
            raise ValueError(
                "warm_start_dense=True gives every expert the same row (collapse); set expert_init_noise "
                "(e.g. 0.1) to diversify them"
            )
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

    def _check_per_method(self) -> None:
        from mxd_lens import registry

        if not isinstance(self.per_method, dict):
            raise ValueError(f"per_method={self.per_method!r} must be a dict of method -> {{field: value}}")
        seen: dict[str, str] = {}
        for key, overrides in self.per_method.items():
            arch = registry.get(key).name  # names the known methods on an unknown one
            if arch in seen:
                raise ValueError(f"per_method names architecture {arch!r} twice ({seen[arch]!r} and {key!r})")
            seen[arch] = key
            if not isinstance(overrides, dict):
                raise ValueError(f"per_method[{key!r}]={overrides!r} must be a dict of field -> value")
            bad = sorted(set(overrides) - set(PER_MODULE_FIELDS))
            if bad:
                raise ValueError(
                    f"per_method[{key!r}] sets {bad}, which every module of a run shares or which is not a "
                    f"TrainerConfig field; per-method fields are {list(PER_MODULE_FIELDS)}"
                )
            if overrides:
                self.for_architecture(arch)  # validates the values as this config's own fields

    def for_architecture(self, architecture: str) -> TrainerConfig:
        """This config with `per_method`'s overrides for `architecture` (a cfg.json
        architecture or a method name) applied, and no `per_method` of its own."""
        from dataclasses import replace

        from mxd_lens import registry

        arch = registry.get(architecture).name
        overrides: dict[str, Any] = {}
        for key, values in self.per_method.items():
            if registry.get(key).name == arch:
                overrides = values
        try:
            return replace(self, per_method={}, **overrides)
        except ValueError as e:
            raise ValueError(f"per_method for {architecture!r}: {e}") from None

    @property
    def total_steps(self) -> int:
        """Optimiser steps of a run: ceil(train_tokens / batch_size)."""
        return -(-self.train_tokens // self.batch_size)




PER_MODULE_FIELDS: tuple[str, ...] = (
    "lr", "warmup_steps", "schedule", "min_lr_ratio", "beta1", "beta2", "init_bias_from_data",
    "center_encoder", "zero_decoder", "unit_norm_decoder", "gate_init", "kmeans_iters",
    "gate_lr_scale", "experts_lr_scale", "dense_lr_scale", "warm_start_dense", "warm_start_gate_scale",
    "expert_init_noise", "aux_k", "aux_coeff", "dead_tokens", "loss_norm",
)
"""The TrainerConfig fields `per_method` may set: what one module's optimiser,
initialisation and revival use. Everything else (batches, budget, data, precision,
processes, checkpoints) is shared by the modules of a run."""


def __getattr__(name: str) -> Any:
    if name == "resolve_autocast":  # moved to mxd_lens.precision (it needs torch)
        from mxd_lens.precision import resolve_autocast

        return resolve_autocast
    raise AttributeError(f"module 'mxd_lens.training.config' has no attribute {name!r}")


__all__ = ["PER_MODULE_FIELDS", "ActivationConfig", "TrainerConfig"]
