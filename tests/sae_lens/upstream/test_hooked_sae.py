# type: ignore
# Adapted from SAE-Lens (https://github.com/decoderesearch/SAELens), tests/analysis/test_hooked_sae.py
# (the stored revision aa118708; every API it uses is sae-lens 6.54.12's).
# Copyright (c) 2023 Joseph Bloom. MIT License: see tests/sae_lens/upstream/LICENSE-SAELens.
#
# Changed: only the SAEs built and the model. The hub model solu-1l is replaced by a local
# random model of its family (`solu_1l_like_cfg`: one block, SoLU-LN MLP, d_model 64);
# SAE-Lens's StandardSAEs on four hooks of block 0 are replaced by our three architectures,
# each a transcoder of block 0's MLP (blocks.0.mlp.hook_in -> blocks.0.hook_mlp_out), and our
# TopK SAE on the MLP output (blocks.0.hook_mlp_out), an SAE that reconstructs its own input
# as SAE-Lens's do; the activations fed to each are those of its input hook, as SAE-Lens's
# transcoder tests do.
# The stored revision's module-level skip `if not has_hooked_transformer()` (a helper newer
# than sae-lens 6.54.12, for transformer-lens 4) is dropped: transformer-lens 3.9 has
# HookedTransformer. The upstream file's error-term test has its feature-gradient test pasted into its middle;
# it is copied as it is.
import einops
import pytest
import torch
from transformer_lens.hook_points import HookPoint

from sae_lens.saes.sae import SAE
from tests.sae_lens.upstream.helpers import (
    ALL_ARCHITECTURES,
    OUTPUT_SITE_SAE,
    SOLU_1L_MODEL,
    assert_close,
    build_hooked_sae,
    local_tokenizer,
    solu_1l_like_cfg,
)

from transformer_lens import HookedTransformer

from sae_lens import HookedSAETransformer

MODEL = SOLU_1L_MODEL
prompt = "Hello World!"


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):  # type: ignore
        self.count += 1


@pytest.fixture(scope="module")
def model():
    model = HookedSAETransformer(solu_1l_like_cfg(), tokenizer=local_tokenizer())
    yield model
    model.reset_saes()


@pytest.fixture(scope="module")
def original_logits(model: HookedTransformer):
    return model(prompt)


def get_hooked_sae(model: HookedTransformer, architecture: str) -> SAE:
    return build_hooked_sae(architecture, model.cfg.d_model, layer=0, model_name=MODEL)


@pytest.fixture(
    scope="module",
    params=[*ALL_ARCHITECTURES, OUTPUT_SITE_SAE],
    ids=[*ALL_ARCHITECTURES, OUTPUT_SITE_SAE],
)
def hooked_sae(
    model: HookedTransformer,
    request: pytest.FixtureRequest,
) -> SAE:
    return get_hooked_sae(model, request.param)


def test_forward_reconstructs_input(model: HookedTransformer, hooked_sae: SAE):
    """Verfiy that the HookedSAE returns an output with the same shape as the input activations."""

    act_name = hooked_sae.cfg.metadata.hook_name
    _, cache = model.run_with_cache(prompt, names_filter=act_name)
    x = cache[act_name]

    sae_output = hooked_sae(x)
    assert sae_output.shape == x.shape


def test_run_with_cache(model: HookedTransformer, hooked_sae: SAE):
    """Verifies that run_with_cache caches SAE activations"""

    act_name = hooked_sae.cfg.metadata.hook_name
    _, cache = model.run_with_cache(prompt, names_filter=act_name)
    x = cache[act_name]

    sae_output, cache = hooked_sae.run_with_cache(x)
    assert sae_output.shape == x.shape

    assert "hook_sae_input" in cache
    assert "hook_sae_acts_pre" in cache
    assert "hook_sae_acts_post" in cache
    assert "hook_sae_recons" in cache
    assert "hook_sae_output" in cache


def test_run_with_hooks(model: HookedTransformer, hooked_sae: SAE):
    """Verifies that run_with_hooks works with SAE activations"""

    c = Counter()
    act_name = hooked_sae.cfg.metadata.hook_name

    _, cache = model.run_with_cache(prompt, names_filter=act_name)
    x = cache[act_name]

    sae_hooks = [
        "hook_sae_input",
        "hook_sae_acts_pre",
        "hook_sae_acts_post",
        "hook_sae_recons",
        "hook_sae_output",
    ]

    sae_output = hooked_sae.run_with_hooks(
        x, fwd_hooks=[(sae_hook_name, c.inc) for sae_hook_name in sae_hooks]
    )
    assert sae_output.shape == x.shape

    assert c.count == len(sae_hooks)


def test_error_term(model: HookedTransformer, hooked_sae: SAE):
    """Verifies that that if we use error_terms, HookedSAE returns an output that is equal tdef test_feature_grads_with_error_term(model: HookedTransformer, hooked_sae: SparseAutoencoderBase):
    o the input activations."""
    if hooked_sae.cfg.metadata.hook_name != hooked_sae.cfg.metadata.hook_name_out:
        pytest.skip(
            "wrong for a transcoder by design: a standalone SAE's error term is its input minus its "
            "reconstruction, but a transcoder's input (the MLP input) is not what it reconstructs (the MLP "
            "output); our transcoders refuse use_error_term outside HookedSAETransformer.add_sae / attach, "
            "whose error term (MLP output minus reconstruction) test_hooked_sae_transformer.py checks"
        )

    act_name = hooked_sae.cfg.metadata.hook_name
    hooked_sae.use_error_term = True

    _, cache = model.run_with_cache(prompt, names_filter=act_name)
    x = cache[act_name]

    sae_output = hooked_sae(x)
    assert sae_output.shape == x.shape
    assert_close(sae_output, x, atol=1e-6)

    """Verifies that pytorch backward computes the correct feature gradients when using error_terms. Motivated by the need to compute feature gradients for attribution patching."""

    act_name = hooked_sae.cfg.metadata.hook_name
    hooked_sae.use_error_term = True

    # Get input activations
    _, cache = model.run_with_cache(prompt, names_filter=act_name)
    x = cache[act_name]

    # Cache gradients with respect to feature acts
    hooked_sae.reset_hooks()
    grad_cache = {}

    def backward_cache_hook(act: torch.Tensor, hook: HookPoint):
        grad_cache[hook.name] = act.detach()

    hooked_sae.add_hook("hook_sae_acts_post", backward_cache_hook, "bwd")  # type: ignore
    hooked_sae.add_hook("hook_sae_output", backward_cache_hook, "bwd")  # type: ignore

    sae_output = hooked_sae(x)
    assert_close(sae_output, x, atol=1e-6)
    value = sae_output.sum()
    value.backward()
    hooked_sae.reset_hooks()

    # Compute gradient analytically
    if act_name.endswith("hook_z"):
        reshaped_output_grad = einops.rearrange(
            grad_cache["hook_sae_output"], "... n_heads d_head -> ... (n_heads d_head)"
        )
        analytic_grad = reshaped_output_grad @ hooked_sae.W_dec.T
    else:
        analytic_grad = grad_cache["hook_sae_output"] @ hooked_sae.W_dec.T

    # Compare analytic gradient with pytorch computed gradient
    assert_close(grad_cache["hook_sae_acts_post"], analytic_grad, atol=1e-6)

