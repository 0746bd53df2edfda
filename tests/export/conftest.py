"""Fixtures of the export tests: real MLP inputs of the default model, on both sides of
the norm weight, taken independently (TransformerLens on one side, Hugging Face's own
model on the other), so that a wrong norm weight in the export cannot cancel out."""

from __future__ import annotations

import warnings

import pytest
import torch

TOKENS = torch.tensor([[0, 504, 3458, 282, 253, 1345, 1097, 30, 1200, 45, 2216, 28, 7326, 30, 378, 1098]])


@pytest.fixture(scope="package")
def mlp_inputs(default_model):
    """{layer: (x_ours, x_hf)}: each layer's MLP input [tokens, d_model] as mxd_lens modules
    read it (ln2.hook_normalized of the fold_ln=True HookedTransformer) and as Hugging Face's
    MLP reads it (the input of model.layers[L].mlp, i.e. after the norm's weight)."""
    from transformers import AutoModelForCausalLM

    from mxd_lens.sources.model import default_model_folder

    n = default_model.cfg.n_layers
    names = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(n)]
    with torch.no_grad():
        _, cache = default_model.run_with_cache(TOKENS, names_filter=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(default_model_folder()), dtype=torch.float32)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        hf.model.layers[layer].mlp.register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(layer, args[0].detach()[0])
        )
        for layer in range(n)
    ]
    try:
        with torch.no_grad():
            hf(TOKENS)
    finally:
        for h in handles:
            h.remove()
    return {layer: (cache[names[layer]][0], seen[layer]) for layer in range(n)}


@pytest.fixture(scope="package")
def default_norms():
    """The default model's MLP-input norms, as the exporters read them."""
    from mxd_lens.export.norms import model_norms

    return model_norms(None)
