"""Every normalisation scheme trains, evaluates and patches like any other.

Tiny random HookedTransformers whose MLP input or output is NOT at the named
TransformerLens hooks: Gemma-style normalisation before and after the MLP (`ln2_post`),
OLMo-2-style post-norm (ln2 after the MLP), and fold_ln=False models whose ln2 has its
own weights (LayerNorm and RMSNorm). On each, the activations a module trains on are the
MLP module's own input and output (forward pre-hook / forward hook on blocks[L].mlp, and
blocks[L].mlp(x) == y); a module trains on them, is evaluated spliced in (its exact
splice with the error term leaves the model unchanged), and is patched like on any model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mxd_lens import TopKTranscoder, TranscoderConfig, attach
from mxd_lens.circuits import faithfulness_curve
from mxd_lens.evals import evaluate
from mxd_lens.functional import nmse
from mxd_lens.model_io import post_mlp_norm
from mxd_lens.patching import activation_patch
from mxd_lens.training import ActivationConfig, ActivationSource, TrainerConfig, fit
from tests.training.helpers import tiny_model, tiny_tokens

LAYER = 1

SCHEMES = {
    # Gemma 2/3: RMSNorm before and after the MLP; hook_mlp_out is after ln2_post
    "gemma_ln2_post": dict(normalization_type="RMS", use_normalization_before_and_after=True),
    # OLMo 2: no norm before the MLP, ln2 after it (before hook_mlp_out)
    "olmo2_post_norm": dict(normalization_type="RMS", original_architecture="Olmo2ForCausalLM"),
    # fold_ln=False: ln2's weights (and LayerNorm's bias) sit between hook_normalized and the MLP
    "fold_ln_false_LN": dict(normalization_type="LN", act_fn="gelu", gated_mlp=False),
    "fold_ln_false_RMS": dict(normalization_type="RMS"),
}


def scheme_model(scheme: str):
    """A tiny model of the scheme with non-trivial norm weights (they start at 1 and 0)."""
    model = tiny_model(seed=4, **SCHEMES[scheme])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name:
                base = 1.0 if name.endswith(".w") else 0.0
                p.copy_(base + 0.5 * torch.randn(p.shape, generator=g))
    return model


def mlp_io_by_hand(model, tokens):
    """The input and output of blocks[LAYER].mlp in a plain forward pass, from a forward
    pre-hook and a forward hook on the module itself."""
    seen = {}
    mlp = model.blocks[LAYER].mlp
    handles = [
        mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone())),
        mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("y", out.detach().clone())),
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    d = model.cfg.d_model
    return seen["x"].reshape(-1, d), seen["y"].reshape(-1, d)


def named_hook_io(model, tokens):
    names = [f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    d = model.cfg.d_model
    return cache[names[0]].reshape(-1, d), cache[names[1]].reshape(-1, d)


def ce(logits, tokens) -> float:
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).double(), tokens[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_train_evaluate_and_patch(scheme):
    model = scheme_model(scheme)
    tokens = tiny_tokens(16, seed=1)
    heldout = tiny_tokens(4, seed=2)
    heldout[:, 0] = 0

    # --- the training activations are the MLP module's own input and output -----------
    src = ActivationSource(model, [LAYER], tokens, ActivationConfig(buffer_tokens=256, shuffle_rows=False))
    x, y = src.collect(src.rows)[LAYER]
    x_ref, y_ref = mlp_io_by_hand(model, tokens)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[LAYER].mlp(x), y, rtol=1e-6, atol=1e-6)
    # ...which the named TransformerLens hooks are not, for these models
    x_named, y_named = named_hook_io(model, tokens)
    assert not torch.allclose(x_named, x) or not torch.allclose(y_named, y)
    assert (post_mlp_norm(model) is not None) == scheme.startswith(("gemma", "olmo2"))

    # --- a module trains on them --------------------------------------------------------
    torch.manual_seed(0)
    module = TopKTranscoder(TranscoderConfig(d_in=32, d_out=32, d_sae=64, k=8))
    with torch.no_grad():
        before = float(nmse(module.reconstruct(x, hooked=False), y))
    summary = fit(
        model, {"tc": (LAYER, module)}, tokens,
        TrainerConfig(train_tokens=40 * 64, batch_size=64, lr=1e-2, warmup_steps=2, autocast=None,
                      progress=False, activations=ActivationConfig(buffer_tokens=256)),
    )["tc"]  # fmt: skip
    with torch.no_grad():
        after = float(nmse(module.reconstruct(x, hooked=False), y))
    assert after < 0.5 * before, (before, after)
    assert summary.nmse == pytest.approx(after, rel=0.5)

    # --- evaluated spliced in -----------------------------------------------------------
    baselines, result = evaluate(model, {LAYER: module}, heldout, batch_size=2, progress=False)
    hx, hy = mlp_io_by_hand(model, heldout)
    with torch.no_grad():
        assert result.nmse == pytest.approx(float(nmse(module.reconstruct(hx, hooked=False), hy)), rel=1e-5)
        clean = model(heldout)
        with attach(model, {LAYER: module}):
            spliced = model(heldout)
        handle = model.blocks[LAYER].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            zero = model(heldout)
        finally:
            handle.remove()
    assert baselines.ce_clean == pytest.approx(ce(clean, heldout), rel=1e-5)
    assert baselines.ce_zero_ablation == pytest.approx(ce(zero, heldout), rel=1e-5)
    assert result.ce == pytest.approx(ce(spliced, heldout), rel=1e-5) and result.delta_ce != 0
    _, exact = evaluate(model, {LAYER: module}, heldout, batch_size=2, use_error_term=True, progress=False)
    assert exact.delta_ce == pytest.approx(0, abs=1e-6) and exact.kl == pytest.approx(0, abs=1e-6)

    # --- patched --------------------------------------------------------------------------
    clean_t, corrupted_t = heldout[:2], heldout[:2].clone()
    corrupted_t[:, 3] = (clean_t[:, 3] + 5) % model.cfg.d_vocab
    good, bad = clean_t[:, -1] % 7, clean_t[:, -1] % 7 + 1

    def metric(logits):
        last = logits[:, -1]
        return (last[torch.arange(2), good] - last[torch.arange(2), bad]).mean()

    with attach(model, {LAYER: module}, use_error_term=True):
        name = f"blocks.{LAYER}.mlp.{module.acts_hook_name}"
        _, cache = model.run_with_cache(clean_t, names_filter=[name])
        result = activation_patch(model, clean_t, corrupted_t, metric, LAYER, positions=[3, 5])
        differs = ((cache[name][:, [3, 5]] != model.run_with_cache(corrupted_t, names_filter=[name])[1][name][:, [3, 5]])
                   .any(0).nonzero().tolist())  # fmt: skip
        assert differs
        for i, u in differs[:3]:
            p = [3, 5][i]

            def hook(act, hook, p=p, u=u):
                act = act.clone()
                act[:, p, u] = cache[name][:, p, u]
                return act

            with torch.no_grad():
                ref = float(metric(model.run_with_hooks(corrupted_t, fwd_hooks=[(name, hook)])))
            assert result[i, u].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
        curve = faithfulness_curve(model, clean_t, corrupted_t, metric, LAYER, n_points=6)
    # every node clean == the corrupted run with the clean MLP module output (not hook_mlp_out)
    with torch.no_grad():
        _, y_clean = mlp_io_by_hand(model, clean_t)
        handle = model.blocks[LAYER].mlp.register_forward_hook(lambda m, a, out: y_clean.view_as(out))
        try:
            ref_full = float(metric(model(corrupted_t)))
        finally:
            handle.remove()
    assert curve.full_patch_metric == pytest.approx(ref_full, rel=1e-4, abs=1e-5)
    assert curve.fraction[-1] == pytest.approx(1.0, abs=1e-4)
