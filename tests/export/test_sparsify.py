"""Export to EleutherAI sparsify's transcoder folders and read them back, checked against
sparsify's own `SparseCoder.load_from_disk` and forward (eai-sparsify 1.3.3) on the
default model's real MLP inputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import sparsify  # eai-sparsify, a dev dependency
import torch

import mxd_lens
from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig
from mxd_lens.cli import main
from mxd_lens.export import export_sparsify, load_sparsify
from mxd_lens.export.norms import MlpInputNorm


D = 576


def transcoder(cls, layer: int, seed: int, d_sae: int = 96, k: int = 8):
    """A random transcoder whose units fire and whose output is not small."""
    torch.manual_seed(seed)
    module = cls(TranscoderConfig(d_in=D, d_out=D, d_sae=d_sae, k=k, layer=layer))
    with torch.no_grad():
        module.b_enc.normal_(std=0.3)
        module.W_dec.normal_()
        module.b_dec.normal_(std=0.1)
        if isinstance(module, SkipTranscoder):
            module.W_skip.normal_(std=0.05)
    return module


def sparsify_out(coder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return coder(x).sae_out


@pytest.mark.parametrize("cls", [TopKTranscoder, SkipTranscoder])
def test_export_loads_in_sparsify_and_matches(tmp_path, mlp_inputs, default_norms, cls):
    modules = [transcoder(cls, 3, 1), transcoder(cls, 11, 2)]
    export_sparsify(modules, tmp_path / "sp", norms=default_norms)
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["layers.11.mlp", "layers.3.mlp"]
    for module in modules:
        layer = module.cfg.layer
        coder = sparsify.SparseCoder.load_from_disk(tmp_path / "sp" / f"layers.{layer}.mlp")
        assert coder.cfg.transcode and (coder.W_skip is not None) == isinstance(module, SkipTranscoder)
        x_ours, x_hf = mlp_inputs[layer]
        with torch.no_grad():
            ours = module(x_ours)
            out = coder(x_hf)
            ours_idx = module.encode(x_ours, hooked=False).sparse.indices
        assert ours.abs().max() > 1.0
        torch.testing.assert_close(out.sae_out, ours, atol=2e-4, rtol=1e-4)
        assert torch.equal(out.latent_indices.sort(-1).values, ours_idx.sort(-1).values)


def test_folder_sparsify_saved_loads_as_the_same_module(tmp_path, mlp_inputs, default_norms):
    """A coder sparsify itself saved reads back (through mxd_lens.load) as a SkipTranscoder
    with sparsify's outputs, and exporting that module gives sparsify's tensors back."""
    torch.manual_seed(3)
    coder = sparsify.SparseCoder(D, sparsify.TranscoderConfig(num_latents=64, k=6, skip_connection=True))
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(std=0.05)
        coder.encoder.bias.add_(0.2)
    coder.save_to_disk(tmp_path / "layers.5.mlp")
    module = mxd_lens.load(tmp_path / "layers.5.mlp")
    assert isinstance(module, SkipTranscoder)
    assert (module.cfg.layer, module.cfg.d_sae, module.cfg.k) == (5, 64, 6)
    x_ours, x_hf = mlp_inputs[5]
    with torch.no_grad():
        torch.testing.assert_close(module(x_ours), sparsify_out(coder, x_hf), atol=2e-4, rtol=1e-4)
    export_sparsify([module], tmp_path / "again", norms=default_norms)
    back = sparsify.SparseCoder.load_from_disk(tmp_path / "again" / "layers.5.mlp")
    for name, value in coder.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, atol=1e-6, rtol=1e-5)


def test_mxd_and_small_norm_weights_are_refused(tmp_path, default_norms):
    mxd = MxD(MxDConfig(d_in=D, d_out=D, k=4, d_hidden=64, n_experts=16, layer=2))
    with pytest.raises(ValueError, match="MxD cannot be represented in sparsify: each unit writes"):
        export_sparsify([mxd], tmp_path / "x", norms=default_norms)
    weight = default_norms.norms[2].weight.clone()
    weight[7] = 0.0
    norms = dataclasses.replace(default_norms, norms={**default_norms.norms, 2: MlpInputNorm(weight, None)})
    with pytest.raises(ValueError, match=r"layer 2: .*1 weight entry .*\[7\]=0"):
        export_sparsify([transcoder(TopKTranscoder, 2, 0)], tmp_path / "x", norms=norms)
    assert not (tmp_path / "x").exists()


def test_layernorm_bias_round_trip():
    """With a LayerNorm bias the map is affine: export then import gives the module back,
    and the exported encoder on x_hf = x * w + b equals ours on x."""
    from mxd_lens.export.norms import from_hf_input, to_hf_input

    torch.manual_seed(0)
    norm = MlpInputNorm(torch.rand(16) + 0.5, torch.randn(16))
    W_enc, b_enc, b_dec, W_skip = torch.randn(16, 8), torch.randn(8), torch.randn(16), torch.randn(16, 16)
    hf = to_hf_input(norm, W_enc, b_enc, b_dec, W_skip)
    x = torch.randn(5, 16)
    x_hf = x * norm.weight + norm.bias
    torch.testing.assert_close(x_hf @ hf[0] + hf[1], x @ W_enc + b_enc)
    torch.testing.assert_close(x_hf @ hf[3].T + hf[2], x @ W_skip.T + b_dec)
    for got, want in zip(from_hf_input(norm, *hf), (W_enc, b_enc, b_dec, W_skip)):
        torch.testing.assert_close(got, want)


def test_cli_export_sparsify(tmp_path, mlp_inputs, capsys):
    module = transcoder(SkipTranscoder, 8, 4)
    module.save(tmp_path / "run" / "layer_8" / "skip_transcoder_k8")
    assert main(["export", "--format", "sparsify", str(tmp_path / "run"), "--out", str(tmp_path / "sp")]) == 0
    cfg = json.loads((tmp_path / "sp" / "layers.8.mlp" / "cfg.json").read_text())
    assert cfg["transcode"] and cfg["skip_connection"] and cfg["k"] == 8 and cfg["mxd_lens"]["layer"] == 8
    back = load_sparsify(tmp_path / "sp" / "layers.8.mlp")
    x_ours, _ = mlp_inputs[8]
    with torch.no_grad():
        torch.testing.assert_close(back(x_ours), module(x_ours), atol=1e-4, rtol=1e-4)
    # --out now holds the export: refused without --overwrite, and nothing is touched
    assert main(["export", "--format", "sparsify", str(tmp_path / "run"), "--out", str(tmp_path / "sp")]) == 1
    assert "--overwrite" in capsys.readouterr().err
