"""HookedSAETransformer gives exactly what mxd_lens.attach gives, for all three modules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mxd_lens
from mxd_lens import attach
from mxd_lens.saelens import add_sae, check_splice, hooked_sae_transformer, to_saelens
from tests.sae_lens.helpers import ARCHS, OUTPUT_SAE, make_module

LAYER = 1


def tiny_cfg(**overrides) -> HookedTransformerConfig:
    cfg = {
        "n_layers": 2,
        "d_model": 16,
        "d_mlp": 32,
        "n_ctx": 12,
        "d_head": 4,
        "n_heads": 4,
        "d_vocab": 50,
        "act_fn": "silu",
        "gated_mlp": True,
        "normalization_type": "RMSPre",
        "positional_embedding_type": "rotary",
        "seed": 0,
    }
    cfg.update(overrides)
    return HookedTransformerConfig(**cfg)


@pytest.fixture(scope="module")
def tiny() -> tuple[HookedTransformer, HookedSAETransformer]:
    model = HookedTransformer(tiny_cfg())
    model.eval()
    return model, hooked_sae_transformer(model)


@pytest.fixture(scope="module")
def tiny_tokens() -> torch.Tensor:
    return torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))


def loaded_sae(module, tmp_path: Path) -> SAE:
    """Through the disk format, as a user would get it."""
    return SAE.load_from_disk(module.save(tmp_path / module.architecture))


def compare(model, hsae, module, sae, tokens, use_error_term: bool, **fwd) -> None:
    """Same output with and without caching (sparse and dense expert mixing), same unit
    activations under SAE-Lens's hook name, same error term."""
    layer = module.cfg.layer
    with attach(model, {layer: module}, use_error_term=use_error_term):
        ref = model(tokens, **fwd)
        ref_cached, cache = model.run_with_cache(tokens, **fwd)
    out = hsae.run_with_saes(tokens, saes=[sae], use_error_term=use_error_term, **fwd)
    out_cached, sae_cache = hsae.run_with_cache_with_saes(
        tokens, saes=[sae], use_error_term=use_error_term, **fwd
    )
    assert torch.equal(out, ref)
    assert torch.equal(out_cached, ref_cached)
    prefix = f"blocks.{layer}.hook_mlp_out"
    acts = sae_cache[f"{prefix}.hook_sae_acts_post"]
    assert torch.equal(acts, cache[f"blocks.{layer}.mlp.{module.acts_hook_name}"])
    assert ((acts > 0).sum(-1) <= module.cfg.k).all() and (acts > 0).any()
    if use_error_term:
        assert torch.equal(sae_cache[f"{prefix}.hook_sae_error"], cache[f"blocks.{layer}.mlp.hook_error"])
    assert not hsae.acts_to_saes  # removed again


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("arch", [*ARCHS, OUTPUT_SAE])
def test_tiny_model_equals_attach(tiny, tiny_tokens, arch: str, use_error_term: bool, tmp_path: Path) -> None:
    model, hsae = tiny
    module = make_module(arch, d_model=16, layer=LAYER)
    compare(model, hsae, module, loaded_sae(module, tmp_path), tiny_tokens, use_error_term)
    clean = model(tiny_tokens)
    spliced = hsae.run_with_saes(
        tiny_tokens, saes=[loaded_sae(module, tmp_path)], use_error_term=use_error_term
    )
    # Without the error term the splice really changes the logits; with it they stay (near) clean.
    assert torch.allclose(spliced, clean, atol=1e-4) == use_error_term


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_equals_attach(tiny_tokens, dtype: torch.dtype, tmp_path: Path) -> None:
    """A half-precision model hands ln2.hook_normalized over in float32 (TransformerLens
    upcasts its norms): the view must still return the model's dtype, as the attached module
    does, or the rest of the forward pass runs in another precision."""
    model = HookedTransformer(tiny_cfg(dtype=dtype)).eval()
    hsae = hooked_sae_transformer(model)
    name = str(dtype).removeprefix("torch.")
    for arch in (*ARCHS, OUTPUT_SAE):
        module = make_module(arch, d_model=16, layer=LAYER, dtype=name)
        sae = loaded_sae(module, tmp_path / arch)
        assert sae.dtype == dtype
        for use_error_term in (False, True):
            compare(model, hsae, module, sae, tiny_tokens, use_error_term)
        _, cache = hsae.run_with_cache_with_saes(tiny_tokens, saes=[sae])
        assert cache[f"blocks.{LAYER}.ln2.hook_normalized"].dtype == torch.float32  # the upcast
        assert cache[f"blocks.{LAYER}.hook_mlp_out.hook_sae_output"].dtype == dtype
        assert cache[f"blocks.{LAYER}.hook_resid_post"].dtype == dtype


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_edits_act_through_the_error_term_as_with_attach(tiny, tiny_tokens, arch: str) -> None:
    model, hsae = tiny
    module = make_module(arch, d_model=16, layer=LAYER)
    sae = to_saelens(module)

    def boost(acts, hook):
        acts = acts.clone()
        acts[..., 2] += 1.5  # switch one unit on everywhere: it must contribute exactly its term
        return acts

    with attach(model, {LAYER: module}, use_error_term=True):
        ref = model.run_with_hooks(
            tiny_tokens, fwd_hooks=[(f"blocks.{LAYER}.mlp.{module.acts_hook_name}", boost)]
        )
    add_sae(hsae, sae, use_error_term=True)
    try:
        out = hsae.run_with_hooks(
            tiny_tokens, fwd_hooks=[(f"blocks.{LAYER}.hook_mlp_out.hook_sae_acts_post", boost)]
        )
    finally:
        hsae.reset_saes()
    assert torch.equal(out, ref)
    assert not torch.allclose(out, model(tiny_tokens), atol=1e-3)


def test_decode_needs_the_encode_of_the_same_input() -> None:
    x = torch.randn(4, 16)
    for arch, needs in (("mxd", "dense branch"), ("topk_skip_transcoder", "skip term")):
        sae = to_saelens(make_module(arch))
        acts = sae.encode(x)
        sae.decode(acts)
        with pytest.raises(ValueError, match=needs):
            sae.decode(acts)  # the stash went with the first decode
        sae.encode(x)
        with pytest.raises(ValueError, match=r"activations of shape \(2, 13\|21\)|shape"):
            sae.decode(acts[:2])
    # A plain transcoder decodes any activations: W_dec^T a + b_dec.
    tc = to_saelens(make_module("topk_transcoder"))
    a = torch.rand(4, 21)
    assert torch.allclose(tc.decode(a), a @ tc.W_dec + tc.b_dec)


def test_module_of_another_dtype_is_cast_explicitly(tiny, tiny_tokens, tmp_path: Path) -> None:
    model, hsae = tiny
    module = make_module("mxd", d_model=16, layer=LAYER, dtype="bfloat16")
    folder = module.save(tmp_path / "bf16")
    with (
        pytest.raises(ValueError, match="bfloat16 .* but the model is torch.float32"),
        attach(model, {LAYER: mxd_lens.load(folder)}),
    ):
        pass
    as_fp32 = mxd_lens.load(folder, dtype="float32")  # the explicit cast for attach
    with attach(model, {LAYER: as_fp32}):
        ref = model(tiny_tokens)
    sae = SAE.load_from_disk(folder)  # computes in bfloat16; the float32 residual stream promotes its output
    assert sae.dtype == torch.bfloat16
    out = hsae.run_with_saes(tiny_tokens, saes=[sae])
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.1, rtol=0.05) and not torch.equal(out, ref)


def test_post_mlp_norm_models_are_refused(tmp_path: Path) -> None:
    gemma_like = hooked_sae_transformer(
        HookedTransformer(tiny_cfg(normalization_type="RMS", use_normalization_before_and_after=True))
    )
    sae = to_saelens(make_module("mxd", d_model=16, layer=LAYER))
    with pytest.raises(ValueError, match="post-MLP norm"):
        add_sae(gemma_like, sae)
    assert not gemma_like.acts_to_saes


def test_unfolded_norm_input_hooks_are_refused() -> None:
    """With fold_ln=False, ln2.hook_normalized fires before ln2's weight: it is not the
    MLP's input, so SAE-Lens would feed a transcoder or MxD the wrong activations."""
    unfolded = hooked_sae_transformer(HookedTransformer(tiny_cfg(normalization_type="RMS")))
    with torch.no_grad():  # a norm weight that is not all ones, so the difference is real
        unfolded.blocks[LAYER].ln2.w.mul_(2.0)
    sae = to_saelens(make_module("mxd", d_model=16, layer=LAYER))
    with pytest.raises(ValueError, match="fires before ln2's weight .* fold_ln=False"):
        add_sae(unfolded, sae)
    assert not unfolded.acts_to_saes
    with attach(unfolded, {LAYER: make_module("mxd", d_model=16, layer=LAYER)}):  # attach serves it
        unfolded(torch.zeros(1, 4, dtype=torch.long))


def test_attach_refuses_an_output_site_sae_after_a_post_mlp_norm() -> None:
    gemma_like = HookedTransformer(tiny_cfg(normalization_type="RMS", use_normalization_before_and_after=True))
    sae = make_module("mlp_out_topk_sae", d_model=16, layer=LAYER)
    with pytest.raises(ValueError, match="normalises after its MLP .*ln2_post"):
        with attach(gemma_like, {LAYER: sae}):
            pass
    assert not isinstance(gemma_like.blocks[LAYER].mlp, type(sae))


def test_check_splice_names_what_does_not_fit(tiny) -> None:
    _, hsae = tiny
    check_splice(hsae, to_saelens(make_module("mxd", d_model=16, layer=LAYER)))
    with pytest.raises(ValueError, match="'blocks.7.ln2.hook_normalized' is not a hook of this model"):
        check_splice(hsae, to_saelens(make_module("mxd", d_model=16, layer=7)))
    with pytest.raises(ValueError, match="maps 8 -> 8 but the model has d_model=16"):
        check_splice(hsae, to_saelens(make_module("mxd", d_model=8, layer=LAYER)))


# --- the real default model ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_default_model_equals_attach(
    default_model, default_hooked_sae_transformer, heldout_tokens, arch: str, tmp_path: Path
) -> None:
    """SmolLM2-135M, layer 1: the residual stream right after the spliced layer (cheap)
    with and without the error term; full logits in the next test."""
    module = make_module(arch, d_model=576, layer=LAYER, scale=0.05)
    sae = loaded_sae(module, tmp_path)
    for use_error_term in (False, True):
        compare(
            default_model,
            default_hooked_sae_transformer,
            module,
            sae,
            heldout_tokens,
            use_error_term,
            stop_at_layer=LAYER + 1,
        )
    spliced = default_hooked_sae_transformer.run_with_saes(
        heldout_tokens, saes=[sae], stop_at_layer=LAYER + 1
    )
    assert not torch.allclose(spliced, default_model(heldout_tokens, stop_at_layer=LAYER + 1), atol=1e-2)


def test_default_model_logits_equal_attach(
    default_model, default_hooked_sae_transformer, heldout_tokens, tmp_path: Path
) -> None:
    # One row: a full forward of SmolLM2 is the slow part. (That the splice changes the
    # output, so equality is not trivially clean == clean, the test above shows.)
    tokens = heldout_tokens[:1]
    module = make_module("mxd", d_model=576, layer=LAYER, scale=0.05)
    sae = loaded_sae(module, tmp_path)
    with attach(default_model, {LAYER: module}):
        ref = default_model(tokens)
    out = default_hooked_sae_transformer.run_with_saes(tokens, saes=[sae])
    assert out.shape == (*tokens.shape, 49152)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("use_error_term", [False, True])
def test_an_sae_on_the_mlp_output_equals_attach(
    tiny, tiny_tokens, use_error_term: bool, tmp_path: Path
) -> None:
    """input_site='mlp_out': one hook in and out, the wrapper feeds it the MLP's output."""
    model, hsae = tiny
    out_hook = f"blocks.{LAYER}.hook_mlp_out"
    module = make_module("topk_transcoder", input_site="mlp_out")
    module.cfg = dataclasses.replace(module.cfg, hook_name=out_hook, hook_name_out=out_hook)
    compare(model, hsae, module, loaded_sae(module, tmp_path), tiny_tokens, use_error_term)


def test_standalone_error_term_needs_the_mlp_output() -> None:
    sae = to_saelens(make_module("mxd"))
    sae._use_error_term = True  # the deprecated sae.use_error_term = True, without its warning
    with pytest.raises(ValueError, match="error term needs the MLP output"):
        sae(torch.randn(3, 16))
