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
    """Training text: None for the embedded corpus's train split, else a .txt file, a
    folder of them, or a Hugging Face dataset name."""
    eval_dataset: str | None = None
    """Held-out text: None for the embedded held-out book (Persuasion) when `dataset` is
    None, else the last `eval_fraction` of `dataset`'s documents."""
    eval_fraction: float = 0.1
    """Share of `dataset`'s documents held out when no `eval_dataset` is given."""
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
    dtype: str = "float32"
    """dtype of the language model and of the modules (evaluate CE in float32)."""
    device: str = "cpu"
    """Device of the model and the training."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training settings shared by every module (tokens, batch, lr, seed...)."""
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
        for name in ("context", "collect_tokens", "eval_tokens", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.context < 2:
            raise ValueError(f"context={self.context} but a row needs at least 2 tokens")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} must lie strictly between 0 and 1")
        check_layer_index(self.layer)
        dtype_name(self.dtype)  # torch-free: the command line validates before importing torch




def demo_config() -> FrontierConfig:
    """The demo's budget: the frontier at K = 16, 32 on the embedded model (layer 12,
    default sizes), sized to finish within 15 minutes on 2 CPU cores: 98k unique tokens
    collected once, 197k training tokens per module (2 epochs), 8k held-out tokens.
    lr 3e-3 at batch 512 was the best of the settings tried at this budget for MxD and the
    skip transcoder alike (benchmarks/README.md); revival starts after 32k tokens."""
    return FrontierConfig(
        ks=[16, 32],
        collect_tokens=98_304,
        eval_tokens=8_192,
        trainer=TrainerConfig(
            train_tokens=196_608,
            batch_size=512,
            lr=3e-3,
            warmup_steps=20,
            dead_tokens=32_768,
            activations=ActivationConfig(autocast="auto"),
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
