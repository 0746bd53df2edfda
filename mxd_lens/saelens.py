"""SAE-Lens classes for MxDs and TopK (skip) transcoders, registered on `import mxd_lens`.

| architecture | SAE-Lens class | mxd_lens class |
| --- | --- | --- |
| "mxd" | `MxDSAE` / `MxDSAEConfig` | `MxD` |
| "topk_transcoder" | `TopKTranscoderSAE` / `TopKTranscoderSAEConfig` | `TopKTranscoder` |
| "topk_skip_transcoder" | `TopKSkipTranscoderSAE` / `TopKSkipTranscoderSAEConfig` | `SkipTranscoder` |

The architecture names are the mxd_lens modules' own, so one folder loads with
`mxd_lens.load` and with `sae_lens.SAE.load_from_disk` / `SAE.from_pretrained`. Weights
keep their names: W_enc/b_enc/W_dec/b_dec are an MxD's expert gate and expert matrix
(the experts are its features); the dense branch is W_hidden, b_hidden, W_hidden_lin,
W_out. Hooks are SAE-Lens's: `hook_sae_input`, `hook_sae_acts_pre` (gate logits / latent
pre-activations), `hook_sae_acts_post` (expert coefficients / latent activations),
`hook_sae_recons`, `hook_sae_output`, `hook_sae_error`, plus `hook_mxd_hidden` (the MxD's
dense hidden units z).

HookedSAETransformer calls only `encode()` then `decode()`. An MxD's output needs the
dense branch D^T z of the same input, and a skip transcoder's the skip term W_skip x, so
`encode` keeps them (and, when nothing hooks the activations, the sparse TopK indices)
for the next `decode`. Every piece of math comes from `mxd_lens.functional`, the same
functions the TransformerLens-side modules call.

SAE-Lens's training loop reconstructs an SAE's own input, so it cannot train a
transcoder or an MxD (their target is the MLP output): train with mxd_lens; no SAE-Lens
training classes are registered.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from jaxtyping import Float
from sae_lens import SAE, HookedSAETransformer, SAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens import io
from mxd_lens.config import ReplacementConfig
from mxd_lens.functional import (
    TopK,
    act_fn,
    dense_mix,
    densify,
    mxd_combine,
    mxd_hidden,
    skip_out,
    topk_mix,
    topk_relu,
    transcoder_combine,
    unit_pre,
)
from mxd_lens.mxd import MxD
from mxd_lens.replacement import Replacement, has_hooks
from mxd_lens.transcoder import SkipTranscoder, TopKTranscoder


# --- configs ------------------------------------------------------------------------------
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

    @classmethod
    def architecture(cls) -> str:
        return cls.module_class.architecture

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.metadata, dict):  # SAEConfig.from_dict passes the raw dict first
            self.metadata = SAEMetadata(**self.metadata)
        self.to_mxd_lens()  # the one set of checks: sizes, k in range, act_fn, options

    def to_mxd_lens(self) -> ReplacementConfig:
        """The equivalent mxd_lens config (raises ValueError when this one is invalid)."""
        return io.config_from_json(self.to_dict(), f"{type(self).__name__}")[1]


@dataclass(kw_only=True)
class MxDSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of a Mixture of Decoders (d_sae = number of experts)."""

    d_hidden: int
    """Width of the dense hidden layer z."""
    act_fn: str = "gelu"
    """Activation of the hidden units: 'gelu', 'gelu_new', 'relu' or 'silu'."""
    glu: bool = False
    """Gated hidden layer z = act(E^T x + b_E) * (E_glu^T x)."""

    module_class: ClassVar[type[Replacement]] = MxD


@dataclass(kw_only=True)
class TopKTranscoderSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of a TopK transcoder."""

    module_class: ClassVar[type[Replacement]] = TopKTranscoder


@dataclass(kw_only=True)
class TopKSkipTranscoderSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of a TopK skip transcoder."""

    module_class: ClassVar[type[Replacement]] = SkipTranscoder


# --- modules ------------------------------------------------------------------------------
@dataclass
class _Encoded:
    """What `encode` leaves for the `decode` of the same input."""

    acts: Tensor
    """The activations encode returned (identity tells decode they are unedited)."""
    sparse: TopK | None
    """The TopK they came from, when no hook could have edited them."""
    extra: Tensor | None
    """MxD: the dense branch D^T z; skip transcoder: W_skip x."""
    in_dtype: torch.dtype
    """dtype of the activations given to encode: decode returns that dtype."""


C = TypeVar("C", bound=ReplacementSAEConfig)


class ReplacementSAE(SAE[C], Generic[C]):
    """Base of the SAE-Lens view of an mxd_lens module. The module computes in its own
    dtype and returns the dtype of the activations it was given (a clear cast, so a
    float32 module runs in a bfloat16 HookedSAETransformer)."""

    cfg: C
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: C, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self._encoded: _Encoded | None = None

    def initialize_weights(self) -> None:
        # The mxd_lens module's own parameters and initialisation, so the two cannot drift.
        mcfg = dataclasses.replace(
            self.cfg.to_mxd_lens(), device=str(self.device), dtype=str(self.dtype).removeprefix("torch.")
        )
        module = type(self.cfg).module_class(mcfg)
        for name, param in module.named_parameters():
            setattr(self, name, nn.Parameter(param.detach()))

    # --- what subclasses provide ----------------------------------------------------------
    def _extra(self, x: Tensor) -> Tensor | None:
        """What decode needs from the input besides the activations."""
        return None

    def _combine(self, mix: Tensor, extra: Tensor | None) -> Tensor:
        raise NotImplementedError

    # --- SAE-Lens API -------------------------------------------------------------------------
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
        in_dtype = x.dtype
        x = self.process_sae_in(x)
        extra = self._extra(x)
        sparse = topk_relu(self.hook_sae_acts_pre(unit_pre(x, self.W_enc, self.b_enc)), self.cfg.k)
        # As in Replacement.mix: with a hook on the activations, decoding is dense.
        hooked = has_hooks(self.hook_sae_acts_post)
        acts = self.hook_sae_acts_post(densify(sparse, self.cfg.d_sae))
        self._encoded = _Encoded(acts, None if hooked else sparse, extra, in_dtype)
        return acts

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The module's output for these activations and the input last given to encode."""
        enc, self._encoded = self._encoded, None
        if enc is not None and enc.acts.shape != feature_acts.shape:
            raise ValueError(
                f"decode got activations of shape {tuple(feature_acts.shape)} but the last encode() returned "
                f"{tuple(enc.acts.shape)}; decode the activations of the input just encoded"
            )
        if enc is None and self._needs_input():
            raise ValueError(
                f"{type(self).__name__}.decode needs {self._needs_input()} of the same input: call encode(x) "
                "first (HookedSAETransformer does) or forward(x)"
            )
        if enc is not None and enc.sparse is not None and feature_acts is enc.acts:
            mix = topk_mix(enc.sparse, self.W_dec)
        else:
            mix = dense_mix(feature_acts.to(self.dtype), self.W_dec)
        out = self.hook_sae_recons(self._combine(mix, enc.extra if enc is not None else None))
        return out.to(enc.in_dtype) if enc is not None else out

    def _needs_input(self) -> str | None:
        return None

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

    def fold_W_dec_norm(self) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot fold decoder norms into the encoder: rescaling the "
            "pre-activations changes which units TopK selects"
        )

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # SAE-Lens calls this before load_state_dict: check names and shapes against cfg.
        expected = io.expected_tensors(self.cfg.architecture(), self.cfg.to_mxd_lens())
        found = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}
        io.check_tensors(expected, found, None, io.WEIGHTS_FILE)


class MxDSAE(ReplacementSAE[MxDSAEConfig]):
    """A Mixture of Decoders as an SAE-Lens SAE (experts are the features)."""

    W_hidden: nn.Parameter
    b_hidden: nn.Parameter
    W_out: nn.Parameter

    def __init__(self, cfg: MxDSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        if not cfg.glu:
            self.W_hidden_lin = None
        self._act = act_fn(cfg.act_fn)
        self.hook_mxd_hidden = HookPoint()
        self.setup()

    def _extra(self, x: Tensor) -> Tensor:
        z = self.hook_mxd_hidden(mxd_hidden(x, self.W_hidden, self.b_hidden, self._act, self.W_hidden_lin))
        return z @ self.W_out

    def _combine(self, mix: Tensor, extra: Tensor | None) -> Tensor:
        assert extra is not None
        return mxd_combine(mix, extra, self.b_dec)

    def _needs_input(self) -> str:
        return "the dense branch D^T z"


class TopKTranscoderSAE(ReplacementSAE[TopKTranscoderSAEConfig]):
    """A TopK transcoder as an SAE-Lens SAE."""

    def _combine(self, mix: Tensor, extra: Tensor | None) -> Tensor:
        return transcoder_combine(mix, self.b_dec, extra)


class TopKSkipTranscoderSAE(ReplacementSAE[TopKSkipTranscoderSAEConfig]):
    """A TopK skip transcoder as an SAE-Lens SAE; the skip term survives encode/decode."""

    W_skip: nn.Parameter

    def _extra(self, x: Tensor) -> Tensor:
        return skip_out(x, self.W_skip)

    def _combine(self, mix: Tensor, extra: Tensor | None) -> Tensor:
        return transcoder_combine(mix, self.b_dec, extra)

    def _needs_input(self) -> str:
        return "the skip term W_skip x"


CLASSES: dict[str, tuple[type[ReplacementSAE], type[ReplacementSAEConfig]]] = {
    MxD.architecture: (MxDSAE, MxDSAEConfig),
    TopKTranscoder.architecture: (TopKTranscoderSAE, TopKTranscoderSAEConfig),
    SkipTranscoder.architecture: (TopKSkipTranscoderSAE, TopKSkipTranscoderSAEConfig),
}


def register() -> None:
    """Register the three architectures with SAE-Lens. Safe to call again (and on
    `importlib.reload`, which replaces our earlier classes); refuses to replace another
    package's class of the same name."""
    for arch, (sae_cls, cfg_cls) in CLASSES.items():
        existing = SAE_CLASS_REGISTRY.get(arch)
        if existing is None:
            register_sae_class(arch, sae_cls, cfg_cls)
        elif existing[0].__module__ == __name__:
            SAE_CLASS_REGISTRY[arch] = (sae_cls, cfg_cls)
        else:
            raise ValueError(
                f"SAE-Lens architecture {arch!r} is already registered by {existing[0].__module__}."
                f"{existing[0].__qualname__}; mxd_lens cannot register its own"
            )


register()


def register_module_class(module_cls: type[Replacement]) -> None:
    """Make another mxd_lens architecture (a subclass of MxD, TopKTranscoder or
    SkipTranscoder with its own `architecture` name, already in `io.ARCHITECTURES`)
    loadable by SAE-Lens, with the SAE-Lens class of its base."""
    arch = module_cls.architecture
    if arch not in io.ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not in mxd_lens.io.ARCHITECTURES; add it there first")
    if arch in CLASSES:
        return
    base = next((b for b in module_cls.__mro__ if b.architecture in CLASSES and b is not module_cls), None)
    if base is None:
        raise ValueError(f"{module_cls.__name__} is not a subclass of {sorted(CLASSES)}'s classes")
    sae_base, cfg_base = CLASSES[base.architecture]
    name = module_cls.__name__
    cfg_cls = dataclass(kw_only=True)(
        type(f"{name}SAEConfig", (cfg_base,), {"module_class": module_cls, "__module__": __name__})
    )
    sae_cls = type(
        f"{name}SAE", (sae_base,), {"__module__": __name__, "__doc__": f"{name} as an SAE-Lens SAE."}
    )
    CLASSES[arch] = (sae_cls, cfg_cls)
    register()


# --- conversions --------------------------------------------------------------------------
def to_saelens(module: Replacement, metadata: dict[str, Any] | None = None) -> ReplacementSAE:
    """The SAE-Lens view of `module` (a copy of its weights, same cfg.json)."""
    sae = SAE.from_dict(io.config_json(module, metadata))
    sae.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
    return sae


def from_saelens(sae: ReplacementSAE) -> Replacement:
    """The mxd_lens module of an SAE-Lens view (a copy of its weights)."""
    if not isinstance(sae, ReplacementSAE):
        raise TypeError(f"expected an mxd_lens SAE-Lens class ({sorted(CLASSES)}), got {type(sae).__name__}")
    cfg_dict = sae.cfg.to_dict()
    arch, cfg, extra = io.config_from_json(cfg_dict, "sae.cfg")
    module = io.ARCHITECTURES[arch][0](cfg)
    module.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
    module.sae_metadata = extra
    return module


# --- HookedSAETransformer -----------------------------------------------------------------
def hooked_sae_transformer(model: HookedTransformer) -> HookedSAETransformer:
    """A HookedSAETransformer sharing `model`'s weights (no copy of the parameters)."""
    if isinstance(model, HookedSAETransformer):
        return model
    hsae = HookedSAETransformer(copy.deepcopy(model.cfg), tokenizer=model.tokenizer, move_to_device=False)
    hsae.load_state_dict(model.state_dict(), strict=True, assign=True)
    hsae.train(model.training)
    return hsae


_MLP_OUT = re.compile(r"^blocks\.(\d+)\.hook_mlp_out$")


def check_splice(model: HookedTransformer, sae: SAE) -> None:
    """Every reason `add_sae` would splice `sae` wrongly, raised as a ValueError.

    HookedSAETransformer wraps metadata.hook_name_out, and for a model that normalises
    after the MLP (Gemma's ln2_post, OLMo-2's post-norm) blocks.L.hook_mlp_out is the
    normalised output, not the MLP's: a module trained on the MLP output would be
    spliced in the wrong place. Use `mxd_lens.attach` there (it replaces the MLP itself).
    """
    meta = sae.cfg.metadata
    hook_in, hook_out = meta.hook_name, meta.hook_name_out or meta.hook_name
    if not hook_in:
        raise ValueError(
            f"{type(sae).__name__} has no metadata.hook_name: set the module's cfg.hook_name before converting"
        )
    for which, name in (("hook_name", hook_in), ("hook_name_out", hook_out)):
        if name not in model.hook_dict:
            raise ValueError(f"metadata.{which}={name!r} is not a hook of this model (see model.hook_dict)")
    d_model = model.cfg.d_model
    d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)
    if sae.cfg.d_in != d_model or d_out != d_model:
        raise ValueError(
            f"{type(sae).__name__} maps {sae.cfg.d_in} -> {d_out} but the model has d_model={d_model}"
        )
    match = _MLP_OUT.match(hook_out)
    if match and hook_in != hook_out:
        block = model.blocks[int(match.group(1))]
        if getattr(model.cfg, "use_normalization_before_and_after", False) or hasattr(block, "ln2_post"):
            raise ValueError(
                f"{hook_out} is after this model's post-MLP norm (ln2_post), not the MLP output: "
                "HookedSAETransformer would splice the module in the wrong place; use "
                "mxd_lens.attach(model, {layer: module}) instead"
            )
        if model.cfg.original_architecture in _post_norm_architectures():
            raise ValueError(
                f"{hook_out} is after this post-norm model's ln2, not the MLP output; use mxd_lens.attach instead"
            )


def _post_norm_architectures() -> frozenset[str]:
    from transformer_lens.components import transformer_block

    return frozenset(getattr(transformer_block, "POST_NORM_ARCHITECTURES", ()))


def add_sae(model: HookedSAETransformer, sae: SAE, use_error_term: bool = False) -> None:
    """`model.add_sae(sae, use_error_term)` after `check_splice` (which SAE-Lens does not do:
    it only logs a warning and skips an SAE whose hooks are missing)."""
    check_splice(model, sae)
    model.add_sae(sae, use_error_term=use_error_term)


__all__ = [
    "CLASSES",
    "MxDSAE",
    "MxDSAEConfig",
    "ReplacementSAE",
    "ReplacementSAEConfig",
    "TopKSkipTranscoderSAE",
    "TopKSkipTranscoderSAEConfig",
    "TopKTranscoderSAE",
    "TopKTranscoderSAEConfig",
    "add_sae",
    "check_splice",
    "from_saelens",
    "hooked_sae_transformer",
    "register",
    "register_module_class",
    "to_saelens",
]
