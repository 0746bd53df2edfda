"""Splice replacement modules into a HookedTransformer, or a TransformerLens 3.x
TransformerBridge, in place of its MLPs.

Either way the module takes the place of `model.blocks[L].mlp`, so its hooks are named
`blocks.L.mlp.hook_in`, `blocks.L.mlp.hook_latent_acts`... in both. A bridge wraps the
Hugging Face model, whose decoder layer calls its own `mlp` attribute: the module is put
there too, and the bridge's hook registry is rebuilt around it (HookedTransformer's
`setup()` does that for a HookedTransformer).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mxd_lens.architectures.base import Replacement, Splice
from mxd_lens.architectures.saelens_adapter import as_modules
from mxd_lens.model_io import model_device, model_dtype, post_mlp_norm
from mxd_lens.validation import check_layer


def is_bridge(model: object) -> bool:
    """True for a TransformerLens 3.x `TransformerBridge` (transformer_lens.model_bridge)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # a TransformerLens without the bridge
        return False
    return isinstance(model, TransformerBridge)


def _post_mlp_norm(model: object) -> str | None:
    """`model_io.post_mlp_norm` for either kind of model: a bridge's blocks name their
    post-MLP norm `ln2_post` (Gemma), where HookedTransformer's config says so."""
    if not is_bridge(model):
        return post_mlp_norm(model)
    return "ln2_post (normalisation after the MLP)" if hasattr(model.blocks[0], "ln2_post") else None


def _bridge_mlp_reads_normalized(model: object, layer: int) -> bool:
    """Whether the bridge's MLP at `layer` is fed `blocks.L.ln2.hook_normalized` itself,
    i.e. its norm applies no weight (or bias) any more: what a HookedTransformer loaded
    with fold_ln=True feeds its MLPs, and so what mxd_lens modules are trained on. A bridge
    booted from Hugging Face keeps the norm weights (its MLP reads normalized * weight)
    until `enable_compatibility_mode()` folds them. Probed on a fixed random input."""
    ln2 = getattr(model.blocks[layer], "ln2", None)
    if ln2 is None or not isinstance(getattr(ln2, "hook_normalized", None), HookPoint):
        return True  # no pre-MLP norm: the MLP reads the residual stream as in HookedTransformer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, model.cfg.d_model, generator=gen).to(model_device(model), model_dtype(model))
    seen: dict[str, torch.Tensor] = {}
    handle = ln2.hook_normalized.register_forward_hook(lambda m, a, out: seen.__setitem__("n", out.detach()))
    try:
        with torch.no_grad():
            out = ln2(x)
    finally:
        handle.remove()
    if "n" not in seen:
        return True
    # A weight of ones leaves the output equal to the hook up to the model dtype's rounding.
    tol = max(1e-4, 2 * torch.finfo(out.dtype).eps)
    return bool(torch.allclose(out.float(), seen["n"].float(), rtol=tol, atol=tol / 10))


def check_attachable(model: object, replacements: Mapping[int, Replacement], check_layer: bool = True) -> None:
    """Every reason `attach` would refuse, raised as a ValueError before any change."""
    bridge = is_bridge(model)
    if not isinstance(model, HookedTransformer) and not bridge:
        raise ValueError(
            f"attach() works on a transformer_lens.HookedTransformer or a TransformerLens 3.x "
            f"TransformerBridge (transformer_lens.model_bridge); got "
            f"{type(model).__module__}.{type(model).__name__}. Load the model with mxd_lens.load_model, "
            "HookedTransformer.from_pretrained or TransformerBridge.boot_transformers"
        )
    if not replacements:
        raise ValueError("attach() needs at least one {layer: module} entry")
    replacements = as_modules(replacements)  # SAE-Lens SAEs: wrapped (errors name the layer)
    n_layers = model.cfg.n_layers
    d_model = model.cfg.d_model
    dtype, device = model_dtype(model), model_device(model)
    seen: set[int] = set()
    for layer, module in replacements.items():
        _check_layer(layer, n_layers)
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
        cfg = module.cfg
        if check_layer and cfg.layer is not None and cfg.layer != layer:
            raise ValueError(
                f"layer {layer}: this {type(module).__name__} was trained at layer {cfg.layer} (cfg.layer="
                f"{cfg.layer}), not {layer}; attach it at {{{cfg.layer}: module}}, or pass check_layer=False "
                "to put it at another layer on purpose"
            )
        block = model.blocks[layer]
        if not hasattr(block, "mlp"):
            raise ValueError(f"layer {layer} has no MLP to replace (attention-only model?)")
        if isinstance(block.mlp, Replacement):
            raise ValueError(f"layer {layer} already has a replacement attached; detach it first")
        post_norm = _post_mlp_norm(model)
        if cfg.input_site == "mlp_out" and post_norm is not None:
            # blocks.L.hook_mlp_out is then the *normalised* output (after ln2_post): an SAE
            # trained there never saw the raw MLP output that attach() would feed it.
            raise ValueError(
                f"layer {layer}: the {type(module).__name__} reads the MLP output (input_site='mlp_out'), "
                f"but this model normalises after its MLP ({post_norm}), so blocks.{layer}.hook_mlp_out, where "
                "such SAEs are trained, is not the MLP's output and the SAE cannot stand in for the MLP; "
                "use an MxD or a transcoder (they map the MLP's own input to its own output)"
            )
        if cfg.d_in != d_model or cfg.d_out != d_model:
            raise ValueError(
                f"layer {layer}: the {type(module).__name__} maps d_in={cfg.d_in} -> d_out={cfg.d_out}, "
                f"but the model's MLP maps d_model={d_model} -> {d_model}"
            )
        if bridge and cfg.input_site == "mlp_in" and not _bridge_mlp_reads_normalized(model, layer):
            raise ValueError(
                f"layer {layer}: this TransformerBridge's MLP reads blocks.{layer}.ln2.hook_normalized times the "
                "norm's weight (a bridge booted from Hugging Face keeps the weights), but mxd_lens modules are "
                "trained on the MLP input of a model whose norm weights are folded into the MLP (fold_ln=True); "
                "call bridge.enable_compatibility_mode() first"
            )
        if not bridge:  # the architectures' own checks read HookedTransformer's config
            module.check_model(model, layer)
        if module.dtype != dtype or module.device != device:
            raise ValueError(
                f"layer {layer}: the {type(module).__name__} is {module.dtype} on {module.device} but the "
                f"model is {dtype} on {device}; move it first with module.to({str(device)!r}, {dtype})"
            )


_check_layer = check_layer  # `check_layer` is also attach()'s flag


def _set_mlp(model: object, layer: int, new: nn.Module) -> None:
    """Put `new` at `model.blocks[layer].mlp`. In a bridge the Hugging Face decoder layer
    calls the module held in its own tree (where the bridge put its MLP wrapper), so it
    is swapped there as well; a plain nn.Module assignment on the block, because the
    bridge's components forward attribute writes to the wrapped HF module."""
    block = model.blocks[layer]
    if not is_bridge(model):
        block.mlp = new
        return
    old = block._modules["mlp"]
    holders = [
        (parent, name)
        for parent in block.original_component.modules()
        for name, child in parent._modules.items()
        if child is old
    ]
    if not holders:
        raise RuntimeError(f"layer {layer}: the bridge's MLP is not part of the Hugging Face layer it wraps")
    for parent, name in holders:
        parent._modules[name] = new
    nn.Module.__setattr__(block, "mlp", new)
    submodules = getattr(block, "submodules", None)
    if isinstance(submodules, dict) and submodules.get("mlp") is old:
        # The bridge walks these for per-block hook aliases: the MLP wrapper's aliases
        # (hook_pre...) would point at hooks no longer in the model.
        submodules["mlp"] = new


def _refresh_hooks(model: object, modules: Mapping[int, Replacement]) -> None:
    """Make the model's hook names and `hook_dict` describe what is spliced in now."""
    if not is_bridge(model):
        model.setup()
        return
    model.clear_hook_registry()
    model._initialize_hook_registry()
    registry = model._hook_registry
    for layer, module in modules.items():
        # The bridge's scan also registers properties that return hook points (a module's
        # `acts_hook`), and names a hook after whichever attribute it met first: keep the
        # module's own names only, the ones a HookedTransformer gives them.
        prefix = f"blocks.{layer}.mlp."
        own = {id(hp): name for name, hp in module.named_modules() if isinstance(hp, HookPoint)}
        for key in [k for k, hp in registry.items() if k.startswith(prefix) and id(hp) in own]:
            del registry[key]
        for name, hp in module.named_modules():
            if isinstance(hp, HookPoint):
                hp.name = prefix + name
                registry[prefix + name] = hp
    model._register_all_aliases_recursive()  # block aliases (blocks.L.hook_mlp_out) re-point to it
    model._initialize_hooks_to_cache()


@contextmanager
def attach(
    model: HookedTransformer,
    replacements: Mapping[int, Replacement],
    use_error_term: bool = False,
    check_layer: bool = True,
) -> Iterator[HookedTransformer]:
    """Put `replacements[layer]` in place of `model.blocks[layer].mlp` for the duration.

    `model` is a HookedTransformer or a TransformerLens 3.x TransformerBridge (whose norms
    are folded: `bridge.enable_compatibility_mode()`); the hook names are the same in
    both. Inside the context the modules' hooks are part of the model
    (`blocks.{layer}.mlp.hook_expert_acts`, ...: in `hook_dict`, `run_with_hooks` and
    `run_with_cache`). With `use_error_term=True` each module adds back, without
    gradient, the original MLP output minus its own unhooked output, so the model's
    outputs are unchanged while edits of the unit activations still change them.
    A module whose `cfg.layer` names another layer is refused unless `check_layer=False`.
    The original MLPs and hook names come back on exit, also when the body raises.
    A SAE-Lens SAE or transcoder is spliced as `saelens_adapter.as_module` serves it.
    """
    replacements = as_modules(replacements)  # once: our SAE-Lens views are copied, not twice
    check_attachable(model, replacements, check_layer=check_layer)
    originals: dict[int, torch.nn.Module] = {}
    try:
        for layer, module in replacements.items():
            originals[layer] = model.blocks[layer].mlp
            module.splice = Splice(original=originals[layer], use_error_term=use_error_term)
            _set_mlp(model, layer, module)
        _refresh_hooks(model, replacements)
        yield model
    finally:
        for layer, original in originals.items():
            module = replacements[layer]
            _set_mlp(model, layer, original)
            module.splice = None
            module.setup()  # its hook names go back to 'hook_expert_acts', ...
        _refresh_hooks(model, {})
