"""Splice replacement modules into a HookedTransformer in place of its MLPs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from transformer_lens import HookedTransformer

from mxd_lens.architectures.base import Replacement, Splice
from mxd_lens.architectures.saelens_adapter import as_modules
from mxd_lens.model_io import model_device, model_dtype, post_mlp_norm
from mxd_lens.validation import check_layer


def check_attachable(model: object, replacements: Mapping[int, Replacement]) -> None:
    """Every reason `attach` would refuse, raised as a ValueError before any change."""
    if not isinstance(model, HookedTransformer):
        raise ValueError(
            f"attach() works on a transformer_lens.HookedTransformer (TransformerLens 3.x); got "
            f"{type(model).__module__}.{type(model).__name__}. TransformerLens 4's TransformerBridge "
            "is not supported yet: load the model with HookedTransformer.from_pretrained or "
            "mxd_lens.load_model"
        )
    if not replacements:
        raise ValueError("attach() needs at least one {layer: module} entry")
    replacements = as_modules(replacements)  # SAE-Lens SAEs: wrapped (errors name the layer)
    n_layers = model.cfg.n_layers
    d_model = model.cfg.d_model
    dtype, device = model_dtype(model), model_device(model)
    seen: set[int] = set()
    for layer, module in replacements.items():
        check_layer(layer, n_layers)
        if not isinstance(module, Replacement):
            raise ValueError(
                f"layer {layer}: expected an mxd_lens module (MxD, TopKTranscoder, SkipTranscoder...), "
                f"got {type(module).__name__}"
            )
        if id(module) in seen:
            raise ValueError(f"layer {layer}: the same module object is given for two layers; use one module per layer")
        seen.add(id(module))
        if module.splice is not None:
            raise ValueError(f"layer {layer}: this {type(module).__name__} is already attached to a model")
        block = model.blocks[layer]
        if not hasattr(block, "mlp"):
            raise ValueError(f"layer {layer} has no MLP to replace (attention-only model?)")
        if isinstance(block.mlp, Replacement):
            raise ValueError(f"layer {layer} already has a replacement attached; detach it first")
        cfg = module.cfg
        if cfg.input_site == "mlp_out" and post_mlp_norm(model) is not None:
            # blocks.L.hook_mlp_out is then the *normalised* output (after ln2_post): an SAE
            # trained there never saw the raw MLP output that attach() would feed it.
            raise ValueError(
                f"layer {layer}: the {type(module).__name__} reads the MLP output (input_site='mlp_out'), "
                f"but this model normalises after its MLP ({post_mlp_norm(model)}), so blocks.{layer}.hook_mlp_out, where "
                "such SAEs are trained, is not the MLP's output and the SAE cannot stand in for the MLP; "
                "use an MxD or a transcoder (they map the MLP's own input to its own output)"
            )
        if cfg.d_in != d_model or cfg.d_out != d_model:
            raise ValueError(
                f"layer {layer}: the {type(module).__name__} maps d_in={cfg.d_in} -> d_out={cfg.d_out}, "
                f"but the model's MLP maps d_model={d_model} -> {d_model}"
            )
        module.check_model(model, layer)
        if module.dtype != dtype or module.device != device:
            raise ValueError(
                f"layer {layer}: the {type(module).__name__} is {module.dtype} on {module.device} but the "
                f"model is {dtype} on {device}; move it first with module.to({str(device)!r}, {dtype})"
            )


@contextmanager
def attach(
    model: HookedTransformer,
    replacements: Mapping[int, Replacement],
    use_error_term: bool = False,
) -> Iterator[HookedTransformer]:
    """Put `replacements[layer]` in place of `model.blocks[layer].mlp` for the duration.

    Inside the context the modules' hooks are part of the model
    (`blocks.{layer}.mlp.hook_expert_acts`, ...: in `hook_dict`, `run_with_hooks` and
    `run_with_cache`). With `use_error_term=True` each module adds back, without
    gradient, the original MLP output minus its own unhooked output, so the model's
    outputs are unchanged while edits of the unit activations still change them.
    The original MLPs and hook names come back on exit, also when the body raises.
    A SAE-Lens SAE or transcoder is spliced as `saelens_adapter.as_module` serves it.
    """
    replacements = as_modules(replacements)  # once: our SAE-Lens views are copied, not twice
    check_attachable(model, replacements)
    originals: dict[int, torch.nn.Module] = {}
    try:
        for layer, module in replacements.items():
            originals[layer] = model.blocks[layer].mlp
            module.splice = Splice(original=originals[layer], use_error_term=use_error_term)
            model.blocks[layer].mlp = module
        model.setup()
        yield model
    finally:
        for layer, original in originals.items():
            module = replacements[layer]
            model.blocks[layer].mlp = original
            module.splice = None
            module.setup()  # its hook names go back to 'hook_expert_acts', ...
        model.setup()
