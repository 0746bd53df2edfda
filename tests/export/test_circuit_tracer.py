"""Export a skip transcoder at every layer of the default model to circuit-tracer's layout,
load it with circuit-tracer 0.5.0's own loader (in .venv-circuit-tracer, made by
scripts/circuit_tracer_env.sh, since circuit-tracer pins transformers<=4.57.3) and hold
its forward, on the default model's real Hugging Face MLP inputs, to ours."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig
from mxd_lens.cli import main
from mxd_lens.export import export_circuit_tracer

from .conftest import TOKENS

ROOT = Path(__file__).resolve().parents[2]
CT_PYTHON = ROOT / ".venv-circuit-tracer" / "bin" / "python"
PROBE = Path(__file__).with_name("circuit_tracer_probe.py")
D, D_SAE, K = 576, 32, 4


def transcoder_set(n_layers: int, cls=SkipTranscoder) -> list:
    """A small random transcoder at every layer; a positive encoder bias keeps at least k
    pre-activations positive on every token (where circuit-tracer's TopK, which has no
    ReLU, and ours agree)."""
    torch.manual_seed(0)
    modules = []
    for layer in range(n_layers):
        module = cls(TranscoderConfig(d_in=D, d_out=D, d_sae=D_SAE, k=K, layer=layer))
        with torch.no_grad():
            module.b_enc.uniform_(0.5, 1.0)
            module.W_dec.normal_()
            module.b_dec.normal_(std=0.1)
            if isinstance(module, SkipTranscoder):
                module.W_skip.normal_(std=0.05)
        modules.append(module)
    return modules


def transformers4_folder(tmp_path: Path) -> Path:
    """The default model's folder as transformers 4.57 (circuit-tracer's pin) reads it: the
    folder was written by transformers 5, whose config.json keeps rope_theta under
    rope_parameters (4.57 would fall back to 10,000 instead of 100,000) and whose
    tokenizer_config.json names a class 4.57 lacks. The weights are linked, not copied."""
    from mxd_lens.sources.model import default_model_folder

    src, dst = default_model_folder(), tmp_path / "model-transformers4"
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.update(rope_theta=config["rope_parameters"]["rope_theta"], rope_scaling=None)
    (dst / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return dst


def test_circuit_tracer_loads_the_export_and_matches(tmp_path, mlp_inputs, default_norms):
    if not CT_PYTHON.is_file():
        reason = f"{CT_PYTHON} is absent: run scripts/circuit_tracer_env.sh (scripts/setup.sh does)"
        print(reason)
        pytest.skip(reason)
    modules = transcoder_set(default_norms.n_layers)
    ref = "local/smollm2-skip"  # circuit-tracer's cache layout: CACHE_DIR/<ref>/{config.yaml, layer_*.safetensors}
    export_circuit_tracer(modules, tmp_path / "cache" / ref, norms=default_norms)
    files = sorted(p.name for p in (tmp_path / "cache" / ref).iterdir())
    assert files == sorted(["config.yaml"] + [f"layer_{i}.safetensors" for i in range(30)])
    inputs = {f"x_{layer}": x_hf.contiguous() for layer, (_, x_hf) in mlp_inputs.items()}
    save_file({**inputs, "tokens": TOKENS}, str(tmp_path / "in.st"))
    run = subprocess.run(
        [str(CT_PYTHON), str(PROBE), str(tmp_path / "cache"), ref, str(tmp_path / "in.st"), str(tmp_path / "out.st"),
         str(transformers4_folder(tmp_path))],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary == {
        "n_layers": 30, "d_transcoder": D_SAE, "skip_connection": True, "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out", "released_activation": "function", "activation": "topk", "k": K,
    }  # the released loader builds F.relu (a function); main's TopK(k) is set from config.yaml
    theirs = load_file(str(tmp_path / "out.st"))
    for layer, module in enumerate(modules):
        x_ours, _ = mlp_inputs[layer]
        with torch.no_grad():
            ours = module(x_ours)
            acts = module.encode(x_ours, hooked=False).dense(D_SAE)
        assert ours.abs().max() > 1.0
        torch.testing.assert_close(theirs[f"out_{layer}"], ours, atol=5e-4, rtol=1e-4)
        torch.testing.assert_close(theirs[f"acts_{layer}"], acts, atol=5e-4, rtol=1e-4)
        # circuit-tracer's whole model, its own hook (mlp.hook_in = post_attention_layernorm's
        # output); it zeroes position 0 (the BOS position) by design.
        assert not theirs["model_acts"][layer, 0].any()
        torch.testing.assert_close(theirs["model_acts"][layer, 1:], acts[1:], atol=5e-4, rtol=1e-4)


def test_missing_layers_mixed_sets_and_mxd_are_refused(tmp_path, default_norms):
    modules = transcoder_set(default_norms.n_layers, TopKTranscoder)
    with pytest.raises(ValueError, match=r"every layer of SmolLM2-135M-Instruct \(0\.\.29\); missing layers \[7, 20\]"):
        export_circuit_tracer([m for m in modules if m.cfg.layer not in (7, 20)], tmp_path / "x", norms=default_norms)
    mixed = modules[:29] + transcoder_set(30)[29:]
    with pytest.raises(ValueError, match="has kind SkipTranscoder but .* has TopKTranscoder"):
        export_circuit_tracer(mixed, tmp_path / "x", norms=default_norms)
    mxd = MxD(MxDConfig(d_in=D, d_out=D, k=4, d_hidden=64, n_experts=D_SAE, layer=3))
    with pytest.raises(ValueError, match="MxD cannot be represented in circuit-tracer"):
        export_circuit_tracer(modules[:3] + [mxd] + modules[4:], tmp_path / "x", norms=default_norms)
    assert not (tmp_path / "x").exists()


def test_cli_names_missing_layers(tmp_path, capsys):
    for module in transcoder_set(3, TopKTranscoder):
        module.save(tmp_path / "run" / f"layer_{module.cfg.layer}" / "transcoder_k4")
    code = main(["export", "--format", "circuit-tracer", str(tmp_path / "run"), "--out", str(tmp_path / "ct")])
    assert code == 1
    assert "missing layers [3, 4, 5" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
