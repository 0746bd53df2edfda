"""What every module that stands in for an MLP is: its config, its interface, and its
SAE-Lens view.

An architecture is one file in this folder that subclasses `ReplacementConfig` and
`Replacement` (and, to load in SAE-Lens, `ReplacementSAEConfig` / `ReplacementSAE`) and
implements the small interface below; the trainer, the evaluator, patching, expert
inspection and the SAE-Lens views call only that interface, so nothing outside the
architecture's own file branches on which architecture it is.

| method | what the architecture says |
| --- | --- |
| `context(x, h)` | what decoding needs from the input besides the unit activations (an MxD's D^T z, a skip transcoder's W_skip x; None) |
| `pre_acts(x)` | the units' pre-activations (default W_enc^T x + b_enc) |
| `activate(pre)` | the sparse units (default TopK_k(ReLU(pre))) |
| `fold_input_scale_(f)` | weights besides W_enc that read the input inside a nonlinearity absorb an input scale (an MxD's E, E_glu; for SAE-Lens's `fold_activation_norm_scaling_factor`) |
| `mix_output(mix, context)` | the part of the output linear in the mixture sum_n a_n W_dec[n] |
| `combine(mix, context)` | the whole output |
| `train_forward(x)` | the unhooked forward pass with the selected-units-only backward |
| `before_optimizer_step()` / `after_optimizer_step()` | e.g. an MxD's parallel-gradient removal and renormalisation |
| `extra_nodes` | node kind -> hook of graph nodes besides units and error (an MxD's dense branch) |
| `unit_contribution(x, unit, value)` | what one unit adds to the output |
| `metrics()` | the architecture's own evaluation figures (an MxD's expert collapse check) |
| `check_model(model, layer)` | refusals only the architecture can justify (an SAE-Lens SAE trained at a hook that is not the MLP's input in this model) |

`encode` / `decode` / `reconstruct` are assembled here once, from those pieces, for the
TransformerLens-side module and (through `encode_units` / `decode_units`) for its
SAE-Lens view alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from mxd_lens.config import JsonConfig, dtype_name, parse_dtype
from mxd_lens.functional import (
    TopK,
    dense_mix,
    densify,
    select_topk,
    sparse_mix,
    topk_mix,
    topk_relu,
    unit_pre,
)
from mxd_lens.validation import check_positive_int

INPUT_SITES: tuple[str, ...] = ("mlp_in", "mlp_out")
"""What a module reads when attached: the MLP's input, or (an SAE on the MLP output) its output."""


def default_hook_names(layer: int, input_site: str) -> tuple[str, str]:
    """TransformerLens names of the module's input and output sites at `layer`
    (recorded in cfg.json for SAE-Lens: `hook_name`, `hook_name_out`)."""
    out = f"blocks.{layer}.hook_mlp_out"
    return (out if input_site == "mlp_out" else f"blocks.{layer}.ln2.hook_normalized"), out


# --- config ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ReplacementConfig(JsonConfig):
    """Fields shared by every module that stands in for an MLP."""

    d_in: int
    """Width of the input (the MLP's input: the model's d_model)."""
    d_out: int
    """Width of the output (the MLP's output: the model's d_model)."""
    k: int
    """Number of units (experts or latents) kept active per token by TopK."""
    hook_name: str | None = None
    """TransformerLens hook whose activation is this module's input when trained,
    e.g. 'blocks.12.ln2.hook_normalized'. Recorded for provenance and SAE-Lens."""
    hook_name_out: str | None = None
    """TransformerLens hook whose activation this module reconstructs,
    e.g. 'blocks.12.hook_mlp_out'."""
    layer: int | None = None
    """Transformer block whose MLP this module replaces, when known."""
    model_name: str | None = None
    """Name of the language model the module was trained on."""
    input_site: str = "mlp_in"
    """What the module reads when attached: the MLP's input ('mlp_in': MxDs and
    transcoders) or the MLP's output ('mlp_out': an SAE on the MLP output, which
    `attach` runs after the original MLP)."""
    dtype: str = "float32"
    """Parameter dtype at construction; the module computes in its parameters' dtype."""
    device: str = "cpu"
    """Device of the parameters at construction."""

    units_field: ClassVar[str] = "d_sae"
    """The field holding the number of units (SAE-Lens's `d_sae` in cfg.json)."""
    metadata_fields: ClassVar[tuple[str, ...]] = ("model_name", "hook_name", "hook_name_out")
    """Fields that live in SAE-Lens's `metadata` in cfg.json, not at its top level."""

    def __post_init__(self) -> None:
        check_positive_int("d_in", self.d_in)
        check_positive_int("d_out", self.d_out)
        check_positive_int("k", self.k)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer={self.layer!r} must be a non-negative integer or None")
        if self.input_site not in INPUT_SITES:
            raise ValueError(f"input_site={self.input_site!r}; expected one of {INPUT_SITES}")
        self.dtype = dtype_name(self.dtype)
        n = getattr(self, self.units_field)
        check_positive_int(self.units_field, n)
        if self.k > n:
            raise ValueError(f"k={self.k} is larger than {self.units_field}={n}")

    @property
    def n_units(self) -> int:
        """Number of sparse units (experts or latents)."""
        return getattr(self, self.units_field)

    def site_names(self) -> tuple[str | None, str | None]:
        """(hook_name, hook_name_out), derived from `layer` where not set."""
        if self.layer is None:
            return self.hook_name, self.hook_name_out
        hook_in, hook_out = default_hook_names(self.layer, self.input_site)
        return self.hook_name or hook_in, self.hook_name_out or hook_out

    # --- cfg.json: the config's own (de)serialisation ----------------------------------
    def to_cfg_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(top-level cfg.json keys, SAE-Lens metadata keys) of this config: the number of
        units as `d_sae`, model and hook names in the metadata."""
        d = self.to_dict()
        d["hook_name"], d["hook_name_out"] = self.site_names()
        meta = {key: d.pop(key) for key in self.metadata_fields}
        top = {"d_in": d.pop("d_in"), "d_sae": d.pop(self.units_field), "d_out": d.pop("d_out"), **d}
        return top, meta

    @classmethod
    def cfg_json_keys(cls) -> tuple[set[str], set[str]]:
        """(every top-level key this config reads from cfg.json, the required ones)."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in cls.metadata_fields}
        keys = (set(fields) - {cls.units_field}) | {"d_sae"}
        required = {
            ("d_sae" if name == cls.units_field else name)
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        return keys, required

    @classmethod
    def from_cfg_json(cls, top: dict[str, Any], meta: dict[str, Any]) -> "ReplacementConfig":
        """Build from cfg.json's top-level keys and metadata (as `to_cfg_json` writes them);
        validation errors are ValueErrors."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in top.items() if k in names and k != "d_sae"}
        kwargs[cls.units_field] = top["d_sae"]
        kwargs.update({k: meta.get(k) for k in cls.metadata_fields})
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(str(err)) from None


# --- the module ----------------------------------------------------------------------------
@dataclass
class Splice:
    """Set by `attach` while a module sits in place of an MLP. Not an nn.Module
    attribute, so the original MLP never joins this module's parameters or hooks."""

    original: nn.Module
    """The MLP this module replaces."""
    use_error_term: bool
    """Add back (original output - unhooked reconstruction), without gradient."""


def has_hooks(hook: HookPoint) -> bool:
    """True when anything (forward or backward) is registered on the hook point."""
    return bool(hook._forward_hooks or hook._backward_hooks)


HookFn = Callable[[HookPoint, Tensor], Tensor]


def through(hook: HookPoint, x: Tensor) -> Tensor:
    """Pass `x` through the hook point (what a hooked forward pass does)."""
    return hook(x)


def bypass(hook: HookPoint, x: Tensor) -> Tensor:
    """Skip the hook point (the unhooked reconstruction of the error term)."""
    return x


@dataclass
class Encoding:
    """The encoder's result for a batch of inputs: what `decode` needs."""

    sparse: TopK | None
    """The selected units, when nothing could have edited them (decoding then touches
    only their K decoder rows)."""
    acts: Float[Tensor, "... n_units"] | None
    """The dense unit activations that left the activation hook (None when `sparse`
    was kept instead)."""
    context: Tensor | None
    """What decoding needs from the input besides the activations (`Replacement.context`)."""

    def dense(self, n_units: int) -> Float[Tensor, "... n_units"]:
        """The unit activations as a dense tensor."""
        return self.acts if self.acts is not None else densify(self.sparse, n_units)


def encode_units(
    arch: Any, x: Tensor, pre_hook: HookPoint, acts_hook: HookPoint, h: HookFn
) -> Encoding:
    """The encoder, assembled once for modules and their SAE-Lens views: context, then
    pre-activations through `pre_hook`, then the sparse units. When `h` passes through
    hooks and something is registered on `acts_hook` (or the architecture's units are
    dense), the dense activations go through it and decoding is dense: a unit switched
    on by a hook contributes exactly its term, and a backward hook sees the true
    gradient of every unit, selected or not."""
    context = arch.context(x, h)
    units = arch.select(h(pre_hook, arch.pre_acts(x)))
    if isinstance(units, TopK):
        if h is through and has_hooks(acts_hook):
            return Encoding(None, acts_hook(densify(units, arch.n_units)), context)
        return Encoding(units, None, context)
    return Encoding(None, h(acts_hook, units), context)


def decode_units(arch: Any, enc: Encoding) -> Tensor:
    """The decoder, assembled once: mix the decoder rows by the activations, then combine."""
    if enc.sparse is not None:
        mix = topk_mix(enc.sparse, arch.W_dec)
    else:
        mix = dense_mix(enc.acts.to(arch.W_dec.dtype), arch.W_dec)
    return arch.combine(mix, enc.context)


@dataclass
class StepOutput:
    """What one training forward pass gives besides the output."""

    y_hat: Float[Tensor, "tokens d_out"]
    """The module's output."""
    pre: Float[Tensor, "tokens n_units"]
    """Unit pre-activations (gate logits / latent pre-activations), without gradient."""
    sparse: TopK
    """The selected units (their values carry gradient to the selected encoder columns)."""
    context: Tensor | None
    """`Replacement.context` of the input (an MxD's D^T z, a skip term...)."""


class UnitMath:
    """The math of an architecture, shared by its module and its SAE-Lens view (both hold
    the same parameters under the same names). Defaults: a TopK transcoder without skip."""

    cfg: Any
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    context_doc: ClassVar[str | None] = None
    """What `context` holds (None: the architecture needs no context), for error messages."""

    def context(self, x: Float[Tensor, "... d_in"], h: HookFn) -> Tensor | None:
        """What decoding needs from the input besides the unit activations."""
        return None

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_units"]:
        """The units' pre-activations, W_enc^T x + b_enc."""
        return unit_pre(x, self.W_enc, self.b_enc)

    def activate(self, pre: Float[Tensor, "... n_units"]) -> TopK | Tensor:
        """The sparse units: TopK_k(ReLU(pre)) (or a dense tensor for other activations)."""
        return topk_relu(pre, self.cfg.k)

    def select(self, pre: Float[Tensor, "... n_units"]) -> TopK | Tensor:
        """The units the encoder hands on: `activate(pre)` (an SAE-Lens view whose decoder
        norms were folded selects on the unfolded pre-activations instead)."""
        return self.activate(pre)

    def fold_input_scale_(self, factor: float) -> None:
        """Make the weights that read the input inside a nonlinearity, other than the gate
        W_enc, read x / factor as they read x (multiply them by `factor`): what
        `fold_activation_norm_scaling_factor` needs besides SAE-Lens's own W_enc *= factor,
        W_dec /= factor, b_dec /= factor. Nothing by default: a linear term such as a skip
        connection is already right, because the output is divided by `factor` too."""

    def mix_output(self, mix: Float[Tensor, "... d_out"], context: Tensor | None) -> Float[Tensor, "... d_out"]:
        """The part of the output that is linear in the mixture sum_n a_n W_dec[n]."""
        return mix

    def combine(self, mix: Float[Tensor, "... d_out"], context: Tensor | None) -> Float[Tensor, "... d_out"]:
        """The output from the mixture and the context."""
        raise NotImplementedError



class Replacement(UnitMath, HookedRootModule):
    """A sparse module that maps an MLP's input to its output.

    Hooks common to all: `hook_in`, the pre-activation hook (`pre_hook_name`), the
    activation hook (`acts_hook_name`), `hook_error` (the error term, only with
    `use_error_term`) and `hook_out` (what the transformer block receives). Parameters
    every architecture has: W_enc [d_in, n_units], b_enc, W_dec [n_units, d_out], b_dec.
    """

    cfg: ReplacementConfig
    config_class: ClassVar[type[ReplacementConfig]] = ReplacementConfig
    """The config dataclass of this architecture."""
    architecture: ClassVar[str] = "replacement"
    """Name under which the module is saved and registered with SAE-Lens."""
    pre_hook_name: ClassVar[str] = "hook_latent_pre"
    """Name of the hook point on the unit pre-activations (before TopK)."""
    acts_hook_name: ClassVar[str] = "hook_latent_acts"
    """Name of the hook point that carries the sparse unit activations."""
    extra_nodes: ClassVar[dict[str, str]] = {}
    """Graph nodes for patching besides units and the error term: kind -> hook name
    (one node per position: the whole vector at that hook)."""
    trainable: ClassVar[bool] = True
    """Whether `mxd_lens.training.fit` can train this architecture."""
    unit_norm_decoder: ClassVar[bool] = False
    """Whether the architecture itself keeps every W_dec row at unit norm (an MxD's expert
    rows, in before/after_optimizer_step); the trainer's `unit_norm_decoder` option then
    has nothing to add, and `zero_decoder` does not apply to it."""

    def __init__(self, cfg: ReplacementConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kw = self._param_kwargs()
        # The parameters every architecture shares, built once here.
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.n_units, **kw))
        self.b_enc = nn.Parameter(torch.empty(cfg.n_units, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.n_units, cfg.d_out, **kw))
        self.b_dec = nn.Parameter(torch.empty(cfg.d_out, **kw))
        self.hook_in = HookPoint()
        setattr(self, self.pre_hook_name, HookPoint())
        setattr(self, self.acts_hook_name, HookPoint())
        self.hook_error = HookPoint()
        self.hook_out = HookPoint()
        self.splice: Splice | None = None
        self.sae_metadata: dict | None = None
        """SAE-Lens metadata read from or written to cfg.json (context_size, dataset_path...)."""

    def _finish_init(self) -> None:
        """Subclasses call this at the end of __init__: initialise, then name the hooks."""
        self.reset_parameters()
        self.setup()

    # --- what architectures provide (besides UnitMath) ----------------------------------
    def reset_parameters(self) -> None:
        """Initialise every parameter."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called by the trainer after backward, before the optimiser step."""

    def after_optimizer_step(self) -> None:
        """Called by the trainer after the optimiser step."""

    def param_groups(self) -> dict[str, list[nn.Parameter | None]]:
        """Named groups of parameters for per-group learning rates (`TrainerConfig`'s
        `*_lr_scale`); together they hold every parameter exactly once. Default: one
        group, 'all'."""
        return {"all": list(self.parameters())}

    def warm_start_from_mlp(self, mlp: nn.Module) -> bool:
        """Copy what the architecture can take from the MLP it replaces (an MxD's dense
        branch); False when there is nothing to take (the default)."""
        return False

    def metrics(self) -> dict[str, float]:
        """The architecture's own evaluation figures (name -> value)."""
        return {}

    def check_model(self, model: Any, layer: int) -> None:
        """Raise ValueError when this module cannot stand in for `model.blocks[layer].mlp`
        for a reason only the architecture knows (`attach` calls it before any change;
        sizes, dtypes and sites are checked there for every module)."""

    @classmethod
    def build(cls, sizes: "Sizes", k: int, **common: Any) -> "Replacement":
        """A freshly initialised module at a run's parameter-matched sizes (`common`:
        the ReplacementConfig fields such as layer, model_name, dtype, device)."""
        raise NotImplementedError(f"{cls.__name__} does not define build(sizes, k)")

    # --- assembled from the pieces -------------------------------------------------------
    @property
    def n_units(self) -> int:
        """Number of sparse units (experts or latents)."""
        return self.cfg.n_units

    @property
    def acts_hook(self) -> HookPoint:
        """The hook point carrying the unit activations (experts or latents)."""
        return getattr(self, self.acts_hook_name)

    @property
    def pre_hook(self) -> HookPoint:
        """The hook point carrying the unit pre-activations."""
        return getattr(self, self.pre_hook_name)

    def encode(self, x: Float[Tensor, "... d_in"], hooked: bool = True) -> Encoding:
        """The encoder's result (through the module's hooks when `hooked`)."""
        self.check_input(x)
        h = through if hooked else bypass
        return encode_units(self, h(self.hook_in, x), self.pre_hook, self.acts_hook, h)

    def decode(self, enc: Encoding) -> Float[Tensor, "... d_out"]:
        """The output for an encoding (see `Encoding`)."""
        return decode_units(self, enc)

    def reconstruct(self, x: Float[Tensor, "... d_in"], hooked: bool = True) -> Float[Tensor, "... d_out"]:
        """decode(encode(x)): the module's reconstruction of the MLP output."""
        return self.decode(self.encode(x, hooked))

    def train_forward(self, x: Float[Tensor, "tokens d_in"]) -> StepOutput:
        """The unhooked forward pass, keeping the pieces the losses need.

        Equals `reconstruct(x, hooked=False)`, and its gradients equal autograd's through
        it: the same calls in the same order, except that the pre-activations are computed
        without autograd and only the K selected ones carry gradient (`select_topk`), which
        skips the dense backward of the encoder. Assumes the default linear encoder and
        TopK; an architecture with another encoder overrides this.
        """
        context = self.context(x, bypass)
        with torch.no_grad():
            pre = self.pre_acts(x)
        sparse = select_topk(x, self.W_enc, self.b_enc, pre, topk_relu(pre, self.cfg.k).indices)
        y = self.combine(sparse_mix(sparse, self.W_dec), context)
        return StepOutput(y, pre, sparse, context)

    def aux_output(self, sparse: TopK, context: Tensor | None) -> Float[Tensor, "tokens d_out"]:
        """The output part of the given (e.g. dead) units alone, with the context held
        fixed: what AuxK asks them to reconstruct the residual with."""
        return self.mix_output(sparse_mix(sparse, self.W_dec), None if context is None else context.detach())

    def unit_contribution(
        self, x: Float[Tensor, "tokens d_in"], unit: int, value: Float[Tensor, " tokens"]
    ) -> Float[Tensor, "tokens d_out"]:
        """What unit `unit` with activations `value` adds to the output at inputs `x`
        (a fixed direction a_n W_dec[n] for a transcoder; input-dependent for an MxD)."""
        if not 0 <= unit < self.n_units:
            raise ValueError(f"unit={unit} is out of range [0, {self.n_units})")
        with torch.no_grad():
            context = self.context(x.to(self.dtype), bypass)
        return self.mix_output(value[:, None].to(self.dtype) * self.W_dec[unit], context)

    def node_hooks(self, with_error: bool) -> dict[str, str]:
        """Node kind -> hook name (relative to the module) of every graph node kind."""
        hooks = {"unit": self.acts_hook_name}
        if with_error:
            hooks["error"] = "hook_error"
        hooks.update(self.extra_nodes)
        return hooks

    # --- shared machinery --------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _param_kwargs(self) -> dict:
        return {"dtype": parse_dtype(self.cfg.dtype), "device": torch.device(self.cfg.device)}

    def check_input(self, x: Tensor) -> None:
        """Shape check only: no data-dependent test that would force a GPU sync."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"{type(self).__name__} has d_in={self.cfg.d_in} but the input has last dimension "
                f"{x.shape[-1]} (shape {tuple(x.shape)})"
            )

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        self.check_input(x)
        x = x.to(self.dtype)
        splice = self.splice
        target = None
        if self.cfg.input_site == "mlp_out":
            if splice is None:
                raise RuntimeError(
                    f"{type(self).__name__} reads the MLP's output (input_site='mlp_out'); "
                    "call it on that output directly with .reconstruct(), or attach() it"
                )
            target = splice.original(x).to(self.dtype)
            x = target
        y = self.reconstruct(x, hooked=True)
        if splice is not None and splice.use_error_term:
            with torch.no_grad():
                if target is None:
                    target = splice.original(x).to(self.dtype)
                error = target - self.reconstruct(x, hooked=False)
            y = y + self.hook_error(error)
        return self.hook_out(y)

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        """Write this module to a folder (SAE-Lens layout); read back with `mxd_lens.load`."""
        from mxd_lens.storage import save

        return save(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, repo_id: str, folder: str | None = None, **kwargs: Any) -> "Replacement":
        """The module in folder `folder` of the Hugging Face repo `repo_id` (or a local
        folder), as `mxd_lens.load(repo_id, folder, **kwargs)`; refuses another class."""
        from mxd_lens.storage import load

        module = load(repo_id, folder, **kwargs)
        if not isinstance(module, cls):
            raise ValueError(
                f"{repo_id}{'/' + folder if folder else ''} holds a {type(module).__name__} "
                f"({module.architecture}), not a {cls.__name__}; use mxd_lens.load to read any architecture"
            )
        return module

    def n_params(self) -> int:
        """Total number of parameters, counted from the module itself."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.cfg.to_dict().items() if v is not None)


class Sizes(NamedTuple):
    """The model-derived sizes a run builds its modules at (`Replacement.build`)."""

    d_model: int
    """Width of the MLP's input and output."""
    width: int
    """The transcoder width every method is parameter-matched to."""
    d_hidden: int
    """Hidden width of the model's MLP (an MxD's H)."""
    glu: bool
    """Whether the model's MLP is gated."""
    act_fn: str
    """The model MLP's activation function (TransformerLens name)."""


def expected_tensors(module_class: type[Replacement], cfg: ReplacementConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of `module_class` with `cfg`, read off the module
    itself built on the meta device (nothing is allocated): one source of truth for the
    layouts that saving, loading and the SAE-Lens views use."""
    meta = module_class(dataclasses.replace(cfg, device="meta"))
    return {name: tuple(p.shape) for name, p in meta.named_parameters()}


# --- the SAE-Lens view ---------------------------------------------------------------------
from sae_lens import SAE, SAEConfig  # noqa: E402  (after the module, which needs no SAE-Lens)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.saes.topk_sae import TopK as SAELensTopK  # noqa: E402

from mxd_lens.validation import check_tensors  # noqa: E402

SAELENS_NORMALIZATIONS: tuple[str, ...] = ("none", "expected_average_only_in")
"""`normalize_activations` values an mxd_lens view accepts: none, or a constant input scale
that `fold_activation_norm_scaling_factor` folds into the weights (SAE-Lens's
`from_pretrained` does when the release lists the factor). The others normalise each
input at run time, which an mxd_lens module never does."""

FOLDED_SCALE_KEY = "activation_fn.scale"
"""State-dict key of the per-unit selection scale a folded view carries (never saved)."""


class FoldedTopK(SAELensTopK):
    """SAE-Lens's TopK for a view whose decoder norms were folded (`fold_W_dec_norm`).

    Folding multiplies pre-activation n by s_n (the old norm of decoder row n) and
    divides the row by s_n, which keeps a_n W_dec[n] only if the same units are kept:
    TopK on the scaled pre-activations would pick others. So the k units are chosen on
    pre / scale (the unfolded pre-activations) and their values are ReLU(pre / scale) *
    scale, the unfolded activation times s_n. A subclass of SAE-Lens's TopK, so tools
    that dispatch on `isinstance(sae.activation_fn, TopK)` still see a TopK."""

    scale: Tensor

    def __init__(self, k: int, scale: Float[Tensor, " n_units"]) -> None:
        super().__init__(k)
        self.register_buffer("scale", scale)

    def forward(self, x: Float[Tensor, "... n_units"]) -> Float[Tensor, "... n_units"]:
        units = scaled_selection(lambda pre: topk_relu(pre, self.k), x, self.scale)
        return densify(units, x.shape[-1])


def scaled_selection(
    activate: Callable[[Tensor], TopK | Tensor], pre: Tensor, scale: Float[Tensor, " n_units"]
) -> TopK | Tensor:
    """`activate(pre / scale)` with its values multiplied back by `scale` (what a folded
    view selects; exact for activations that commute with a positive per-unit scale, as
    ReLU and TopK-ReLU do)."""
    units = activate(pre / scale)
    if isinstance(units, TopK):
        return TopK(units.values * scale[units.indices], units.indices)
    return units * scale


@dataclass(kw_only=True)
class ReplacementSAEConfig(SAEConfig):
    """SAE-Lens config of an mxd_lens module; `d_sae` is the number of experts or latents.
    Validated by building the mxd_lens config it stands for."""

    d_out: int
    """Width of the output (the MLP's output)."""
    k: int
    """Units kept active per token by TopK."""
    layer: int | None = None
    """Transformer block whose MLP the module replaces, when known."""
    input_site: str = "mlp_in"
    """'mlp_in' (MxDs, transcoders) or 'mlp_out' (an SAE on the MLP output)."""
    apply_b_dec_to_input: bool = False
    """Always False: b_dec is an output bias here (SAE-Lens's default is True)."""

    module_class: ClassVar[type[Replacement]]
    """The mxd_lens module this config describes."""

    @classmethod
    def architecture(cls) -> str:
        return cls.module_class.architecture

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.metadata, dict):  # SAEConfig.from_dict passes the raw dict first
            self.metadata = SAEMetadata(**self.metadata)
        if self.normalize_activations not in SAELENS_NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r}: an mxd_lens {self.architecture()!r} "
                f"module never normalises its input at run time; expected one of {SAELENS_NORMALIZATIONS} "
                "(fold a constant scale with fold_activation_norm_scaling_factor)"
            )
        if self.reshape_activations != "none":
            raise ValueError(
                f"reshape_activations={self.reshape_activations!r}: an mxd_lens {self.architecture()!r} "
                "module reads the MLP's input or output (one vector per position), never hook_z; expected 'none'"
            )
        if self.apply_b_dec_to_input:
            raise ValueError(
                f"apply_b_dec_to_input=True: b_dec is the {self.architecture()!r} module's output bias "
                "(width d_out), never subtracted from its input; expected False"
            )
        self.to_mxd_lens()  # the one set of checks: sizes, k in range, act_fn, options

    def to_mxd_lens(self) -> ReplacementConfig:
        """The equivalent mxd_lens config (raises ValueError when this one is invalid)."""
        d = self.to_dict()
        meta = d.get("metadata") or {}
        return self.module_class.config_class.from_cfg_json(d, meta)


class ReplacementSAE(UnitMath, SAE):
    """The SAE-Lens view of an mxd_lens module: the same parameters under the same
    names, and the architecture's own math (subclasses mix in the architecture's math
    class). HookedSAETransformer calls only `encode()` then `decode()`; an MxD's output
    needs the dense branch D^T z of the same input, and a skip transcoder's the skip term,
    so `encode` keeps the encoding (the context, and the sparse TopK when nothing hooks
    the activations) for the next `decode`.

    The view computes and returns in its own dtype, as SAE-Lens's own SAEs do and as the
    attached module does: a half-precision TransformerLens model hands its normalised
    activations (`ln2.hook_normalized`) over in float32, so returning the input's dtype
    would put a float32 MLP output into a bfloat16 model and make HookedSAETransformer
    differ from `attach`. (In a model of another dtype the output is promoted where it
    joins the residual stream.)"""

    cfg: ReplacementSAEConfig
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: ReplacementSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self._encoded: tuple[Tensor, Encoding] | None = None

    @property
    def n_units(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the output (SAE-Lens's `Transcoder.d_out`)."""
        return self.cfg.d_out

    # --- the unit selection, as SAE-Lens sees it ------------------------------------------
    def get_activation_fn(self) -> nn.Module:
        """SAE-Lens's `TopK(k)`: `activation_fn(hidden_pre)` equals the dense activations
        `encode` hands out (the architecture's `activate`, TopK_k(ReLU(pre)), computed
        sparsely there). A view whose architecture selects otherwise overrides this."""
        return SAELensTopK(self.cfg.k)

    @property
    def selection_scale(self) -> Float[Tensor, " d_sae"] | None:
        """The decoder norms folded by `fold_W_dec_norm` (units are selected on
        pre / selection_scale); None when nothing was folded."""
        fn = self.activation_fn
        return fn.scale if isinstance(fn, FoldedTopK) else None

    def select(self, pre: Float[Tensor, "... d_sae"]) -> TopK | Tensor:
        scale = self.selection_scale
        return self.activate(pre) if scale is None else scaled_selection(self.activate, pre, scale)

    def initialize_weights(self) -> None:
        # The mxd_lens module's own parameters and initialisation, so the two cannot drift.
        mcfg = dataclasses.replace(self.cfg.to_mxd_lens(), device=str(self.device), dtype=dtype_name(self.dtype))
        module = type(self.cfg).module_class(mcfg)
        for name, param in module.named_parameters():
            setattr(self, name, nn.Parameter(param.detach()))

    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        # b_dec is an output bias: never subtracted from the input.
        return self.hook_sae_input(sae_in.to(self.dtype))

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The unit activations (dense, k non-zero per token); keeps what decode needs."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"{type(self).__name__} has d_in={self.cfg.d_in} but the input has last dimension "
                f"{x.shape[-1]} (shape {tuple(x.shape)})"
            )
        enc = encode_units(self, self.process_sae_in(x), self.hook_sae_acts_pre, self.hook_sae_acts_post, through)
        acts = enc.dense(self.n_units)  # SAE-Lens's API hands out dense activations
        self._encoded = (acts, enc)
        return acts

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The module's output for these activations and the input last given to encode."""
        saved, self._encoded = self._encoded, None
        if saved is None:
            if self.context_doc is not None:
                raise ValueError(
                    f"{type(self).__name__}.decode needs the context ({self.context_doc}) of the same input: "
                    "call encode(x) first (HookedSAETransformer does) or forward(x)"
                )
            out = decode_units(self, Encoding(None, feature_acts.to(self.dtype), None))
            return self.hook_sae_recons(out)
        acts, enc = saved
        if acts.shape != feature_acts.shape:
            raise ValueError(
                f"decode got activations of shape {tuple(feature_acts.shape)} but the last encode() returned "
                f"{tuple(acts.shape)}; decode the activations of the input just encoded"
            )
        if not (enc.sparse is not None and feature_acts is acts):  # edited or hooked: dense
            enc = Encoding(None, feature_acts.to(self.dtype), enc.context)
        return self.hook_sae_recons(decode_units(self, enc))

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        if not self.use_error_term:
            return self.hook_sae_output(self.decode(self.encode(x)))
        if self.cfg.input_site != "mlp_out":
            raise ValueError(
                f"{type(self).__name__} maps the MLP input to its output, so its error term needs the "
                "MLP output: use HookedSAETransformer.add_sae(sae, use_error_term=True) or "
                "mxd_lens.attach(model, {layer: module}, use_error_term=True)"
            )
        return super().forward(x)  # an SAE on the MLP output: error = x - reconstruction

    def forward_with_activations(
        self, x: Float[Tensor, "... d_in"]
    ) -> tuple[Float[Tensor, "... d_out"], Float[Tensor, "... d_sae"]]:
        """(output, unit activations), as SAE-Lens's `Transcoder.forward_with_activations`:
        the output includes everything the architecture adds (an MxD's dense branch, a
        skip term), without `hook_sae_output` and without an error term."""
        acts = self.encode(x)
        return self.decode(acts), acts

    def turn_on_forward_pass_hook_z_reshaping(self) -> None:
        raise ValueError(
            f"{type(self).__name__} reads the MLP's input or output ({self.cfg.metadata.hook_name!r}), one "
            "vector per position: hook_z reshaping never applies"
        )

    # --- folding (SAE-Lens's fold_* methods), output-preserving ---------------------------
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Give every decoder row unit norm without changing the output.

        Row n of W_dec is divided by its norm s_n, and W_enc's column n and b_enc[n] are
        multiplied by it, so unit n's activation becomes s_n a_n and s_n a_n (W_dec[n] /
        s_n) is the term it added before. For an MxD the rows are the expert rows c_n: the
        expert map a_n c_n * D^T z keeps its value, the gate a_n carries ||c_n|| (c_n is
        unit-norm after every training step, so this is a no-op there; the dense branch D
        is shared by all experts and stays). TopK on the scaled pre-activations would keep
        other units, so the k units are selected on the pre-activations divided by the
        folded norms (`FoldedTopK`, which `activation_fn` becomes; only units tied at the
        k-th place within float rounding can swap). Saving writes the unfolded weights
        (`process_state_dict_for_saving`), the module's own layout."""
        if not isinstance(self.activation_fn, SAELensTopK):
            raise NotImplementedError(
                f"{type(self).__name__} selects its units with {type(self.activation_fn).__name__}, not TopK; "
                "folding decoder norms is only defined for a TopK selection"
            )
        norms = self.fold_and_get_W_dec_norm()  # W_dec /= s, W_enc *= s, b_enc *= s (norms clamped at 1e-8)
        previous = self.selection_scale
        scale = norms.clone() if previous is None else previous * norms
        self.activation_fn = FoldedTopK(self.cfg.k, scale)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold a constant input scale: afterwards the view maps x / scaling_factor to its
        old output / scaling_factor (SAE-Lens's contract): W_enc *= f, W_dec /= f,
        b_dec /= f, and the architecture's other input weights (`fold_input_scale_`: an
        MxD's dense encoder) *= f."""
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.fold_input_scale_(scaling_factor)

    def fold_activation_whitening(self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} maps the MLP input to a different space (its output): SAE-Lens's whitening "
            "fold un-whitens the decoder in the input's space, which does not apply; normalize_activations must "
            f"be one of {SAELENS_NORMALIZATIONS}"
        )

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        """Unfold folded decoder norms (see `fold_W_dec_norm`) so the saved weights are the
        module's own parameters, which `mxd_lens.load` and `SAE.load_from_disk` read; the
        function is the same (fold again after loading: `load_from_disk(..., fold_W_dec_norm=True)`)."""
        scale = state_dict.pop(FOLDED_SCALE_KEY, None)
        if scale is not None:
            state_dict["W_dec"] = state_dict["W_dec"] * scale[:, None]
            state_dict["W_enc"] = state_dict["W_enc"] / scale
            state_dict["b_enc"] = state_dict["b_enc"] / scale

    def unfolded_state_dict(self) -> dict[str, Tensor]:
        """The state dict of the mxd_lens module this view computes (folds undone)."""
        state = self.state_dict()
        self.process_state_dict_for_saving(state)
        return state

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # SAE-Lens calls this before load_state_dict: check names and shapes against cfg.
        mcfg = self.cfg.to_mxd_lens()
        expected = expected_tensors(type(self.cfg).module_class, mcfg)
        found = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}
        check_tensors(expected, found, None, "sae_weights.safetensors")


__all__ = [
    "FOLDED_SCALE_KEY",
    "INPUT_SITES",
    "SAELENS_NORMALIZATIONS",
    "Encoding",
    "FoldedTopK",
    "HookFn",
    "Replacement",
    "ReplacementConfig",
    "ReplacementSAE",
    "ReplacementSAEConfig",
    "Sizes",
    "Splice",
    "StepOutput",
    "UnitMath",
    "bypass",
    "decode_units",
    "default_hook_names",
    "encode_units",
    "expected_tensors",
    "has_hooks",
    "scaled_selection",
    "through",
]
