"""attach() on a TransformerLens 3.x TransformerBridge of the default model equals attach()
on its HookedTransformer: the same logits, hook names and hook edits."""

from __future__ import annotations

import warnings

import pytest
import torch

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TranscoderConfig, attach

LAYER = 4
TOKENS = torch.tensor([[0, 504, 3458, 282, 253, 1345, 1097, 30, 1200, 45, 2216, 28]])


@pytest.fixture(scope="module")
def bridge():
    """The default model as a TransformerBridge booted offline from its cached HF folder,
    in compatibility mode (norm weights folded, as in mxd_lens's HookedTransformer)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mxd_lens.sources.model import default_model_folder

    folder = str(default_model_folder())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(folder))
        model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    return model


def make_modules(d_model: int, d_mlp: int) -> dict[str, torch.nn.Module]:
    """Random modules whose outputs are large enough to change the logits a lot."""
    torch.manual_seed(0)
    mxd = MxD(MxDConfig(d_in=d_model, d_out=d_model, k=4, d_hidden=d_mlp, n_experts=48, act_fn="silu", glu=True,
                        layer=LAYER))
    skip = SkipTranscoder(TranscoderConfig(d_in=d_model, d_out=d_model, k=8, d_sae=64, layer=LAYER))
    with torch.no_grad():
        skip.W_skip.normal_(std=0.05)
        skip.W_dec.mul_(20)
    return {"mxd": mxd, "skip": skip}


@pytest.mark.parametrize("name", ["mxd", "skip"])
def test_bridge_attach_equals_hooked_transformer(default_model, bridge, name):
    module = make_modules(default_model.cfg.d_model, default_model.cfg.d_mlp)[name]
    acts = f"blocks.{LAYER}.mlp.{module.acts_hook_name}"
    with torch.no_grad():
        clean = default_model(TOKENS)
        with attach(default_model, {LAYER: module}) as m:
            ht_logits, ht_cache = m.run_with_cache(TOKENS, names_filter=[acts, f"blocks.{LAYER}.hook_mlp_out"])
        with attach(bridge, {LAYER: module}) as b:
            assert acts in b.hook_dict and b.hook_dict[acts].name == acts
            assert b.blocks[LAYER].hook_mlp_out is module.hook_out  # the block's alias follows the swap
            br_logits, br_cache = b.run_with_cache(TOKENS, names_filter=[acts, f"blocks.{LAYER}.hook_mlp_out"])
    assert (ht_logits - clean).abs().max() > 1.0  # the module's output matters
    torch.testing.assert_close(br_logits, ht_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(br_cache[acts], ht_cache[acts], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        br_cache[f"blocks.{LAYER}.hook_mlp_out"], ht_cache[f"blocks.{LAYER}.hook_mlp_out"], atol=1e-4, rtol=0
    )


def test_bridge_hook_edits_and_restore(default_model, bridge):
    """Zeroing the units through run_with_hooks has the same effect on both, and the
    bridge's own MLP and hook names come back on exit."""
    module = make_modules(default_model.cfg.d_model, default_model.cfg.d_mlp)["skip"]
    acts = f"blocks.{LAYER}.mlp.hook_latent_acts"
    hooks = [(acts, lambda t, hook: torch.zeros_like(t))]
    original = bridge.blocks[LAYER].mlp
    with torch.no_grad():
        before = bridge(TOKENS)
        with attach(default_model, {LAYER: module}, use_error_term=True) as m:
            ht = m.run_with_hooks(TOKENS, fwd_hooks=hooks)
        with attach(bridge, {LAYER: module}, use_error_term=True) as b:
            unedited = b(TOKENS)
            br = b.run_with_hooks(TOKENS, fwd_hooks=hooks)
        after = bridge(TOKENS)
    torch.testing.assert_close(unedited, before, atol=1e-4, rtol=0)  # the error term restores the MLP
    assert (br - before).abs().max() > 1e-2
    torch.testing.assert_close(br, ht, atol=1e-4, rtol=0)
    assert bridge.blocks[LAYER].mlp is original
    assert bridge.blocks[LAYER].original_component.mlp is original
    assert acts not in bridge.hook_dict
    assert bridge.hook_dict[f"blocks.{LAYER}.mlp.hook_in"] is original.hook_in
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_bridge_with_norm_weights_is_refused(default_model):
    """A bridge booted without compatibility mode feeds its MLPs normalized * weight, not
    what mxd_lens modules are trained on: refused with the fix named."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mxd_lens.sources.model import default_model_folder

    folder = str(default_model_folder())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        raw = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(folder))
    module = make_modules(default_model.cfg.d_model, default_model.cfg.d_mlp)["skip"]
    with pytest.raises(ValueError, match="enable_compatibility_mode"):
        with attach(raw, {LAYER: module}):
            pass
    assert raw.blocks[LAYER].mlp is not module


def test_attach_refuses_a_module_of_another_layer(default_model):
    module = make_modules(default_model.cfg.d_model, default_model.cfg.d_mlp)["skip"]
    with pytest.raises(ValueError, match=r"trained at layer 4.*check_layer=False"):
        with attach(default_model, {LAYER + 1: module}):
            pass
    with torch.no_grad(), attach(default_model, {LAYER + 1: module}, check_layer=False) as m:
        assert isinstance(m.blocks[LAYER + 1].mlp, SkipTranscoder)
    assert not isinstance(default_model.blocks[LAYER + 1].mlp, SkipTranscoder)
