"""The output-site SAE: trained by SAE-Lens's own runner on the default model and corpus,
wrapped as a replacement that attach() feeds the MLP's output."""

from __future__ import annotations

import pytest
import torch

import mxd_lens
from mxd_lens import attach
from mxd_lens.patching import activation_patch
from mxd_lens.sae_site import OutputSAEConfig, OutputSiteSAE, SAETrainConfig, train_sae_lens

LAYER = 2


@pytest.fixture(scope="module")
def trained(default_model):
    from mxd_lens.sources import load_default_corpus, token_rows

    rows = token_rows(default_model.tokenizer, load_default_corpus("train"), 64, max_rows=160)
    sae = train_sae_lens(default_model, LAYER, rows, SAETrainConfig(d_sae=256, k=8, training_tokens=32768, lr=2e-3,
                                                                     batch_size_tokens=512))
    return OutputSiteSAE.from_sae_lens(sae), sae


def test_wrapper_equals_sae_lens_forward(default_model, heldout_tokens, trained):
    module, sae = trained
    assert module.cfg.input_site == "mlp_out" and module.cfg.layer == LAYER
    name = f"blocks.{LAYER}.hook_mlp_out"
    _, cache = default_model.run_with_cache(heldout_tokens, names_filter=name)
    y = cache[name]
    with torch.no_grad():
        ref = sae.decode(sae.encode(y))
        got = module.reconstruct(y, hooked=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # SAE-Lens trained something: better than predicting the mean
    nmse = ((got - y) ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum()
    assert nmse < 0.9


def test_attach_feeds_the_mlp_output(default_model, heldout_tokens, trained):
    module, _ = trained
    out_name = f"blocks.{LAYER}.hook_mlp_out"
    base_logits, base = default_model.run_with_cache(heldout_tokens, names_filter=out_name)
    with attach(default_model, {LAYER: module}, use_error_term=True):
        logits, cache = default_model.run_with_cache(
            heldout_tokens, names_filter=lambda n: n.startswith(f"blocks.{LAYER}.mlp.hook_") or n == out_name
        )
        assert f"blocks.{LAYER}.mlp.hook_latent_acts" in cache
        torch.testing.assert_close(cache[f"blocks.{LAYER}.mlp.hook_in"], base[out_name])  # never the MLP input
        torch.testing.assert_close(logits, base_logits, rtol=1e-4, atol=1e-4)
        # one patching code path serves SAE latents too: a cell against a hand-written run
        clean, corrupted = heldout_tokens[:1], heldout_tokens[1:2]
        target = int(clean[0, -1])

        def metric(lg):
            return lg[:, -2, target].mean()

        name = f"blocks.{LAYER}.mlp.hook_latent_acts"
        a_clean = default_model.run_with_cache(clean, names_filter=name)[1][name]
        a_corr = default_model.run_with_cache(corrupted, names_filter=name)[1][name]
        p = clean.shape[1] - 2
        u = int((a_clean[0, p] - a_corr[0, p]).abs().argmax())
        cell = activation_patch(default_model, clean, corrupted, metric, LAYER, units=[u], positions=[p])

        def hook(act, hook):
            act = act.clone()
            act[:, p, u] = a_clean[:, p, u]
            return act

        with torch.no_grad():
            ref = metric(default_model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))
    assert cell[0, 0].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-4)


def test_save_load_round_trip(trained, tmp_path):
    module, _ = trained
    loaded = mxd_lens.load(module.save(tmp_path / "sae"))
    assert isinstance(loaded, OutputSiteSAE) and loaded.cfg == module.cfg
    for k, v in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_config_refuses_mlp_in():
    with pytest.raises(ValueError, match="input_site='mlp_in'"):
        OutputSAEConfig(d_in=8, d_out=8, d_sae=16, k=2, input_site="mlp_in")


def test_sae_lens_runner_refuses_a_post_mlp_norm_model():
    """SAE-Lens's runner reads blocks.L.hook_mlp_out, which a post-MLP-norm model
    normalises: an SAE trained there would be attached on the MLP's own output."""
    from tests.training.helpers import tiny_model, tiny_tokens

    cfg = SAETrainConfig(d_sae=16, k=2, training_tokens=64)
    for overrides in (dict(normalization_type="RMS", use_normalization_before_and_after=True),
                      dict(normalization_type="RMS", original_architecture="Olmo2ForCausalLM")):  # fmt: skip
        with pytest.raises(ValueError, match="hook_mlp_out of this model is after .*mxd_lens.training.fit"):
            train_sae_lens(tiny_model(**overrides), 1, tiny_tokens(4), cfg)
