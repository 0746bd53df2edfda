"""The experiments' configs: `FrontierConfig` (a frontier run; `train` and `demo` use it
too), `demo_config()` (the demo's budget) and `EvalConfig` (`mxd-lens eval`).

Torch-free: the command line builds its flags (help = each field's docstring, default =
the field's value) from these dataclasses and `TrainerConfig` / `ActivationConfig`
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxd_lens import registry
from mxd_lens.config import JsonConfig, dtype_name
from mxd_lens.training.config import ActivationConfig, TrainerConfig
from mxd_lens.validation import check_positive_int


def check_layer_index(layer: object, name: str = "layer") -> int:
    """A block index >= 0 (the upper bound needs the model: `validation.check_layer`)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"{name}={layer!r} must be a block index >= 0")
    return layer


@dataclass(kw_only=True)
class ModelChoice(JsonConfig):
    """Which language model a command loads, and how (`mxd_lens.sources.load_model`)."""

    model: str | None = None
    """Language model: None for the embedded default (SmolLM2-135M-Instruct), a local
    Hugging Face folder, or a TransformerLens model name."""
    model_name: str | None = None
    """For a local model folder: the official TransformerLens name (or alias) to build it
    as, instead of the one matched from its config.json (it must have the folder's
    architecture); None: the matched one."""
    fold_ln: bool = True
    """Fold each norm's weights into the next layer when loading the model (TransformerLens's
    fold_ln). Either way modules read the MLP's own input and output (module hooks)."""


@dataclass(kw_only=True)
class FrontierConfig(ModelChoice):
    """One frontier run: which model, data, methods, sizes and budget."""

    layer: int = 12
    """Block whose MLP is replaced."""
    dataset: str | None = None
    """Training data: None for the embedded corpus's train split, else a Hugging Face
    dataset name (streamed), a folder saved by `datasets` (save_to_disk), a .jsonl /
    .parquet / .txt file or a folder of them, or a .npy / .safetensors token array
    ([rows, context], or a flat token stream). Tokenised once into a memory-mapped file
    under the cache (`mxd_lens.sources.dataset_token_rows`), never all in memory."""
    text_column: str = "text"
    """Column of `dataset` (and `eval_dataset`) holding the text (.jsonl, .parquet,
    saved or hub datasets)."""
    token_column: str | None = None
    """Column holding pre-tokenized int lists instead of text (or the tensor's name in a
    .safetensors token file); None: tokenise `text_column`."""
    eval_dataset: str | None = None
    """Held-out data (any `dataset` format; a hub or saved dataset's 'test' split): None
    for the embedded held-out book (Persuasion) when `dataset` is None, else the token
    rows of `dataset` that follow the training rows (`eval_fraction`)."""
    eval_fraction: float = 0.1
    """When `dataset` is given without `eval_dataset` and holds fewer rows than
    collect_tokens + eval_tokens: the share of its rows held out (its last rows); with
    enough data the eval_tokens after the training rows are held out."""
    context: int = 128
    """Tokens per row (each row starts with the separator token 0)."""
    methods: list[str] = field(default_factory=registry.methods)
    """Methods to train: any of 'mxd', 'transcoder', 'skip_transcoder' (architecture
    names such as 'topk_transcoder' are accepted as aliases)."""
    ks: list[int] = field(default_factory=lambda: [16, 32])
    """Active units per token (TopK's K) to train each method at."""
    width: int | None = None
    """Transcoder width W (latents); None: 16 * d_model. The MxD is matched to it."""
    d_hidden: int | None = None
    """MxD hidden width H; None: the model's d_mlp."""
    collect_tokens: int = 491_520
    """Unique training tokens run through the language model (the rest of
    `trainer.train_tokens` are further epochs over them)."""
    eval_tokens: int = 16_384
    """Held-out tokens for the evaluation (rounded down to whole rows)."""
    eval_batch_size: int = 8
    """Rows per forward pass in the evaluation."""
    eval_stack: int = 1
    """Candidates per forward pass in the evaluation, stacked along the rows
    (`evaluate_many(stack_candidates=...)`): pays where a bigger batch runs faster per
    row (a GPU; ~15% on 2 CPU cores), costs that many times the logits' memory."""
    exclude_special_tokens: bool = True
    """Leave positions holding special tokens (the separator starting each row, BOS/EOS/pad:
    `mxd_lens.model_io.special_positions`) out of the comparison: the evaluator keeps the
    clean MLP output there for every module and both ablations, and NMSE and unit
    statistics skip them. Attention sinks put massive MLP outputs there. The flag that
    turns it off also turns off the training side (trainer.activations)."""
    sweep_layers: list[int] = field(default_factory=list)
    """Further blocks trained and evaluated beside `layer`, from the same activation pass
    (`--layers`): their figures go to layers.json and layers.html, results.json stays
    the report of `layer`."""
    curve_points: int = 6
    """Learning-curve points per module (log-spaced in optimizer steps, the last step
    included); 0: no learning curves. Each point costs one pass from `layer` on over the
    curve rows per module."""
    curve_tokens: int = 512
    """Held-out tokens (the first whole rows of the held-out set) the learning curves
    are measured on."""
    dtype: str = "float32"
    """dtype of the language model and of the modules (evaluate CE in float32)."""
    device: str = "cpu"
    """Device of the model and the training."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training settings of every module (tokens, batch, lr, seed...), with per-method
    overrides in `trainer.per_method` (`--per-method`)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if isinstance(self.trainer, dict):
            self.trainer = TrainerConfig.from_dict(self.trainer)
        if not self.methods:
            raise ValueError(f"methods is empty; expected some of {registry.methods()}")
        self.methods = registry.canonical_methods(list(self.methods))
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} lists a method twice")
        if not self.ks:
            raise ValueError("ks is empty; expected at least one K")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"K={k!r} must be a positive integer")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks={self.ks} lists a K twice")
        for name in ("width", "d_hidden"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.width is not None and max(self.ks) > self.width:
            raise ValueError(f"K={max(self.ks)} is larger than the transcoder width {self.width}")
        if isinstance(self.curve_points, bool) or not isinstance(self.curve_points, int) or self.curve_points < 0:
            raise ValueError(f"curve_points={self.curve_points!r} must be an integer >= 0")
        for layer in self.sweep_layers:
            check_layer_index(layer, "sweep_layers entry")
        if len(set(self.sweep_layers)) != len(self.sweep_layers):
            raise ValueError(f"sweep_layers={self.sweep_layers} lists a layer twice")
        for name in ("context", "collect_tokens", "eval_tokens", "eval_batch_size", "curve_tokens", "eval_stack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.context < 2:
            raise ValueError(f"context={self.context} but a row needs at least 2 tokens")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} must lie strictly between 0 and 1")
        for name in ("text_column", "token_column"):
            value = getattr(self, name)
            if not (value is None and name == "token_column") and not (isinstance(value, str) and value):
                raise ValueError(f"{name}={value!r} must be a column name (a non-empty string)")
        check_layer_index(self.layer)
        dtype_name(self.dtype)  # torch-free: the command line validates before importing torch




def demo_config() -> FrontierConfig:
    """The demo's budget: the frontier at K = 16, 32 on the embedded model (layer 29,
    default sizes), sized to finish within 15 minutes on 2 CPU cores: 98k unique tokens
    collected once, 197k training tokens per module (2 epochs), 32k held-out tokens,
    special positions excluded, learning curves at 6 points; revival starts after 32k tokens.

    Training settings per method from the search of `benchmarks/tune.py` at this budget
    (benchmarks/README.md, "Fair tuning"): the transcoders at lr 1e-2 (the best of
    1e-3..3e-2 for both; the old shared 3e-3 left the skip transcoder at delta CE 0.200
    instead of 0.146 at batch 512) with sparsify's data-centred encoder (fewer dead
    latents, delta CE equal or slightly lower; the unit-norm decoder and the per-token
    loss did not help), the MxD at lr 1e-3 (it diverges at 3e-3 / 1e-2 with
    small batches) with its dense branch warm-started from the model's own MLP and its
    expert rows diversified and a flat gate (`warm_start_dense`, `expert_init_noise=1.0`,
    `warm_start_gate_scale=1e-3`: delta CE 0.035 and 0.054 at two seeds against 0.201
    from the random init at K=32 and batch 256, mean |cos| of the experts 0.29, L0 12 of
    32). Batch 512,
    not the search's best 256 (better for every method at equal tokens), because 256
    doubles the training time per token and the demo would pass 15 minutes.

    Layer 29, not 12, from `benchmarks/bench_eval_stderr.py --profile` (8 rows): zeroing
    layer 12's MLP costs 0.11 nats, so the methods' differences were of the order of
    their stderr; layer 29's costs 1.75 nats with the special positions kept (the issue's
    24-row figures at positions >= 1: 1.02 against 0.06-0.17 for layers 3-27), and no
    compared position of it is a massive activation (largest norm 11.8x the median),
    whereas layer 28 (0.65 nats) keeps 2 positions at ~74x, layer 11 2 at ~790x and
    layer 2 30 at ~49x, which would dominate their NMSE. Layer 0's MLP acts as an extension
    of the token embedding. Each candidate then re-runs only block 29 and the unembedding
    instead of blocks 12-29 (~3x less evaluation CPU time per token than at layer 12),
    which buys the held-out tokens a small stderr needs."""
    return FrontierConfig(
        layer=29,
        ks=[16, 32],
        collect_tokens=98_304,
        eval_tokens=32_768,
        eval_stack=3,
        trainer=TrainerConfig(
            train_tokens=196_608,
            batch_size=512,
            lr=1e-2,
            warmup_steps=20,
            dead_tokens=32_768,
            activations=ActivationConfig(autocast="auto"),
            per_method={
                "mxd": {"lr": 1e-3, "warm_start_dense": True, "expert_init_noise": 1.0, "warm_start_gate_scale": 1e-3,
                        "init_bias_from_data": False},
                "transcoder": {"center_encoder": True},
                "skip_transcoder": {"center_encoder": True},
            },
        ),
    )


@dataclass(kw_only=True)
class EvalConfig(ModelChoice):
    """`mxd-lens eval`: saved modules on held-out text."""

    modules: list[str] = field(default_factory=list)
    """Module folders (written by `mxd-lens train`, `frontier` or `module.save`)."""
    layer: int | None = None
    """Layer every module replaces; None: each module's own cfg.layer."""
    eval_dataset: str | None = None
    """Held-out text: None for the embedded held-out book (Persuasion), else a .txt file,
    a folder of them, or a Hugging Face dataset name."""
    eval_tokens: int = 16_384
    """Held-out tokens (rounded down to whole rows)."""
    context: int = 128
    """Tokens per row (each row starts with the separator token 0)."""
    batch_size: int = 8
    """Rows per forward pass."""
    exclude_special_tokens: bool = True
    """Keep the clean MLP output at positions holding special tokens (the separator starting
    each row, BOS/EOS/pad) for every module and both ablations, and leave them out of NMSE
    and unit statistics (as `FrontierConfig.exclude_special_tokens`)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.layer is not None:
            check_layer_index(self.layer)
        for name in ("eval_tokens", "context", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.context < 2:
            raise ValueError(f"context={self.context} but a row needs at least 2 tokens")
        if self.eval_tokens < self.context:
            raise ValueError(f"eval_tokens={self.eval_tokens} is less than one row of context={self.context}")


__all__ = ["EvalConfig", "FrontierConfig", "ModelChoice", "check_layer_index", "demo_config"]
