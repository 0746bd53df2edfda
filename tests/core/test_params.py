"""Parameter counts and the paper's parameter matching, checked against real modules."""

from __future__ import annotations

import pytest

from mxd_lens import (
    MxD,
    MxDConfig,
    SkipTranscoder,
    TopKTranscoder,
    TranscoderConfig,
    match_n_experts,
    mxd_n_params,
    transcoder_n_params,
)


def meta_mxd(d_in, d_out, d_hidden, n_experts, glu) -> MxD:
    # The meta device gives real modules with real shapes and no memory.
    return MxD(
        MxDConfig(d_in=d_in, d_out=d_out, d_hidden=d_hidden, n_experts=n_experts, k=1, glu=glu, device="meta")
    )


@pytest.mark.parametrize(
    "d_in,d_out,d_hidden,n_experts", [(7, 5, 11, 13), (16, 16, 64, 1), (576, 576, 1536, 6912)]
)
@pytest.mark.parametrize("glu", [False, True])
def test_mxd_count_equals_module_parameters(d_in, d_out, d_hidden, n_experts, glu) -> None:
    mxd = meta_mxd(d_in, d_out, d_hidden, n_experts, glu)
    by_hand = sum(p.numel() for p in mxd.parameters())
    assert mxd_n_params(d_in, d_out, d_hidden, n_experts, glu) == by_hand == mxd.n_params()


@pytest.mark.parametrize("d_in,d_out,d_sae", [(7, 5, 19), (576, 576, 9216), (768, 768, 32 * 768)])
@pytest.mark.parametrize("cls", [TopKTranscoder, SkipTranscoder])
def test_transcoder_count_equals_module_parameters(d_in, d_out, d_sae, cls) -> None:
    tc = cls(TranscoderConfig(d_in=d_in, d_out=d_out, d_sae=d_sae, k=1, device="meta"))
    by_hand = sum(p.numel() for p in tc.parameters())
    assert transcoder_n_params(d_in, d_out, d_sae, skip=cls is SkipTranscoder) == by_hand == tc.n_params()


def test_gpt2_sizes_give_the_papers_21_5k_experts() -> None:
    assert match_n_experts(768, 768, 3072, 32 * 768) == 21_504


@pytest.mark.parametrize(
    "d_in,d_out,d_hidden,width,glu",
    [
        (768, 768, 3072, 32 * 768, False),
        (576, 576, 1536, 16 * 576, True),
        (7, 5, 11, 40, False),
        (7, 5, 11, 40, True),
    ],
)
def test_match_is_the_largest_count_that_fits(d_in, d_out, d_hidden, width, glu) -> None:
    n = match_n_experts(d_in, d_out, d_hidden, width, glu)
    budget = transcoder_n_params(d_in, d_out, width)
    assert meta_mxd(d_in, d_out, d_hidden, n, glu).n_params() <= budget
    assert meta_mxd(d_in, d_out, d_hidden, n + 1, glu).n_params() > budget


def test_default_model_sizes() -> None:
    # SmolLM2-135M: d_model 576, gated d_mlp 1536, transcoder width 16 * 576.
    assert match_n_experts(576, 576, 1536, 9216, glu=True) == 6912


def test_error_when_not_even_one_expert_fits() -> None:
    # Width 1 transcoder: 7 + 1 + 5 + 5 = 18 parameters; one gated expert needs far more.
    with pytest.raises(ValueError, match=r"width 1 has 18 parameters.*d_hidden=11 \(gated\)"):
        match_n_experts(7, 5, 11, 1, glu=True)
    with pytest.raises(ValueError, match="transcoder_width=0"):
        match_n_experts(7, 5, 11, 0)
    with pytest.raises(ValueError, match="d_hidden=-3"):
        match_n_experts(7, 5, -3, 40)
    with pytest.raises(ValueError, match="d_in=True"):
        match_n_experts(True, 5, 11, 40)
