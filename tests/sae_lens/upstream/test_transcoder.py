# Adapted from SAE-Lens (https://github.com/decoderesearch/SAELens), tests/saes/test_transcoder.py
# (the stored revision 4f93794a; every API it uses is sae-lens 6.54.12's).
# Copyright (c) 2023 Joseph Bloom. MIT License: see tests/sae_lens/upstream/LICENSE-SAELens.
#
# Changed: only the SAEs built. SAE-Lens's `Transcoder` tests run on each of our three
# architectures (`transcoder_arch` parametrises them; the config builders add our configs'
# k and, for an MxD, d_hidden), its `SkipTranscoder` tests on our TopK skip transcoder, and
# the config tests check our architecture names. The dicts given to `from_dict` carry our
# configs' k (and d_hidden). Left out: the JumpReLU classes (TestJumpReLUTranscoder,
# TestJumpReLUSkipTranscoder, TestJumpReLUTranscoderVariants and the jumprelu_skip case of
# TestSkipTranscoderVariants): mxd_lens has no JumpReLU architecture; the others are kept.
import copy
from typing import Any

import pytest
import torch

from mxd_lens.architectures.mxd import MxDSAE
from mxd_lens.architectures.transcoder import TopKSkipTranscoderSAE, TopKTranscoderSAE
from sae_lens.saes.sae import SAE
from tests.sae_lens.upstream.helpers import assert_close, build_sae_cfg_for_arch

# pyright: reportArgumentType=false

TRANSCODER_CLASSES: dict[str, type[SAE]] = {
    "mxd": MxDSAE,
    "topk_transcoder": TopKTranscoderSAE,
    "topk_skip_transcoder": TopKSkipTranscoderSAE,
}
"""Ours, standing where SAE-Lens's tests build a `Transcoder`."""
SkipTranscoder = TopKSkipTranscoderSAE
"""Ours, standing where SAE-Lens's tests build a `SkipTranscoder`."""


@pytest.fixture(params=sorted(TRANSCODER_CLASSES))
def transcoder_arch(request: pytest.FixtureRequest) -> str:
    return request.param


# Helper functions to build configs
def build_transcoder_cfg(architecture: str = "topk_transcoder", **kwargs: Any):  # type: ignore
    """Helper to create one of our transcoder configs with SAE-Lens's test defaults."""
    default_config = {
        "d_in": 64,
        "d_sae": 128,
        "d_out": 96,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "apply_b_dec_to_input": False,
        "metadata": {
            "hook_name_out": "blocks.0.hook_mlp_out",
        },
    }
    merged = {**default_config, **kwargs}
    merged["k"] = min(int(merged.get("k", 8)), int(merged["d_sae"]))
    cfg = build_sae_cfg_for_arch(architecture, **{k: v for k, v in merged.items() if k != "metadata"})
    cfg_dict = cfg.to_dict()
    cfg_dict["metadata"] = merged["metadata"]
    return type(cfg).from_dict(cfg_dict)


def build_skip_transcoder_cfg(**kwargs: Any):
    """Helper to create a TopK skip transcoder config with defaults."""
    return build_transcoder_cfg("topk_skip_transcoder", **kwargs)


def extra_fields(architecture: str) -> dict[str, Any]:
    """What our configs need besides SAE-Lens's transcoder fields."""
    return {"k": 8, **({"d_hidden": 32} if architecture == "mxd" else {})}


class TestTranscoderConfig:
    """Test TranscoderConfig functionality."""

    def test_transcoder_config_initialization(self, transcoder_arch: str):
        cfg = build_transcoder_cfg(transcoder_arch)
        assert cfg.d_in == 64
        assert cfg.d_sae == 128
        assert cfg.d_out == 96
        assert cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
        assert cfg.architecture() == transcoder_arch

    def test_transcoder_config_to_dict(self, transcoder_arch: str):
        cfg = build_transcoder_cfg(transcoder_arch)
        cfg_dict = cfg.to_dict()

        # Check transcoder-specific fields are included
        assert "d_out" in cfg_dict
        assert "hook_name_out" in cfg_dict["metadata"]

        # Check values
        assert cfg_dict["d_out"] == 96
        assert cfg_dict["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"

    def test_transcoder_config_from_dict(self, transcoder_arch: str):
        original_dict = {
            "d_in": 128,
            "d_sae": 256,
            "d_out": 192,
            "dtype": "float16",
            "device": "cuda",
            "metadata": {
                "hook_name_out": "test_out",
            },
            "architecture": transcoder_arch,
            "apply_b_dec_to_input": False,
            **extra_fields(transcoder_arch),
        }

        cfg = type(build_transcoder_cfg(transcoder_arch)).from_dict(original_dict)
        assert cfg.d_in == 128
        assert cfg.d_sae == 256
        assert cfg.d_out == 192
        assert cfg.metadata.hook_name_out == "test_out"


class TestTranscoder:
    """Test base Transcoder functionality."""

    def test_transcoder_initialization(self, transcoder_arch: str):
        cfg = build_transcoder_cfg(transcoder_arch)
        transcoder = TRANSCODER_CLASSES[transcoder_arch](cfg)

        # Check dimensions
        assert transcoder.W_enc.shape == (cfg.d_in, cfg.d_sae)
        assert transcoder.W_dec.shape == (cfg.d_sae, cfg.d_out)
        assert transcoder.b_enc.shape == (cfg.d_sae,)
        assert transcoder.b_dec.shape == (cfg.d_out,)

        # Check output hook info
        assert transcoder.d_out == cfg.d_out

    def test_transcoder_forward_pass(self, transcoder_arch: str):
        cfg = build_transcoder_cfg(transcoder_arch, d_in=32, d_sae=64, d_out=48)
        transcoder = TRANSCODER_CLASSES[transcoder_arch](cfg)

        batch_size = 10
        x = torch.randn(batch_size, cfg.d_in)

        output, features = transcoder.forward_with_activations(x)

        assert output.shape == (batch_size, cfg.d_out)
        assert features.shape == (batch_size, cfg.d_sae)

        # Check that features are sparse (ReLU should zero out some)
        assert (features == 0).any()

    def test_transcoder_encode_decode(self, transcoder_arch: str):
        cfg = build_transcoder_cfg(transcoder_arch)
        transcoder = TRANSCODER_CLASSES[transcoder_arch](cfg)

        batch_size = 5
        x = torch.randn(batch_size, cfg.d_in)

        # Test encode
        features = transcoder.encode(x)
        assert features.shape == (batch_size, cfg.d_sae)

        # Test decode
        output = transcoder.decode(features)
        assert output.shape == (batch_size, cfg.d_out)

    def test_transcoder_process_sae_in(self, transcoder_arch: str):
        """Test that process_sae_in doesn't apply b_dec (wrong dimension)."""
        cfg = build_transcoder_cfg(transcoder_arch)
        transcoder = TRANSCODER_CLASSES[transcoder_arch](cfg)

        # Set b_dec to non-zero values
        transcoder.b_dec.data = torch.ones_like(transcoder.b_dec) * 5.0

        x = torch.randn(10, cfg.d_in)
        processed = transcoder.process_sae_in(x)

        # Should be same as input (just dtype conversion and hooks)
        assert_close(processed, x.to(transcoder.dtype))

    def test_transcoder_from_dict(self, transcoder_arch: str):
        config_dict = {
            "d_in": 256,
            "d_sae": 512,
            "d_out": 384,
            "dtype": "float32",
            "device": "cpu",
            "hook_name_out": "test_out",
            "architecture": transcoder_arch,
            "apply_b_dec_to_input": False,
            **extra_fields(transcoder_arch),
        }

        Transcoder = TRANSCODER_CLASSES[transcoder_arch]
        transcoder = Transcoder.from_dict(config_dict)
        assert isinstance(transcoder, Transcoder)
        assert transcoder.cfg.d_in == 256
        assert transcoder.cfg.d_out == 384

    def test_transcoder_to_device(self, transcoder_arch: str):
        cfg = build_transcoder_cfg(transcoder_arch, device="cpu")
        transcoder = TRANSCODER_CLASSES[transcoder_arch](cfg)

        # Move to meta device
        transcoder_moved = transcoder.to("meta")
        assert transcoder_moved.device == torch.device("meta")
        assert transcoder_moved.W_enc.device == torch.device("meta")
        assert transcoder_moved.W_dec.device == torch.device("meta")
        assert transcoder_moved.b_enc.device == torch.device("meta")
        assert transcoder_moved.b_dec.device == torch.device("meta")

    def test_transcoder_fold_w_dec_norm(self, transcoder_arch: str):
        cfg = build_transcoder_cfg(transcoder_arch)
        transcoder = TRANSCODER_CLASSES[transcoder_arch](cfg)

        # Set weights to non-unit norm
        # make sure all parameters are not 0s

        for param in transcoder.parameters():
            param.data = torch.rand_like(param)
        original_dec_norms = transcoder.W_dec.norm(dim=1).clone()

        transcoder2 = copy.deepcopy(transcoder)
        transcoder2.fold_W_dec_norm()

        # Check W_dec is normalized
        assert transcoder2.W_dec.norm(dim=1).mean().item() == pytest.approx(
            1.0, abs=1e-6
        )

        # Check that encode/decode produces same output
        x = torch.randn(10, cfg.d_in)
        out1, feat1 = transcoder.forward_with_activations(x)
        out2, feat2 = transcoder2.forward_with_activations(x)

        # Features should differ by decoder norm
        expected_feat2 = feat1 * original_dec_norms
        assert_close(feat2, expected_feat2, atol=1e-5)

        # But outputs should be the same
        assert_close(out1, out2, atol=5e-5)


class TestSkipTranscoder:
    """Test SkipTranscoder functionality."""

    def test_skip_transcoder_initialization(self):
        cfg = build_skip_transcoder_cfg()
        transcoder = SkipTranscoder(cfg)

        # Check W_skip parameter exists and has correct shape
        assert hasattr(transcoder, "W_skip")
        assert transcoder.W_skip.shape == (cfg.d_out, cfg.d_in)
        # W_skip should be initialized to zeros
        assert torch.all(transcoder.W_skip == 0)

    def test_skip_transcoder_forward_with_zero_skip(self):
        """With W_skip=0, output should match base Transcoder."""
        cfg = build_skip_transcoder_cfg(d_in=32, d_sae=64, d_out=48)
        skip_transcoder = SkipTranscoder(cfg)

        # Create base transcoder with same weights
        base_cfg = build_transcoder_cfg(d_in=32, d_sae=64, d_out=48)
        base_transcoder = TopKTranscoderSAE(base_cfg)
        base_transcoder.W_enc.data = skip_transcoder.W_enc.data.clone()
        base_transcoder.W_dec.data = skip_transcoder.W_dec.data.clone()
        base_transcoder.b_enc.data = skip_transcoder.b_enc.data.clone()
        base_transcoder.b_dec.data = skip_transcoder.b_dec.data.clone()

        x = torch.randn(10, cfg.d_in)
        skip_out, skip_feat = skip_transcoder.forward_with_activations(x)
        base_out, base_feat = base_transcoder.forward_with_activations(x)

        # With W_skip=0, outputs should be identical
        assert_close(skip_out, base_out)
        assert_close(skip_feat, base_feat)

    def test_skip_transcoder_forward_with_nonzero_skip(self):
        """Test that skip connection is properly applied."""
        cfg = build_skip_transcoder_cfg(d_in=32, d_sae=64, d_out=48)
        transcoder = SkipTranscoder(cfg)

        # Set W_skip to non-zero
        transcoder.W_skip.data = torch.randn_like(transcoder.W_skip)

        x = torch.randn(10, cfg.d_in)
        output, features = transcoder.forward_with_activations(x)

        # Compute expected skip contribution
        skip_contribution = x @ transcoder.W_skip.T

        # Get output without skip (by temporarily zeroing W_skip)
        w_skip_backup = transcoder.W_skip.data.clone()
        transcoder.W_skip.data.zero_()
        output_no_skip, _ = transcoder.forward_with_activations(x)
        transcoder.W_skip.data = w_skip_backup

        # Output should be no-skip output + skip contribution
        assert_close(output, output_no_skip + skip_contribution)

    def test_skip_transcoder_architecture(self):
        cfg = build_skip_transcoder_cfg()
        assert cfg.architecture() == "topk_skip_transcoder"

    def test_skip_transcoder_from_dict(self):
        config_dict = {
            "d_in": 256,
            "d_sae": 512,
            "d_out": 384,
            "dtype": "float32",
            "device": "cpu",
            "architecture": "topk_skip_transcoder",
            "apply_b_dec_to_input": False,
            **extra_fields("topk_skip_transcoder"),
        }

        transcoder = SkipTranscoder.from_dict(config_dict)
        assert isinstance(transcoder, SkipTranscoder)
        assert hasattr(transcoder, "W_skip")
        assert transcoder.cfg.d_in == 256
        assert transcoder.cfg.d_out == 384


class TestSkipTranscoderVariants:
    """Parametrized tests for SkipTranscoder (SAE-Lens: and JumpReLUSkipTranscoder)."""

    @pytest.fixture(params=["skip"])
    def skip_transcoder(self, request):
        """Create a SkipTranscoder (SAE-Lens's jumprelu_skip case has no counterpart here)."""
        cfg = build_skip_transcoder_cfg(d_in=32, d_sae=64, d_out=48)
        return SkipTranscoder(cfg)

    def test_has_w_skip_parameter(self, skip_transcoder):
        """Both variants should have W_skip parameter."""
        assert hasattr(skip_transcoder, "W_skip")
        assert skip_transcoder.W_skip.shape == (48, 32)

    def test_w_skip_initialized_to_zeros(self, skip_transcoder):
        """Both variants should initialize W_skip to zeros."""
        assert torch.all(skip_transcoder.W_skip == 0)

    def test_skip_connection_applied(self, skip_transcoder):
        """Both variants should apply skip connection in forward pass."""
        # Set non-zero W_skip
        skip_transcoder.W_skip.data = torch.randn_like(skip_transcoder.W_skip)

        x = torch.randn(10, 32)
        skip_contribution = x @ skip_transcoder.W_skip.T

        output, _ = skip_transcoder.forward_with_activations(x)

        # Get output without skip
        skip_transcoder.W_skip.data.zero_()
        output_no_skip, _ = skip_transcoder.forward_with_activations(x)

        # Re-add skip for comparison
        assert_close(output, output_no_skip + skip_contribution, atol=1e-5)

    def test_forward_output_shape(self, skip_transcoder):
        """Both variants should produce correct output shapes."""
        x = torch.randn(10, 32)
        output, features = skip_transcoder.forward_with_activations(x)

        assert output.shape == (10, 48)
        assert features.shape == (10, 64)


class TestTranscoderIntegration:
    """Integration tests for transcoders."""

    @pytest.mark.parametrize(
        "d_in,d_sae,d_out",
        [
            (32, 64, 48),  # d_in < d_sae, d_out between
            (64, 32, 96),  # d_in > d_sae, d_out > d_in
            (48, 96, 48),  # d_in == d_out
            (128, 256, 64),  # all different, d_out < d_in
        ],
        ids=[
            "d_in_lt_d_sae_d_out_between",
            "d_in_gt_d_sae_d_out_gt_d_in",
            "d_in_eq_d_out",
            "all_different_d_out_lt_d_in",
        ],
    )
    def test_transcoder_different_dimensions(self, transcoder_arch: str, d_in: int, d_sae: int, d_out: int):
        """Test transcoder with various input/output dimension combinations."""
        cfg = build_transcoder_cfg(transcoder_arch, d_in=d_in, d_sae=d_sae, d_out=d_out)
        transcoder = TRANSCODER_CLASSES[transcoder_arch](cfg)

        x = torch.randn(10, d_in)
        output, features = transcoder.forward_with_activations(x)

        assert output.shape == (10, d_out)
        assert features.shape == (10, d_sae)

    def test_transcoder_state_dict_save_load(self, transcoder_arch: str):
        """Test saving and loading transcoder state."""
        cfg = build_transcoder_cfg(transcoder_arch)
        Transcoder = TRANSCODER_CLASSES[transcoder_arch]
        transcoder1 = Transcoder(cfg)

        # Modify weights
        transcoder1.W_enc.data = torch.randn_like(transcoder1.W_enc)
        transcoder1.W_dec.data = torch.randn_like(transcoder1.W_dec)

        # Save state
        state_dict = transcoder1.state_dict()

        # Create new transcoder and load state
        transcoder2 = Transcoder(cfg)
        transcoder2.load_state_dict(state_dict)

        # Check weights match
        assert_close(transcoder1.W_enc, transcoder2.W_enc)
        assert_close(transcoder1.W_dec, transcoder2.W_dec)
        assert_close(transcoder1.b_enc, transcoder2.b_enc)
        assert_close(transcoder1.b_dec, transcoder2.b_dec)

        # Check same output
        x = torch.randn(5, cfg.d_in)
        out1, feat1 = transcoder1.forward_with_activations(x)
        out2, feat2 = transcoder2.forward_with_activations(x)
        assert_close(out1, out2)
        assert_close(feat1, feat2)
