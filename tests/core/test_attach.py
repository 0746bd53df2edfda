"""attach(): splicing replacements into real HookedTransformers, and leaving them intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig, attach

D_MODEL = 16


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, d_mlp=32, n_ctx=8, d_head=4, n_heads=4, d_vocab=50, act_fn="gelu"
    )
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))


def random_mxd(
    d: int = D_MODEL, n_experts: int = 12, k: int = 3, glu: bool = False, act_fn: str = "gelu", **kw
) -> MxD:
    mxd = MxD(MxDConfig(d_in=d, d_out=d, d_hidden=24, n_experts=n_experts, k=k, glu=glu, act_fn=act_fn, **kw))
    with torch.no_grad():
        mxd.W_out.normal_(0, 0.2)  # D = 0 at init would make the output constant
        mxd.b_dec.normal_(0, 0.1)
    return mxd


def random_transcoder(cls=TopKTranscoder, d: int = D_MODEL) -> TopKTranscoder:
    tc = cls(TranscoderConfig(d_in=d, d_out=d, d_sae=20, k=4))
    if isinstance(tc, SkipTranscoder):
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.1)
    return tc


def snapshot(model: HookedTransformer) -> tuple:
    """Everything attach() may touch: hook names, MLP objects, each MLP's hook names."""
    return (
        sorted(model.hook_dict),
        sorted(model.mod_dict),
        [block.mlp for block in model.blocks],
        [sorted(n for n, _ in block.mlp.named_modules()) for block in model.blocks],
    )


def assert_restored(model: HookedTransformer, before: tuple, modules) -> None:
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(a is b for a, b in zip(after[2], before[2]))
    assert after[3] == before[3]
    for layer in range(model.cfg.n_layers):
        assert model.hook_dict[f"blocks.{layer}.mlp.hook_post"] is model.blocks[layer].mlp.hook_post
        assert model.hook_dict[f"blocks.{layer}.mlp.hook_post"].name == f"blocks.{layer}.mlp.hook_post"
    for module in modules:
        assert module.splice is None
        assert module.acts_hook.name == module.acts_hook_name  # its own names are back


# --- a tiny random model: the mechanics -----------------------------------------------


def test_hooks_visible_for_several_layers_at_once(tiny_model, tokens) -> None:
    before = snapshot(tiny_model)
    mxd, tc = random_mxd(), random_transcoder(SkipTranscoder)
    with attach(tiny_model, {0: mxd, 1: tc}) as model:
        assert model is tiny_model
        for name in (
            "blocks.0.mlp.hook_expert_acts",
            "blocks.0.mlp.hook_hidden",
            "blocks.0.mlp.hook_out",
            "blocks.1.mlp.hook_latent_acts",
            "blocks.1.mlp.hook_out",
        ):
            assert name in model.hook_dict and model.hook_dict[name].name == name
        assert "blocks.0.mlp.hook_post" not in model.hook_dict
        _, cache = model.run_with_cache(tokens)
        acts = cache["blocks.0.mlp.hook_expert_acts"]
        assert acts.shape == (*tokens.shape, 12) and int((acts != 0).sum(-1).max()) <= 3
        assert int((cache["blocks.1.mlp.hook_latent_acts"] != 0).sum(-1).max()) <= 4
        # What each block receives is its replacement applied to the MLP input.
        for layer, module in ((0, mxd), (1, tc)):
            x = cache[f"blocks.{layer}.ln2.hook_normalized"]
            assert_close(cache[f"blocks.{layer}.hook_mlp_out"], module.reconstruct(x, hooked=False))
            assert_close(cache[f"blocks.{layer}.hook_mlp_out"], cache[f"blocks.{layer}.mlp.hook_out"])
    assert_restored(tiny_model, before, [mxd, tc])


def test_error_term_keeps_logits_and_expert_edits_still_act(tiny_model, tokens) -> None:
    clean_logits, clean = tiny_model.run_with_cache(tokens)
    mxd = random_mxd(glu=True, act_fn="silu")
    with attach(tiny_model, {1: mxd}, use_error_term=True) as model:
        logits, cache = model.run_with_cache(tokens)
        assert_close(logits, clean_logits, atol=1e-4, rtol=0)
        x = cache["blocks.1.ln2.hook_normalized"]
        recon = mxd.reconstruct(x, hooked=False)
        assert_close(cache["blocks.1.mlp.hook_error"], clean["blocks.1.hook_mlp_out"] - recon)
        # Ablating every expert removes exactly (reconstruction - bias) from the MLP output.
        with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_expert_acts", lambda a, hook: torch.zeros_like(a))]):
            ablated_logits, ablated = model.run_with_cache(tokens)
    assert_close(ablated["blocks.1.hook_mlp_out"], clean["blocks.1.hook_mlp_out"] - recon + mxd.b_dec)
    assert (ablated_logits - clean_logits).abs().max() > 1e-3


def test_gradients_with_error_term_flow_only_through_the_replacement(tiny_model, tokens) -> None:
    mxd = random_mxd(glu=True)
    original = tiny_model.blocks[0].mlp
    # The clean model's gradient at the MLP output, and the MLP input.
    grads_out: list[torch.Tensor] = []
    tiny_model.zero_grad(set_to_none=True)
    _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.0.ln2.hook_normalized")
    with tiny_model.hooks(
        bwd_hooks=[("blocks.0.hook_mlp_out", lambda g, hook: grads_out.append(g.detach()))]
    ):
        tiny_model(tokens).logsumexp(-1).sum().backward()
    tiny_model.zero_grad(set_to_none=True)

    with attach(tiny_model, {0: mxd}, use_error_term=True) as model:
        model(tokens).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in original.parameters())
    expected = torch.autograd.grad(
        mxd.reconstruct(cache["blocks.0.ln2.hook_normalized"], hooked=False),
        list(mxd.parameters()),
        grads_out[0],
    )
    for (name, p), g in zip(mxd.named_parameters(), expected):
        assert g.abs().max() > 0, name
        assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    tiny_model.zero_grad(set_to_none=True)


def test_restored_after_an_exception_and_attachable_again(tiny_model, tokens) -> None:
    before = snapshot(tiny_model)
    mxd, tc = random_mxd(), random_transcoder()
    with pytest.raises(RuntimeError, match="boom"):
        with attach(tiny_model, {0: mxd, 1: tc}):
            assert tiny_model.blocks[0].mlp is mxd
            raise RuntimeError("boom")
    assert_restored(tiny_model, before, [mxd, tc])
    clean = tiny_model(tokens)
    with attach(tiny_model, {1: mxd}, use_error_term=True) as model:
        assert_close(model(tokens), clean, atol=1e-4, rtol=0)
        assert "blocks.1.mlp.hook_expert_acts" in model.hook_dict
    assert_restored(tiny_model, before, [mxd])


def _refusals():
    d = D_MODEL
    same = random_mxd()
    return [
        ("layer=2 is out of range", lambda m: {2: random_mxd()}),
        ("layer=-1 is out of range", lambda m: {-1: random_mxd()}),
        ("d_in=12 -> d_out=12.*d_model=16", lambda m: {0: random_mxd(d=12)}),
        ("float64.*float32", lambda m: {0: random_mxd().double()}),
        ("meta.*cpu", lambda m: {0: random_mxd(device="meta")}),
        ("same module object", lambda m: {0: same, 1: same}),
        ("expected an mxd_lens module.*Linear", lambda m: {0: nn.Linear(d, d)}),
        ("at least one", lambda m: {}),
    ]


@pytest.mark.parametrize("message,replacements", _refusals(), ids=[r[0].split(".")[0] for r in _refusals()])
def test_refusals_leave_the_model_untouched(tiny_model, message, replacements) -> None:
    before = snapshot(tiny_model)
    reps = replacements(tiny_model)
    with pytest.raises(ValueError, match=message):
        with attach(tiny_model, reps):
            pytest.fail("the body must not run")
    assert_restored(tiny_model, before, [r for r in reps.values() if isinstance(r, MxD)])


def test_refuses_a_non_hooked_transformer_and_double_attachment(tiny_model) -> None:
    mxd = random_mxd()
    with pytest.raises(ValueError, match="HookedTransformer.*got torch.nn.modules.container.Sequential"):
        with attach(nn.Sequential(nn.Linear(D_MODEL, D_MODEL)), {0: mxd}):
            pass
    assert mxd.splice is None
    before = snapshot(tiny_model)
    with attach(tiny_model, {0: mxd}):
        inner = snapshot(tiny_model)
        with pytest.raises(ValueError, match="layer 0 already has a replacement"):
            with attach(tiny_model, {0: random_mxd()}):
                pass
        with pytest.raises(ValueError, match="already attached"):
            with attach(tiny_model, {1: mxd}):
                pass
        assert snapshot(tiny_model)[0] == inner[0] and tiny_model.blocks[0].mlp is mxd
    assert_restored(tiny_model, before, [mxd])


# --- the real default model (SmolLM2-135M) ----------------------------------------------


def mlp_as_mxd(model: HookedTransformer, layer: int) -> MxD:
    """An MxD equal to the model's gated MLP: two experts, the first always chosen with a = 1,
    c = 1 (MxD generalises the MLP), E = W_gate, E_glu = W_in, D = W_out, b = b_out."""
    mlp = model.blocks[layer].mlp
    assert (mlp.b_in == 0).all()  # a GLU's bias after the product has no MxD counterpart
    d, h = model.cfg.d_model, model.cfg.d_mlp
    mxd = MxD(MxDConfig(d_in=d, d_out=d, d_hidden=h, n_experts=2, k=1, glu=True, act_fn=model.cfg.act_fn))
    with torch.no_grad():
        mxd.W_hidden.copy_(mlp.W_gate)
        mxd.b_hidden.zero_()
        mxd.W_hidden_lin.copy_(mlp.W_in)
        mxd.W_out.copy_(mlp.W_out)
        mxd.b_dec.copy_(mlp.b_out)
        mxd.W_enc.zero_()
        mxd.b_enc.copy_(torch.tensor([1.0, -1.0]))
        mxd.W_dec.fill_(1.0)
    return mxd


@pytest.fixture(scope="module")
def clean_logits(default_model, heldout_tokens) -> torch.Tensor:
    with torch.no_grad():
        return default_model(heldout_tokens)


def test_real_model_mlp_as_a_one_expert_mxd_keeps_the_logits(
    default_model, heldout_tokens, clean_logits
) -> None:
    clean = clean_logits
    with attach(default_model, {4: mlp_as_mxd(default_model, 4)}) as model, torch.no_grad():
        logits, cache = model.run_with_cache(
            heldout_tokens, names_filter=lambda n: n.startswith("blocks.4.mlp")
        )
    acts = cache["blocks.4.mlp.hook_expert_acts"]
    assert torch.equal(acts, torch.tensor([1.0, 0.0]).expand_as(acts))
    assert_close(logits, clean, atol=1e-4, rtol=0)


def test_real_model_error_term_several_layers_and_restore(
    default_model, heldout_tokens, clean_logits
) -> None:
    before = snapshot(default_model)
    clean = clean_logits
    torch.manual_seed(0)
    d = default_model.cfg.d_model
    mods = {
        2: random_mxd(d, n_experts=64, k=8, glu=True, act_fn="silu"),
        7: random_transcoder(SkipTranscoder, d),
    }
    with attach(default_model, mods, use_error_term=True) as model, torch.no_grad():
        logits, cache = model.run_with_cache(heldout_tokens, names_filter=lambda n: ".mlp.hook_" in n)
        assert_close(logits, clean, atol=1e-4, rtol=0)
        acts = cache["blocks.2.mlp.hook_expert_acts"]
        assert acts.shape == (*heldout_tokens.shape, 64)
        assert ((acts != 0).sum(-1) <= 8).all() and (acts != 0).any()
        assert ((cache["blocks.7.mlp.hook_latent_acts"] != 0).sum(-1) <= 4).all()
        ablated = model.run_with_hooks(
            heldout_tokens, fwd_hooks=[("blocks.2.mlp.hook_expert_acts", lambda a, hook: a * 0)]
        )
        assert (ablated - clean).abs().max() > 1e-2
    assert_restored(default_model, before, mods.values())
    with torch.no_grad():
        assert_close(default_model(heldout_tokens), clean, atol=0, rtol=0)


def test_output_site_module_reads_the_mlp_output(tiny_model, tokens) -> None:
    # An SAE on the MLP output (input_site='mlp_out'): attach runs the original MLP first.
    torch.manual_seed(2)
    sae = TopKTranscoder(TranscoderConfig(d_in=D_MODEL, d_out=D_MODEL, d_sae=20, k=4, input_site="mlp_out"))
    with pytest.raises(RuntimeError, match="input_site='mlp_out'"):
        sae(torch.randn(2, D_MODEL))
    clean_logits, clean = tiny_model.run_with_cache(tokens)
    with attach(tiny_model, {1: sae}) as model:
        _, cache = model.run_with_cache(tokens)
    assert_close(cache["blocks.1.hook_mlp_out"], sae.reconstruct(clean["blocks.1.hook_mlp_out"]))
    with attach(tiny_model, {1: sae}, use_error_term=True) as model:
        assert_close(model(tokens), clean_logits, atol=1e-4, rtol=0)
