# type: ignore
# Adapted from SAE-Lens (https://github.com/decoderesearch/SAELens),
# tests/analysis/test_hooked_sae_transformer.py (the newest stored revision, the one with the
# exclude_special_tokens tests; every API it uses is sae-lens 6.54.12's: add_sae(use_error_term=
# None, exclude_special_tokens=...), blocks.L.mlp.hook_in...).
# Copyright (c) 2023 Joseph Bloom. MIT License: see tests/sae_lens/upstream/LICENSE-SAELens.
#
# Changed: only the SAEs built and the model.
# - Model: tiny-stories-1M from the hub is replaced by a local random model of its shape
#   (`tiny_stories_like_cfg`: d_model 64, 16 heads of 4, d_mlp 256, LN, gelu_new; 4 layers).
# - SAEs: SAE-Lens's StandardSAEs on four hooks of block 0 are replaced by our three
#   architectures, each a transcoder of an MLP (blocks.L.mlp.hook_in -> blocks.L.hook_mlp_out,
#   SAE-Lens's transcoder tests' hooks): `hooked_sae` is each architecture at block 0, the
#   list is MxD@0, TopK transcoder@1, skip transcoder@2 (one per output hook). Where a test
#   assumed input hook == output hook, it looks where a transcoder lives, as SAE-Lens's
#   transcoder tests do: `_acts_to_saes` under the input hook, the wrapper and its cache
#   entries at the output hook (`out_name`). The Transcoder section runs on each of ours;
#   test_mixed_sae_and_transcoder keeps SAE-Lens's StandardSAE on blocks.0.hook_resid_pre
#   beside ours; test_multiple_saes_get_gradients and test_add_sae_warns_for_invalid_hook build
#   ours (on blocks 0-2, on a missing hook); test_error_term_unchanged_when_latents_ablated runs
#   on each of ours.
# Left out: test_HookedSAETransformer_works_with_hook_z_saes (a hub hook_z SAE on gpt2: our
# modules never read hook_z). test_HookedSAETransformer_adds_hook_in_to_mlp runs on the
# local model (its expected shape is then (1, n_tokens, d_model) instead of gpt2's).

import pytest
import torch
from transformer_lens import HookedTransformer
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint  # Hooking utilities
from transformer_lens.HookedTransformer import Loss

from sae_lens.analysis.hooked_sae_transformer import (
    HookedSAETransformer,
    _SAEWrapper,
    get_deep_attr,
)
from sae_lens.saes.sae import SAE, SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from tests.sae_lens.upstream.helpers import (
    ALL_ARCHITECTURES,
    TINYSTORIES_MODEL,
    assert_close,
    assert_not_close,
    build_hooked_sae,
    local_tokenizer,
    tiny_stories_like_cfg,
)

MODEL = TINYSTORIES_MODEL
prompt = "Hello World!"


Output = torch.Tensor | tuple[torch.Tensor, Loss] | None


def get_logits(output: Output) -> torch.Tensor:
    if output is None:
        raise ValueError("Model output is None")
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and len(output) == 2:
        return output[0]
    raise ValueError(f"Unexpected output type: {type(output)}")


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):  # type: ignore
        self.count += 1


def new_model() -> HookedSAETransformer:
    """The local stand-in for HookedSAETransformer.from_pretrained(tiny-stories-1M)."""
    return HookedSAETransformer(tiny_stories_like_cfg(), tokenizer=local_tokenizer())


def out_name(sae: SAE) -> str:
    """Where the wrapper of a transcoder sits (and its hooks are cached): the output hook."""
    return sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name


@pytest.fixture(scope="module")
def model():
    model = new_model()
    yield model
    model.reset_saes()  # type: ignore


@pytest.fixture(scope="module")
def original_logits(model: HookedTransformer):
    return model(prompt)


def get_hooked_sae(model: HookedTransformer, architecture: str, layer: int = 0) -> SAE:
    return build_hooked_sae(architecture, model.cfg.d_model, layer=layer, model_name=MODEL, seed=layer)


@pytest.fixture(
    scope="module",
    params=ALL_ARCHITECTURES,
    ids=ALL_ARCHITECTURES,
)
def hooked_sae(
    model: HookedTransformer,
    request: pytest.FixtureRequest,
) -> SAE:
    return get_hooked_sae(model, request.param)


@pytest.fixture(scope="module")
def list_of_hooked_saes(
    model: HookedTransformer,
):
    return [get_hooked_sae(model, arch, layer) for layer, arch in enumerate(ALL_ARCHITECTURES)]


def test_model_with_no_saes_matches_original_model(
    model: HookedTransformer, original_logits: torch.Tensor
):
    """Verifies that HookedSAETransformer behaves like a normal HookedTransformer model when no SAEs are attached."""
    assert len(model._acts_to_saes) == 0  # type: ignore
    logits = model(prompt)
    assert_close(original_logits, logits)


def test_model_with_saes_does_not_match_original_model(
    model: HookedTransformer,
    hooked_sae: SAE,
    original_logits: torch.Tensor,
):
    """Verifies that the attached (and turned on) SAEs actually affect the models output logits"""
    assert len(model._acts_to_saes) == 0  # type: ignore
    model.add_sae(hooked_sae)  # type: ignore
    assert len(model._acts_to_saes) == 1  # type: ignore
    logits_with_saes = model(prompt)
    assert_not_close(original_logits, logits_with_saes)
    model.reset_saes()


def test_add_sae(model: HookedTransformer, hooked_sae: SAE):
    """Verifies that add_sae correctly updates the model's _acts_to_saes dictionary and replaces the HookPoint."""
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)  # type: ignore
    assert len(model._acts_to_saes) == 1  # type: ignore
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_name(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae
    model.reset_saes()


def test_acts_to_saes_property_returns_unwrapped_saes(
    model: HookedSAETransformer, hooked_sae: SAE
):
    """Verifies that acts_to_saes property returns unwrapped SAEs, not wrappers."""
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)

    # The property should return the underlying SAE, not the wrapper
    assert act_name in model.acts_to_saes
    assert model.acts_to_saes[act_name] == hooked_sae
    assert not isinstance(model.acts_to_saes[act_name], _SAEWrapper)

    # The internal dict should have wrappers
    assert isinstance(model._acts_to_saes[act_name], _SAEWrapper)

    model.reset_saes()


def test_add_sae_warns_for_invalid_hook(
    model: HookedSAETransformer, caplog: pytest.LogCaptureFixture
):
    """Verifies that add_sae logs a warning when given an invalid hook name."""
    sae = get_hooked_sae(model, "topk_transcoder")
    sae.cfg.metadata.hook_name = "invalid.hook.name"

    with caplog.at_level("WARNING"):
        model.add_sae(sae)

    assert "No hook found for invalid.hook.name" in caplog.text
    assert len(model._acts_to_saes) == 0


def test_reset_sae_warns_for_unattached_sae(
    model: HookedSAETransformer, caplog: pytest.LogCaptureFixture
):
    """Verifies that reset_sae logs a warning when no SAE is attached."""
    with caplog.at_level("WARNING"):
        model._reset_sae("blocks.0.hook_mlp_out")

    assert "No SAE is attached to blocks.0.hook_mlp_out" in caplog.text


def test_add_sae_overwrites_prev_sae(model: HookedTransformer, hooked_sae: SAE):
    """Verifies that add_sae correctly updates the model's _acts_to_saes dictionary and replaces the HookPoint."""

    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)

    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_name(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae

    second_hooked_sae = SAE.from_dict(hooked_sae.cfg.to_dict())  # type: ignore
    model.add_sae(second_hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == second_hooked_sae
    wrapper = get_deep_attr(model, out_name(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == second_hooked_sae
    model.reset_saes()


def test_reset_sae_removes_sae_by_default(model: HookedTransformer, hooked_sae: SAE):
    """Verifies that reset_sae correctly removes the SAE from the model's _acts_to_saes dictionary and replaces the wrapper with a HookPoint."""

    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_name(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae
    model._reset_sae(act_name)
    assert len(model._acts_to_saes) == 0
    assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    model.reset_saes()


def test_reset_sae_replaces_sae(model: HookedTransformer, hooked_sae: SAE):
    """Verifies that reset_sae correctly removes the SAE from the model's _acts_to_saes dictionary and replaces the wrapper with a new wrapper."""

    act_name = hooked_sae.cfg.metadata.hook_name
    second_hooked_sae = SAE.from_dict(hooked_sae.cfg.to_dict())  # type: ignore

    model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_name(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae
    model._reset_sae(act_name, _SAEWrapper(second_hooked_sae))
    assert len(model._acts_to_saes) == 1
    wrapper = get_deep_attr(model, out_name(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == second_hooked_sae
    model.reset_saes()


def test_reset_saes_removes_all_saes_by_default(
    model: HookedTransformer, list_of_hooked_saes: list[SAE]
):
    """Verifies that reset_saes correctly removes all SAEs from the model's _acts_to_saes dictionary and replaces the HookedSAEs with HookPoints."""

    act_names = [
        hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes
    ]
    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == len(act_names)
    for act_name, hooked_sae in zip(act_names, list_of_hooked_saes):
        assert model._acts_to_saes[act_name].sae == hooked_sae
        wrapper = get_deep_attr(model, out_name(hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == hooked_sae
    model.reset_saes()
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    model.reset_saes()


def test_reset_saes_with_specific_act_names(
    model: HookedTransformer, list_of_hooked_saes: list[SAE]
):
    """Verifies that reset_saes can reset specific SAEs by act_name."""

    act_names = [
        hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes
    ]

    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)

    assert len(model._acts_to_saes) == len(act_names)

    # Reset only the first SAE
    model.reset_saes(act_names[0])
    assert len(model._acts_to_saes) == len(act_names) - 1
    assert act_names[0] not in model._acts_to_saes
    assert isinstance(get_deep_attr(model, out_name(list_of_hooked_saes[0])), HookPoint)

    # Remaining SAEs should still be attached
    for act_name in act_names[1:]:
        assert act_name in model._acts_to_saes

    model.reset_saes()


def test_saes_context_manager_removes_saes_after(
    model: HookedTransformer, list_of_hooked_saes: list[SAE]
):
    """Verifies that the model.saes context manager successfully adds the SAEs for the specified activation name in the context manager and resets off after the context manager exits."""

    act_names = [
        hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes
    ]

    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    with model.saes(saes=list_of_hooked_saes):
        for act_name, hooked_sae in zip(act_names, list_of_hooked_saes):
            assert model._acts_to_saes[act_name].sae == hooked_sae
            wrapper = get_deep_attr(model, out_name(hooked_sae))
            assert isinstance(wrapper, _SAEWrapper)
            assert wrapper.sae == hooked_sae
        model.forward(prompt)  # type: ignore
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    model.reset_saes()


def test_saes_context_manager_restores_previous_sae_state(
    model: HookedTransformer, list_of_hooked_saes: list[SAE]
):
    """Verifies that the model.saes context manager successfully adds the SAEs for the specified activation name in the context manager and resets off after the context manager exits."""

    # First add SAEs statefully
    prev_hooked_saes = list_of_hooked_saes
    for prev_hooked_sae in prev_hooked_saes:
        model.add_sae(prev_hooked_sae)
        wrapper = get_deep_attr(model, out_name(prev_hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == prev_hooked_sae
    assert len(model._acts_to_saes) == len(prev_hooked_saes)

    # Now temporarily run with new SAEs
    hooked_saes = [get_hooked_sae(model, arch, layer) for layer, arch in enumerate(ALL_ARCHITECTURES)]
    with model.saes(saes=hooked_saes):
        for hooked_sae in hooked_saes:
            assert model._acts_to_saes[hooked_sae.cfg.metadata.hook_name].sae == hooked_sae
            wrapper = get_deep_attr(model, out_name(hooked_sae))
            assert isinstance(wrapper, _SAEWrapper)
            assert wrapper.sae == hooked_sae
        model.forward(prompt)  # type: ignore

    # Check that the previously attached SAEs have been restored
    assert len(model._acts_to_saes) == len(prev_hooked_saes)
    for prev_hooked_sae in prev_hooked_saes:
        wrapper = get_deep_attr(model, out_name(prev_hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == prev_hooked_sae
    model.reset_saes()


def test_saes_context_manager_run_with_cache(
    model: HookedTransformer, list_of_hooked_saes: list[SAE]
):
    """Verifies that the model.run_with_cache method works correctly in the context manager."""

    act_names = [
        hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes
    ]
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    with model.saes(saes=list_of_hooked_saes):
        for act_name, hooked_sae in zip(act_names, list_of_hooked_saes):
            assert model._acts_to_saes[act_name].sae == hooked_sae
            wrapper = get_deep_attr(model, out_name(hooked_sae))
            assert isinstance(wrapper, _SAEWrapper)
            assert wrapper.sae == hooked_sae
        model.run_with_cache(prompt)
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    model.reset_saes()


def test_run_with_saes(
    model: HookedTransformer,
    list_of_hooked_saes: list[SAE],
    original_logits: torch.Tensor,
):
    """Verifies that the model.run_with_saes method works correctly. The logits with SAEs should be different from the original logits, but the SAE should be removed immediately after the forward pass."""

    assert len(model._acts_to_saes) == 0
    logits_with_saes = model.run_with_saes(prompt, saes=list_of_hooked_saes)
    assert_not_close(logits_with_saes, original_logits)
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    model.reset_saes()


def test_run_with_cache(
    model: HookedTransformer,
    list_of_hooked_saes: list[SAE],
    original_logits: torch.Tensor,
):
    """Verifies that the model.run_with_cache method works correctly. The logits with SAEs should be different from the original logits and the cache should contain SAE activations for the attached SAE."""
    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == len(list_of_hooked_saes)
    logits_with_saes, cache = model.run_with_cache(prompt)
    assert_not_close(logits_with_saes, original_logits)
    assert isinstance(cache, ActivationCache)
    for hooked_sae in list_of_hooked_saes:
        assert out_name(hooked_sae) + ".hook_sae_acts_post" in cache
        wrapper = get_deep_attr(model, out_name(hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == hooked_sae
    model.reset_saes()


def test_run_with_cache_with_saes(
    model: HookedTransformer,
    list_of_hooked_saes: list[SAE],
    original_logits: torch.Tensor,
):
    """Verifies that the model.run_with_cache_with_saes method works correctly. The logits with SAEs should be different from the original logits and the cache should contain SAE activations for the attached SAE."""

    logits_with_saes, cache = model.run_with_cache_with_saes(
        prompt, saes=list_of_hooked_saes
    )
    assert_not_close(logits_with_saes, original_logits)
    assert isinstance(cache, ActivationCache)

    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert out_name(hooked_sae) + ".hook_sae_acts_post" in cache
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    model.reset_saes()


def test_run_with_hooks(
    model: HookedTransformer,
    list_of_hooked_saes: list[SAE],
    original_logits: torch.Tensor,
):
    """Verifies that the model.run_with_hooks method works correctly when SAEs are attached. The count should be incremented by 1 when the hooked SAE is called, and the SAE should stay attached after the forward pass"""

    c = Counter()

    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)

    logits_with_saes = model.run_with_hooks(
        prompt,
        fwd_hooks=[(out_name(sae) + ".hook_sae_acts_post", c.inc) for sae in list_of_hooked_saes],
    )
    assert_not_close(logits_with_saes, original_logits)

    for hooked_sae in list_of_hooked_saes:
        wrapper = get_deep_attr(model, out_name(hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == hooked_sae
    assert c.count == len(list_of_hooked_saes)
    model.reset_saes()
    model.remove_all_hook_fns(including_permanent=True)


def test_run_with_hooks_with_saes(
    model: HookedTransformer,
    list_of_hooked_saes: list[SAE],
    original_logits: torch.Tensor,
):
    """Verifies that the model.run_with_hooks_with_saes method works correctly when SAEs are attached. The count should be incremented by 1 when the hooked SAE is called, but the SAE should be removed immediately after the forward pass."""

    c = Counter()

    logits_with_saes = model.run_with_hooks_with_saes(
        prompt,
        saes=list_of_hooked_saes,
        fwd_hooks=[(out_name(sae) + ".hook_sae_acts_post", c.inc) for sae in list_of_hooked_saes],
    )
    assert_not_close(logits_with_saes, original_logits)
    assert c.count == len(list_of_hooked_saes)

    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_name(hooked_sae)), HookPoint)
    model.reset_saes()
    model.remove_all_hook_fns(including_permanent=True)


def test_model_with_use_error_term_saes_matches_original_model(
    model: HookedTransformer,
    hooked_sae: SAE,
    original_logits: torch.Tensor,
):
    """Verifies that the attached (and turned on) SAEs actually affect the models output logits"""
    assert len(model._acts_to_saes) == 0
    model.add_sae(hooked_sae, use_error_term=True)
    assert len(model._acts_to_saes) == 1
    logits_with_saes = model(prompt)
    model.reset_saes()
    assert_close(original_logits, logits_with_saes, atol=1e-4)


def test_add_sae_with_use_error_term(model: HookedSAETransformer, hooked_sae: SAE):
    """Verifies that add_sae correctly sets the use_error_term on the wrapper."""
    act_name = out_name(hooked_sae)

    model.add_sae(hooked_sae, use_error_term=True)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is True

    model.add_sae(hooked_sae, use_error_term=False)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is False

    # None defaults to SAE's setting (currently False)
    model.add_sae(hooked_sae, use_error_term=None)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is False  # SAE's use_error_term is False

    model.reset_saes()


def test_add_sae_respects_sae_use_error_term_setting(
    model: HookedSAETransformer, hooked_sae: SAE
):
    """Verifies that add_sae respects the SAE's use_error_term when None is passed."""
    act_name = out_name(hooked_sae)

    # When SAE has use_error_term=True and we pass None, should use SAE's setting
    hooked_sae._use_error_term = True  # Set directly to avoid deprecation warning
    model.add_sae(hooked_sae, use_error_term=None)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is True  # Respects SAE's setting

    model.reset_saes()

    # Explicit False should override SAE's True
    model.add_sae(hooked_sae, use_error_term=False)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is False

    model.reset_saes()
    hooked_sae._use_error_term = False  # Reset to original


def test_saes_context_manager_with_use_error_term(
    model: HookedSAETransformer, hooked_sae: SAE
):
    """Verifies that the saes context manager correctly handles use_error_term."""
    act_name = out_name(hooked_sae)
    original_use_error_term = hooked_sae.use_error_term

    with model.saes(saes=[hooked_sae], use_error_term=True):
        wrapper = get_deep_attr(model, act_name)
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.use_error_term is True

    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0


def test_run_with_saes_with_use_error_term(
    model: HookedSAETransformer,
    hooked_sae: SAE,
    recwarn: pytest.WarningsRecorder,
):
    """Verifies that run_with_saes correctly handles use_error_term."""
    original_use_error_term = hooked_sae.use_error_term

    model.run_with_saes(prompt, saes=[hooked_sae], use_error_term=True)
    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0

    # Also test with SAE that already has use_error_term=True (legacy usage)
    hooked_sae._use_error_term = True  # Set directly to avoid warning during setup
    model.run_with_saes(prompt, saes=[hooked_sae])
    hooked_sae._use_error_term = original_use_error_term  # Restore

    # Verify no use_error_term deprecation warning was triggered
    use_error_term_warnings = [w for w in recwarn if "use_error_term" in str(w.message)]
    assert len(use_error_term_warnings) == 0


def test_run_with_cache_with_saes_with_use_error_term(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that run_with_cache_with_saes correctly handles use_error_term."""
    act_name = out_name(hooked_sae)
    original_use_error_term = hooked_sae.use_error_term

    _, cache = model.run_with_cache_with_saes(
        prompt, saes=[hooked_sae], use_error_term=True
    )
    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0
    assert act_name + ".hook_sae_acts_post" in cache


def test_use_error_term_restoration_after_exception(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that use_error_term is restored even if an exception occurs."""
    original_use_error_term = hooked_sae.use_error_term

    try:
        with model.saes(saes=[hooked_sae], use_error_term=True):
            raise Exception("Test exception")
    except Exception:
        pass

    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0


def test_add_sae_with_use_error_term_true(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that add_sae with use_error_term=True doesn't change the model output."""
    # Get output without SAE
    output_without_sae = get_logits(model(prompt))

    # Add SAE with use_error_term=True
    model.add_sae(hooked_sae, use_error_term=True)
    output_with_sae = get_logits(model(prompt))

    # Compare outputs
    assert_close(output_without_sae, output_with_sae, atol=1e-4)

    # Clean up
    model.reset_saes()


def test_run_with_saes_use_error_term_true(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that run_with_saes with use_error_term=True doesn't change the model output."""
    # Get output without SAE
    output_without_sae = get_logits(model(prompt))

    # Run with SAE and use_error_term=True
    output_with_sae = get_logits(
        model.run_with_saes(prompt, saes=[hooked_sae], use_error_term=True)
    )

    # Compare outputs
    assert_close(output_without_sae, output_with_sae, atol=1e-4)


def test_run_with_cache_with_saes_use_error_term_true(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that run_with_cache_with_saes with use_error_term=True doesn't change the model output."""
    # Get output without SAE
    output_without_sae, _ = model.run_with_cache(prompt)
    output_without_sae = get_logits(output_without_sae)

    # Run with SAE and use_error_term=True
    output_with_sae, cache_with_sae = model.run_with_cache_with_saes(
        prompt, saes=[hooked_sae], use_error_term=True
    )
    output_with_sae = get_logits(output_with_sae)

    # Compare outputs - with use_error_term=True, final outputs should match
    assert_close(output_without_sae, output_with_sae, atol=1e-4)

    # Verify that the cache contains the SAE activations
    assert out_name(hooked_sae) + ".hook_sae_acts_post" in cache_with_sae


def test_add_sae_with_use_error_term_false(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that add_sae with use_error_term=False changes the model output."""
    # Get output without SAE
    output_without_sae = get_logits(model(prompt))

    # Add SAE with use_error_term=False
    model.add_sae(hooked_sae, use_error_term=False)
    output_with_sae = get_logits(model(prompt))

    # Compare outputs - they should be different
    assert_not_close(output_without_sae, output_with_sae, atol=1e-5)

    # Clean up
    model.reset_saes()


def test_run_with_saes_use_error_term_false(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that run_with_saes with use_error_term=False changes the model output."""
    # Get output without SAE
    output_without_sae = get_logits(model(prompt))

    # Run with SAE and use_error_term=False
    output_with_sae = get_logits(
        model.run_with_saes(prompt, saes=[hooked_sae], use_error_term=False)
    )

    # Compare outputs - they should be different
    assert_not_close(output_without_sae, output_with_sae, atol=1e-4)


def test_run_with_cache_with_saes_use_error_term_false(
    model: HookedSAETransformer,
    hooked_sae: SAE,
):
    """Verifies that run_with_cache_with_saes with use_error_term=False changes the model output."""
    # Get output without SAE
    output_without_sae, cache_without_sae = model.run_with_cache(prompt)
    output_without_sae = get_logits(output_without_sae)

    # Run with SAE and use_error_term=False
    output_with_sae, cache_with_sae = model.run_with_cache_with_saes(
        prompt, saes=[hooked_sae], use_error_term=False
    )
    output_with_sae = get_logits(output_with_sae)

    # Compare outputs - they should be different
    assert_not_close(output_without_sae, output_with_sae, atol=1e-4)

    # Verify that the cache contains the SAE activations
    assert out_name(hooked_sae) + ".hook_sae_acts_post" in cache_with_sae

    # Verify that the activations at the SAE hook point are different in both caches
    assert_not_close(
        cache_without_sae[out_name(hooked_sae)],
        cache_with_sae[out_name(hooked_sae) + ".hook_sae_output"],
        atol=1e-5,
    )


def test_HookedSAETransformer_adds_hook_in_to_mlp():
    model = new_model()
    _, cache = model.run_with_cache(prompt)
    n_tokens = model.to_tokens(prompt).shape[-1]
    for n in range(model.cfg.n_layers):
        assert f"blocks.{n}.mlp.hook_in" in cache
        assert cache[f"blocks.{n}.mlp.hook_in"].shape == (1, n_tokens, model.cfg.d_model)


# ============================================================================
# Transcoder Tests
# ============================================================================


def get_transcoder(model: HookedTransformer, architecture: str) -> SAE:
    """Create a transcoder: blocks.0.mlp.hook_in -> blocks.0.hook_mlp_out."""
    return get_hooked_sae(model, architecture, layer=0)


@pytest.fixture(scope="module", params=ALL_ARCHITECTURES, ids=ALL_ARCHITECTURES)
def transcoder(model: HookedTransformer, request: pytest.FixtureRequest) -> SAE:
    return get_transcoder(model, request.param)


def test_add_transcoder_changes_output(
    model: HookedSAETransformer,
    transcoder: SAE,
    original_logits: torch.Tensor,
):
    model.add_sae(transcoder)
    assert len(model._acts_to_saes) == 1
    logits_with_transcoder = model(prompt)
    assert_not_close(original_logits, logits_with_transcoder)
    model.reset_saes()


def test_transcoder_with_error_term_preserves_output(
    model: HookedSAETransformer,
    transcoder: SAE,
    original_logits: torch.Tensor,
):
    model.add_sae(transcoder, use_error_term=True)
    assert len(model._acts_to_saes) == 1
    logits_with_transcoder = model(prompt)
    model.reset_saes()
    assert_close(original_logits, logits_with_transcoder, atol=1e-4)


def test_transcoder_reset_removes_transcoder(
    model: HookedSAETransformer,
    transcoder: SAE,
):
    act_name = transcoder.cfg.metadata.hook_name
    model.add_sae(transcoder)
    assert len(model._acts_to_saes) == 1
    assert act_name in model._acts_to_saes
    model.reset_saes()
    assert len(model._acts_to_saes) == 0
    assert isinstance(get_deep_attr(model, act_name), HookPoint)
    assert isinstance(get_deep_attr(model, out_name(transcoder)), HookPoint)


def test_transcoder_context_manager(
    model: HookedSAETransformer,
    transcoder: SAE,
    original_logits: torch.Tensor,
):
    act_name = transcoder.cfg.metadata.hook_name

    assert len(model._acts_to_saes) == 0
    with model.saes(saes=[transcoder]):
        assert len(model._acts_to_saes) == 1
        assert act_name in model._acts_to_saes
        logits_with_transcoder = model(prompt)
        assert_not_close(original_logits, logits_with_transcoder)

    assert len(model._acts_to_saes) == 0
    assert isinstance(get_deep_attr(model, act_name), HookPoint)


def test_transcoder_context_manager_with_error_term(
    model: HookedSAETransformer,
    transcoder: SAE,
    original_logits: torch.Tensor,
):
    with model.saes(saes=[transcoder], use_error_term=True):
        logits_with_transcoder = model(prompt)
        assert_close(original_logits, logits_with_transcoder, atol=1e-4)

    assert len(model._acts_to_saes) == 0


def test_transcoder_run_with_cache(
    model: HookedSAETransformer,
    transcoder: SAE,
    original_logits: torch.Tensor,
):
    # For transcoders, the wrapper is placed at output_hook with SAE as submodule
    output_hook = transcoder.cfg.metadata.hook_name_out

    logits_with_transcoder, cache = model.run_with_cache_with_saes(
        prompt, saes=[transcoder]
    )
    assert_not_close(original_logits, logits_with_transcoder)
    assert isinstance(cache, ActivationCache)
    # Hooks are copied directly to wrapper, so cache key doesn't include .sae. prefix
    assert output_hook + ".hook_sae_acts_post" in cache
    assert len(model._acts_to_saes) == 0


def test_mixed_sae_and_transcoder(
    model: HookedSAETransformer,
    transcoder: SAE,
    original_logits: torch.Tensor,
):
    # SAE-Lens's own StandardSAE beside ours, as upstream
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=model.cfg.d_model,
            d_sae=model.cfg.d_model * 2,
            dtype="float32",
            device="cpu",
            metadata=SAEMetadata(
                model_name=MODEL,
                hook_name="blocks.0.hook_resid_pre",
                hook_head_index=None,
                prepend_bos=True,
            ),
        )
    )
    transcoder_act_name = transcoder.cfg.metadata.hook_name
    sae_act_name = sae.cfg.metadata.hook_name

    model.add_sae(sae)
    model.add_sae(transcoder)
    assert len(model._acts_to_saes) == 2
    assert sae_act_name in model._acts_to_saes
    assert transcoder_act_name in model._acts_to_saes

    logits = model(prompt)
    assert_not_close(original_logits, logits)
    model.reset_saes()
    assert len(model._acts_to_saes) == 0


def test_run_with_saes_with_transcoder(
    model: HookedSAETransformer,
    transcoder: SAE,
    original_logits: torch.Tensor,
):
    logits = model.run_with_saes(prompt, saes=[transcoder])
    assert_not_close(original_logits, logits)
    assert len(model._acts_to_saes) == 0


def test_transcoder_gradients_flow(model: HookedSAETransformer, transcoder: SAE):
    model.add_sae(transcoder, use_error_term=False)
    output = model(prompt)
    loss = output.sum()
    loss.backward()

    assert transcoder.W_enc.grad is not None
    assert transcoder.W_dec.grad is not None
    assert transcoder.W_enc.grad.abs().sum() > 0
    assert transcoder.W_dec.grad.abs().sum() > 0

    transcoder.zero_grad()
    model.reset_saes()


def test_transcoder_with_error_term_gradients_flow(
    model: HookedSAETransformer, transcoder: SAE
):
    model.add_sae(transcoder, use_error_term=True)
    output = model(prompt)
    loss = output.sum()
    loss.backward()

    assert transcoder.W_enc.grad is not None
    assert transcoder.W_dec.grad is not None
    assert transcoder.W_enc.grad.abs().sum() > 0
    assert transcoder.W_dec.grad.abs().sum() > 0

    transcoder.zero_grad()
    model.reset_saes()


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_multiple_chained_transcoders_get_gradients(architecture: str):
    """Test that multiple transcoders in sequence all receive gradients correctly."""
    model = new_model()

    # Create transcoders for layers 0, 1, and 2
    transcoders = [get_hooked_sae(model, architecture, layer) for layer in range(3)]

    # Attach all transcoders
    for tc in transcoders:
        model.add_sae(tc)

    assert len(model._acts_to_saes) == 3

    # Forward and backward pass
    output = model(prompt)
    loss = output.sum()
    loss.backward()

    # Verify all transcoders got gradients
    for i, tc in enumerate(transcoders):
        assert tc.W_enc.grad is not None, f"Transcoder {i} W_enc has no gradient"
        assert tc.W_dec.grad is not None, f"Transcoder {i} W_dec has no gradient"
        assert tc.W_enc.grad.abs().sum() > 0, f"Transcoder {i} W_enc gradient is zero"
        assert tc.W_dec.grad.abs().sum() > 0, f"Transcoder {i} W_dec gradient is zero"
        tc.zero_grad()

    model.reset_saes()


def test_multiple_saes_get_gradients():
    """Test that multiple SAEs attached simultaneously all receive gradients correctly."""
    model = new_model()

    # Create SAEs for different hook points across layers (ours: one architecture per MLP)
    saes = [get_hooked_sae(model, arch, layer) for layer, arch in enumerate(ALL_ARCHITECTURES)]

    # Attach all SAEs
    for sae in saes:
        model.add_sae(sae)

    assert len(model._acts_to_saes) == 3

    # Forward and backward pass
    output = model(prompt)
    loss = output.sum()
    loss.backward()

    # Verify all SAEs got gradients
    for i, sae in enumerate(saes):
        assert sae.W_enc.grad is not None, f"SAE {i} W_enc has no gradient"
        assert sae.W_dec.grad is not None, f"SAE {i} W_dec has no gradient"
        assert sae.W_enc.grad.abs().sum() > 0, f"SAE {i} W_enc gradient is zero"
        assert sae.W_dec.grad.abs().sum() > 0, f"SAE {i} W_dec gradient is zero"
        sae.zero_grad()

    model.reset_saes()


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_error_term_unchanged_when_latents_ablated(architecture: str):
    model = new_model()
    sae = get_hooked_sae(model, architecture)
    act_name = out_name(sae)

    # Run without intervention to get baseline error term
    output_baseline, cache_baseline = model.run_with_cache_with_saes(
        prompt, saes=[sae], use_error_term=True
    )

    error_baseline = cache_baseline[act_name + ".hook_sae_error"]
    acts_baseline = cache_baseline[act_name + ".hook_sae_acts_post"]

    # Verify baseline has non-zero activations
    assert acts_baseline.abs().sum() > 0, "Baseline should have non-zero latents"

    # Define hook to ablate all latents to zero
    def ablate_latents(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        return tensor * 0

    # Run with ablation intervention using context manager for hooks + cache
    model.add_sae(sae, use_error_term=True)
    with model.hooks(fwd_hooks=[(act_name + ".hook_sae_acts_post", ablate_latents)]):
        output_ablated, cache_ablated = model.run_with_cache(prompt)
    model.reset_saes()

    error_ablated = cache_ablated[act_name + ".hook_sae_error"]
    acts_ablated = cache_ablated[act_name + ".hook_sae_acts_post"]

    # Verify latents are all zero after ablation
    assert acts_ablated.abs().sum() == 0, "Ablated latents should be all zero"

    # Verify error term is unchanged despite ablation
    assert_close(error_ablated, error_baseline, atol=1e-5)

    # Verify outputs changed (ablation had an effect on reconstruction)
    assert not torch.allclose(output_ablated, output_baseline, atol=1e-5)


# ============================================================================
# exclude_special_tokens Tests
# ============================================================================


def test_exclude_special_tokens_stored_on_wrapper(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)

    model.add_sae(hooked_sae, exclude_special_tokens=True)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.exclude_special_tokens is True
    model.reset_saes()

    model.add_sae(hooked_sae, exclude_special_tokens=[1, 2, 3])
    wrapper = get_deep_attr(model, act_name)
    assert wrapper.exclude_special_tokens == [1, 2, 3]
    model.reset_saes()

    model.add_sae(hooked_sae, exclude_special_tokens=False)
    wrapper = get_deep_attr(model, act_name)
    assert wrapper.exclude_special_tokens is False
    model.reset_saes()


def test_exclude_special_tokens_context_manager_stores_setting(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)
    with model.saes(saes=[hooked_sae], exclude_special_tokens=True):
        wrapper = get_deep_attr(model, act_name)
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.exclude_special_tokens is True
    assert len(model._acts_to_saes) == 0


def test_exclude_special_tokens_bypasses_bos_position(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)

    _, cache_no_sae = model.run_with_cache(prompt, prepend_bos=True)
    _, cache_with_exclusion = model.run_with_cache_with_saes(
        prompt,
        saes=[hooked_sae],
        use_error_term=False,
        exclude_special_tokens=True,
        prepend_bos=True,
    )

    # hook_sae_output at BOS (position 0) must equal the original activation
    # because BOS is excluded and the wrapper restores original_output there
    sae_out_at_bos = cache_with_exclusion[act_name + ".hook_sae_output"][:, 0, ...]
    original_at_bos = cache_no_sae[act_name][:, 0, ...]
    assert_close(sae_out_at_bos, original_at_bos, atol=1e-5)


def test_exclude_special_tokens_false_applies_sae_at_bos(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)

    _, cache_no_sae = model.run_with_cache(prompt, prepend_bos=True)
    _, cache_with_sae = model.run_with_cache_with_saes(
        prompt,
        saes=[hooked_sae],
        use_error_term=False,
        exclude_special_tokens=False,
        prepend_bos=True,
    )

    # With no exclusion, BOS position is also reconstructed by the SAE
    sae_out_at_bos = cache_with_sae[act_name + ".hook_sae_output"][:, 0, ...]
    original_at_bos = cache_no_sae[act_name][:, 0, ...]
    assert_not_close(sae_out_at_bos, original_at_bos)


def test_exclude_specific_token_ids_bypasses_those_positions(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)

    tokens = model.to_tokens(prompt, prepend_bos=True)
    target_token_id = int(tokens[0, 1].item())

    _, cache_no_sae = model.run_with_cache(prompt, prepend_bos=True)
    _, cache_with_exclusion = model.run_with_cache_with_saes(
        prompt,
        saes=[hooked_sae],
        use_error_term=False,
        exclude_special_tokens=[target_token_id],
        prepend_bos=True,
    )

    # Position 1 has the excluded token — must match original
    assert_close(
        cache_with_exclusion[act_name + ".hook_sae_output"][:, 1, ...],
        cache_no_sae[act_name][:, 1, ...],
        atol=1e-5,
    )


def test_exclude_special_tokens_run_with_saes(
    model: HookedSAETransformer, hooked_sae: SAE
):
    logits = model.run_with_saes(
        prompt, saes=[hooked_sae], use_error_term=True, exclude_special_tokens=True
    )
    assert logits is not None
    assert len(model._acts_to_saes) == 0


def test_exclude_special_tokens_run_with_cache_with_saes(
    model: HookedSAETransformer, hooked_sae: SAE
):
    logits, cache = model.run_with_cache_with_saes(
        prompt, saes=[hooked_sae], use_error_term=True, exclude_special_tokens=True
    )
    assert logits is not None
    act_name = out_name(hooked_sae)
    assert act_name + ".hook_sae_acts_post" in cache
    assert len(model._acts_to_saes) == 0


def test_exclude_special_tokens_run_with_hooks_with_saes(
    model: HookedSAETransformer, hooked_sae: SAE
):
    c = Counter()
    act_name = out_name(hooked_sae)
    logits = model.run_with_hooks_with_saes(
        prompt,
        saes=[hooked_sae],
        fwd_hooks=[(act_name + ".hook_sae_acts_post", c.inc)],
        exclude_special_tokens=True,
    )
    assert logits is not None
    assert c.count == 1
    assert len(model._acts_to_saes) == 0


def test_exclude_special_tokens_restored_after_context_exit(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = hooked_sae.cfg.metadata.hook_name

    model.add_sae(hooked_sae, exclude_special_tokens=True)
    assert model._acts_to_saes[act_name].exclude_special_tokens is True

    second_sae = SAE.from_dict(hooked_sae.cfg.to_dict())  # type: ignore
    with model.saes(saes=[second_sae], exclude_special_tokens=False):
        assert model._acts_to_saes[act_name].exclude_special_tokens is False

    # Original wrapper (exclude_special_tokens=True) should be restored
    assert model._acts_to_saes[act_name].exclude_special_tokens is True
    model.reset_saes()


def test_exclude_special_tokens_empty_list_applies_sae_everywhere(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)

    _, cache_empty_exclude = model.run_with_cache_with_saes(
        prompt,
        saes=[hooked_sae],
        use_error_term=False,
        exclude_special_tokens=[],
        prepend_bos=True,
    )
    _, cache_no_exclude = model.run_with_cache_with_saes(
        prompt,
        saes=[hooked_sae],
        use_error_term=False,
        exclude_special_tokens=False,
        prepend_bos=True,
    )

    # Both empty-list and False should produce identical SAE outputs
    assert_close(
        cache_empty_exclude[act_name + ".hook_sae_output"],
        cache_no_exclude[act_name + ".hook_sae_output"],
        atol=1e-6,
    )


def test_exclude_special_tokens_zeroes_sae_error_at_excluded_positions(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)

    _, cache = model.run_with_cache_with_saes(
        prompt,
        saes=[hooked_sae],
        use_error_term=True,
        exclude_special_tokens=True,
        prepend_bos=True,
    )

    error = cache[act_name + ".hook_sae_error"]
    # BOS (position 0) is excluded, so it has no SAE error
    assert torch.all(error[:, 0, ...] == 0)
    # Non-excluded positions still have a real error term
    assert error[:, 1:, ...].abs().sum() > 0


def test_exclude_special_tokens_mask_cleared_after_forward(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae, exclude_special_tokens=True)
    wrapper = model._acts_to_saes[act_name]

    model(prompt)

    assert wrapper._token_mask is None
    model.reset_saes()


def test_exclude_special_tokens_mask_cleared_when_forward_raises(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae, exclude_special_tokens=True)
    wrapper = model._acts_to_saes[act_name]

    def raise_error(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        raise RuntimeError("boom")

    # hook_embed fires before any SAE wrapper, so the wrapper never runs and
    # only the context manager can clean up the mask
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(prompt, fwd_hooks=[("hook_embed", raise_error)])

    assert wrapper._token_mask is None
    model.reset_saes()


def test_exclude_special_tokens_with_token_tensor_input(
    model: HookedSAETransformer, hooked_sae: SAE
):
    act_name = out_name(hooked_sae)
    tokens = model.to_tokens(prompt, prepend_bos=True)

    _, cache_no_sae = model.run_with_cache(tokens)
    _, cache_with_exclusion = model.run_with_cache_with_saes(
        tokens,
        saes=[hooked_sae],
        use_error_term=False,
        exclude_special_tokens=True,
    )

    # BOS position must match the original activation even when the input is
    # already a token tensor rather than a string
    assert_close(
        cache_with_exclusion[act_name + ".hook_sae_output"][:, 0, ...],
        cache_no_sae[act_name][:, 0, ...],
        atol=1e-5,
    )
