"""SAE-Lens interop: the SAE-Lens views of mxd_lens modules, conversions both ways, and
splicing through SAE-Lens's HookedSAETransformer.

| architecture | SAE-Lens class | mxd_lens class |
| --- | --- | --- |
| "mxd" | `MxDSAE` / `MxDSAEConfig` | `MxD` |
| "topk_transcoder" | `TopKTranscoderSAE` / `TopKTranscoderSAEConfig` | `TopKTranscoder` |
| "topk_skip_transcoder" | `TopKSkipTranscoderSAE` / `TopKSkipTranscoderSAEConfig` | `SkipTranscoder` |
| "mlp_out_topk_sae" | `OutputSiteSAEView` / `OutputSiteSAEConfig` | `OutputSiteSAE` |

The classes live in their architecture's file (`mxd_lens.architectures`) and are named by
`mxd_lens.registry` (where a new architecture adds its own); `import mxd_lens`
registers them with SAE-Lens, so one folder loads with `mxd_lens.load` and with
`sae_lens.SAE.load_from_disk` / `SAE.from_pretrained`. Weights keep their names:
W_enc/b_enc/W_dec/b_dec are an MxD's expert gate and expert matrix (the experts are its
features); the dense branch is W_hidden, b_hidden, W_hidden_lin, W_out. Hooks are
SAE-Lens's: `hook_sae_input`, `hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`,
`hook_sae_output`, `hook_sae_error`, plus `hook_mxd_hidden` (the MxD's dense hidden units z).

The views have SAE-Lens's SAE / Transcoder API: `d_out`, `forward_with_activations`,
`activation_fn` (SAE-Lens's `TopK`), output-preserving `fold_W_dec_norm` and
`fold_activation_norm_scaling_factor`, `save_model` / `load_from_disk` / `from_pretrained`
(meta-device loading), `from_dict`, `to`; SAE-Lens's own tests run on them
(tests/sae_lens/upstream/).

SAE-Lens's training loop reconstructs an SAE's own input, so it cannot train a
transcoder or an MxD (their target is the MLP output): train with mxd_lens; no SAE-Lens
training classes are registered.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from sae_lens import SAE, HookedSAETransformer
from transformer_lens import HookedTransformer

from mxd_lens import registry, storage
from mxd_lens.model_io import post_mlp_norm
from mxd_lens.architectures import register_with_saelens
from mxd_lens.architectures.base import Replacement, ReplacementSAE, ReplacementSAEConfig
from mxd_lens.architectures.mxd import MxDSAE, MxDSAEConfig
from mxd_lens.architectures.transcoder import (
    TopKSkipTranscoderSAE,
    TopKSkipTranscoderSAEConfig,
    TopKTranscoderSAE,
    TopKTranscoderSAEConfig,
)


def register() -> None:
    """Register every architecture of `mxd_lens.registry` with SAE-Lens (done on
    `import mxd_lens`; safe to call again)."""
    register_with_saelens()


register()  # also on importlib.reload of this module, as before the architectures/ split


# --- conversions --------------------------------------------------------------------------
def to_saelens(module: Replacement, metadata: dict[str, Any] | None = None) -> ReplacementSAE:
    """The SAE-Lens view of `module` (a copy of its weights, same cfg.json)."""
    sae = SAE.from_dict(storage.config_json(module, metadata))
    sae.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
    return sae


def from_saelens(sae: ReplacementSAE) -> Replacement:
    """The mxd_lens module of an SAE-Lens view (a copy of its weights)."""
    if not isinstance(sae, ReplacementSAE):
        raise TypeError(f"expected the SAE-Lens view of an mxd_lens module (a ReplacementSAE), got {type(sae).__name__}")
    cfg_dict = sae.cfg.to_dict()
    arch, cfg, extra = storage.config_from_json(cfg_dict, "sae.cfg")
    module = registry.get(arch).module_class(cfg)
    # unfolded: a view whose decoder norms were folded computes the module's function
    # with another parametrisation (see ReplacementSAE.fold_W_dec_norm)
    module.load_state_dict({k: v.detach().clone() for k, v in sae.unfolded_state_dict().items()})
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
        norm = post_mlp_norm(model)
        if norm is not None:
            raise ValueError(
                f"{hook_out} is after this model's post-MLP norm, {norm}, not the MLP output: HookedSAETransformer "
                "would splice the module in the wrong place; use mxd_lens.attach(model, {layer: module}) "
                "instead (it replaces the MLP module itself)"
            )
        if hook_in.endswith("ln2.hook_normalized") and model.cfg.normalization_type in ("LN", "RMS"):
            raise ValueError(
                f"{hook_in} fires before ln2's weight in a model loaded with fold_ln=False "
                f"(normalization_type={model.cfg.normalization_type!r}), so it is not the MLP's input: "
                "HookedSAETransformer would feed the module the wrong activations; use "
                "mxd_lens.attach(model, {layer: module}) instead, or load the model with fold_ln=True"
            )


def add_sae(model: HookedSAETransformer, sae: SAE, use_error_term: bool = False) -> None:
    """`model.add_sae(sae, use_error_term)` after `check_splice` (which SAE-Lens does not do:
    it only logs a warning and skips an SAE whose hooks are missing)."""
    check_splice(model, sae)
    model.add_sae(sae, use_error_term=use_error_term)


__all__ = [
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
    "to_saelens",
]
