"""The disk format: round trips through mxd_lens and SAE-Lens, and safe loading of bad folders."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY
from safetensors.torch import load_file, save_file

import mxd_lens
from mxd_lens import TopKTranscoder, io, registry, saelens
from mxd_lens.architectures import register_with_saelens
from mxd_lens.architectures import mxd as mxd_file
from mxd_lens.architectures.transcoder import TopKTranscoderSAE, TopKTranscoderSAEConfig
from mxd_lens.saelens import MxDSAE, from_saelens, to_saelens
from tests.sae_lens.helpers import ARCHS, OUTPUT_SAE, make_module

SAE_HOOKS = {
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_output",
    "hook_sae_error",
}


def x_of(d: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 5, d, generator=torch.Generator().manual_seed(seed))


def module_acts(module, x: torch.Tensor) -> torch.Tensor:
    """The unit activations at the module's own activation hook for input x (through
    `reconstruct`, which an SAE on the MLP output needs outside a model)."""
    seen = []
    with module.hooks(fwd_hooks=[(module.acts_hook_name, lambda acts, hook: seen.append(acts))]):
        module.reconstruct(x)
    return seen[0]


@pytest.mark.parametrize("arch", [*ARCHS, OUTPUT_SAE])
def test_round_trip_through_mxd_lens_load(arch: str, tmp_path: Path) -> None:
    module = make_module(arch)
    folder = module.save(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back = mxd_lens.load(folder)
    assert type(back) is type(module) and back.cfg == module.cfg
    for name, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    x = x_of()
    assert torch.equal(back.reconstruct(x), module.reconstruct(x))


@pytest.mark.parametrize("arch", [*ARCHS, OUTPUT_SAE])
def test_round_trip_through_sae_load_from_disk(arch: str, tmp_path: Path) -> None:
    module = make_module(arch)
    folder = io.save(
        module,
        tmp_path / "m",
        metadata={"context_size": 128, "dataset_path": "janeaustenr", "neuronpedia_id": "x/y"},
    )
    sae = SAE.load_from_disk(folder)
    assert type(sae) is registry.get(arch).sae_classes[0] and sae.cfg.architecture() == arch
    assert SAE_HOOKS <= set(sae.hook_dict)
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out) == (module.cfg.hook_name, module.cfg.hook_name_out)
    assert (meta.context_size, meta.dataset_path, meta.neuronpedia_id) == (128, "janeaustenr", "x/y")
    assert meta.model_from_pretrained_kwargs == {} and "prepend_bos" in meta
    x = x_of()
    # forward and encode-then-decode (HookedSAETransformer's path) both equal the module.
    assert torch.equal(sae(x), module.reconstruct(x))
    assert torch.equal(sae.decode(sae.encode(x)), module.reconstruct(x))
    # The expert coefficients / latents leave under SAE-Lens's hook name.
    _, sae_cache = sae.run_with_cache(x)
    assert torch.equal(sae_cache["hook_sae_acts_post"], module_acts(module, x))
    assert (sae_cache["hook_sae_acts_post"] > 0).sum(-1).max() <= module.cfg.k
    # ...and back: SAE-Lens's own save_model writes a folder mxd_lens reads.
    sae.save_model(tmp_path / "again")
    again = mxd_lens.load(tmp_path / "again")
    assert torch.equal(again.reconstruct(x), module.reconstruct(x))
    assert again.sae_metadata["context_size"] == 128


def test_cfg_json_is_exactly_the_sae_lens_config_plus_our_version(tmp_path: Path) -> None:
    for arch in (*ARCHS, OUTPUT_SAE):
        module = make_module(arch)
        raw = json.loads((module.save(tmp_path / arch) / "cfg.json").read_text())
        fields = {f.name for f in dataclasses.fields(registry.get(arch).sae_classes[1])}
        assert set(raw) - {"architecture", "mxd_lens_format"} == fields, arch
        assert raw["mxd_lens_format"] == io.FORMAT_VERSION and raw["d_sae"] == module.n_units
        assert set(io.METADATA_KEYS) <= set(raw["metadata"])
        assert raw["metadata"]["sae_lens_version"].startswith("6.")  # else SAE-Lens applies its pre-6 rewrite


def test_conversions_keep_weights_and_outputs() -> None:
    for arch in (*ARCHS, OUTPUT_SAE):
        module = make_module(arch)
        sae = to_saelens(module, metadata={"context_size": 64})
        back = from_saelens(sae)
        x = x_of()
        assert torch.equal(sae(x), module.reconstruct(x)) and torch.equal(
            back.reconstruct(x), module.reconstruct(x)
        )
        assert back.cfg == module.cfg and back.sae_metadata["context_size"] == 64


def test_fresh_sae_lens_modules_use_the_mxd_lens_init() -> None:
    cfg = saelens.MxDSAEConfig(d_in=8, d_sae=5, d_out=6, k=2, d_hidden=7, act_fn="relu")
    sae = MxDSAE(cfg)
    assert torch.count_nonzero(sae.W_out) == 0  # the paper: D = 0, the layer starts at its bias
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(5))
    with pytest.raises(ValueError, match="k=9 is larger than n_experts=5"):
        saelens.MxDSAEConfig(d_in=8, d_sae=5, d_out=6, k=9, d_hidden=7)
    # expert rows of norm 1: folding the decoder norms changes no weight (issue 12: it raised)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    sae.fold_W_dec_norm()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=1e-6, atol=1e-7)


def test_sparsity_file_when_firing_rates_are_known(tmp_path: Path) -> None:
    module = make_module("mxd")
    rates = torch.linspace(0, 0.5, module.n_units)
    folder = io.save(module, tmp_path / "m", firing_rates=rates)
    stored = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
    assert torch.allclose(stored, torch.log10(rates + 1e-10))
    assert torch.allclose(io.firing_rates(folder), rates, atol=1e-6)
    with pytest.raises(ValueError, match=r"firing_rates has shape \(4,\); expected \(13,\)"):
        io.save(module, tmp_path / "bad", firing_rates=torch.zeros(4))
    save_file({"sparsity": torch.zeros(4)}, str(folder / "sparsity.safetensors"))
    with pytest.raises(ValueError, match="sparsity.safetensors.*shape"):
        mxd_lens.load(folder)


def test_load_casts_to_a_requested_dtype(tmp_path: Path) -> None:
    module = make_module("topk_skip_transcoder", dtype="bfloat16")
    folder = module.save(tmp_path / "m")
    assert mxd_lens.load(folder).dtype == torch.bfloat16
    cast = mxd_lens.load(folder, dtype="float32")
    assert cast.dtype == torch.float32 and cast.cfg.dtype == "float32"
    assert torch.equal(cast.W_skip, module.W_skip.float())
    # cfg.json records the parameters' dtype, also after a .to() that left cfg.dtype behind.
    moved = make_module("mxd").to(torch.float64)
    assert mxd_lens.load(moved.save(tmp_path / "f64")).dtype == torch.float64


def test_registration_survives_a_second_import_and_a_reload() -> None:
    saved = {a: SAE_CLASS_REGISTRY[a] for a in ARCHS}
    saelens_namespace = dict(vars(saelens))
    mxd_namespace = dict(vars(mxd_file))
    try:
        importlib.import_module("mxd_lens")
        reloaded = importlib.reload(saelens)
        # A reload of the interop module re-registers the built-in architectures: SAE-Lens
        # serves exactly the classes the (reloaded) module exposes.
        for arch in ARCHS:
            assert SAE_CLASS_REGISTRY[arch] == registry.get(arch).sae_classes
        assert SAE_CLASS_REGISTRY["mxd"][0] is reloaded.MxDSAE
        # Reloading an architecture's own file (e.g. autoreload in a notebook) makes new
        # classes; registering again replaces our earlier classes instead of refusing them.
        importlib.reload(mxd_file)
        reloaded.register()
        assert SAE_CLASS_REGISTRY["mxd"][0] is mxd_file.MxDSAE
        assert SAE_CLASS_REGISTRY["mxd"][0] is not saved["mxd"][0]
        reloaded.register()  # and once more by hand
    finally:
        # Put the first import's classes back, everywhere, for the rest of the session.
        for module, namespace in ((saelens, saelens_namespace), (mxd_file, mxd_namespace)):
            vars(module).clear()
            vars(module).update(namespace)
        SAE_CLASS_REGISTRY.update(saved)
    assert saelens.MxDSAE is saved["mxd"][0] and registry.get("mxd").sae_classes == saved["mxd"]


def test_a_foreign_class_under_our_name_is_refused() -> None:
    saved = SAE_CLASS_REGISTRY["mxd"]
    SAE_CLASS_REGISTRY["mxd"] = SAE_CLASS_REGISTRY["topk"]
    try:
        with pytest.raises(ValueError, match="'mxd' is already registered by sae_lens"):
            saelens.register()
    finally:
        SAE_CLASS_REGISTRY["mxd"] = saved


# --- bad folders ------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return make_module("mxd").save(tmp_path / "m")


def _edit_cfg(folder: Path, **changes) -> None:
    raw = json.loads((folder / "cfg.json").read_text())
    raw.update(changes)
    (folder / "cfg.json").write_text(json.dumps(raw))


def test_missing_folder_and_files(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no module folder at .*nowhere"):
        mxd_lens.load(tmp_path / "nowhere")
    (saved / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors is missing"):
        mxd_lens.load(saved)
    (saved / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        mxd_lens.load(saved)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": "moe_lens"}, "unknown architecture 'moe_lens'"),
        ({"d_in": 0}, "d_in=0 must be a positive integer"),
        ({"d_hidden": -3}, "d_hidden=-3 must be a positive integer"),
        ({"k": 14}, "k=14 is larger than n_experts=13"),
        ({"d_sae": "13"}, "n_experts='13' must be a positive integer"),
        ({"mxd_lens_format": 99}, "mxd_lens_format=99 is not supported"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' is not supported"),
        ({"apply_b_dec_to_input": True}, "apply_b_dec_to_input=True is not supported"),
        ({"n_layers": 3}, r"unknown keys \['n_layers'\]"),
        ({"metadata": [1]}, "metadata must be a JSON object"),
    ],
)
def test_invalid_cfg_is_refused_naming_the_file_and_key(saved: Path, changes: dict, message: str) -> None:
    _edit_cfg(saved, **changes)
    with pytest.raises(ValueError, match=message) as err:
        mxd_lens.load(saved)
    assert str(saved / "cfg.json") in str(err.value)


def test_truncated_files(saved: Path) -> None:
    cfg = saved / "cfg.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(ValueError, match="cfg.json: not valid JSON"):
        mxd_lens.load(saved)


@pytest.mark.parametrize("keep", [0, 6, 200, -10])
def test_truncated_safetensors(saved: Path, keep: int) -> None:
    weights = saved / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])  # keep < 0: the data section is cut short
    with pytest.raises(ValueError, match="sae_weights.safetensors: not a readable safetensors file"):
        mxd_lens.load(saved)


def test_wrong_shapes_names_and_dtypes(saved: Path) -> None:
    weights = saved / "sae_weights.safetensors"
    good = load_file(str(weights))

    def write(tensors: dict) -> None:
        save_file(tensors, str(weights))

    write({**good, "W_dec": torch.zeros(13, 15)})
    with pytest.raises(
        ValueError, match=r"tensor 'W_dec' has shape \(13, 15\) but cfg.json implies \(13, 16\)"
    ):
        mxd_lens.load(saved)
    with pytest.raises(ValueError, match=r"tensor 'W_dec' has shape \(13, 15\)"):
        SAE.load_from_disk(saved)  # SAE-Lens's loader goes through the same check
    write({k: v for k, v in good.items() if k != "W_out"} | {"W_extra": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"missing \['W_out'\], unexpected \['W_extra'\]"):
        mxd_lens.load(saved)
    write({**good, "b_dec": good["b_dec"].double()})
    with pytest.raises(ValueError, match="tensor 'b_dec' is torch.float64 but cfg.json says dtype=float32"):
        mxd_lens.load(saved)
    # A contradiction between cfg.json and correct weights: cfg claims more experts.
    write(good)
    _edit_cfg(saved, d_sae=14)
    with pytest.raises(
        ValueError, match=r"tensor 'W_enc' has shape \(16, 13\) but cfg.json implies \(16, 14\)"
    ):
        mxd_lens.load(saved)


class _CreatesFile:
    """Unpickling this creates `path`: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def write_pickle_bomb(folder: Path, marker: Path) -> None:
    """Weights that are a pickle, under the safetensors name and the .pt/.bin names next to it."""
    payload = pickle.dumps({"W_enc": _CreatesFile(marker)})
    for name in ("sae_weights.safetensors", "sae_weights.pt", "sae_weights.bin", "pytorch_model.bin"):
        (folder / name).write_bytes(payload)


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """The refusal tests below mean something only if unpickling really creates the file."""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_CreatesFile(marker)))
    assert marker.exists()


def test_pickled_weights_are_refused_and_never_unpickled(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    write_pickle_bomb(saved, marker)
    with pytest.raises(ValueError, match="sae_weights.safetensors: not a readable safetensors file"):
        mxd_lens.load(saved)
    with pytest.raises(Exception, match="header"):
        SAE.load_from_disk(saved)
    assert not marker.exists()


def test_another_architecture_can_join(tmp_path: Path) -> None:
    """A TopKTranscoder subclass under its own name (as an SAE on the MLP output would be),
    with its SAE-Lens view made the way every architecture makes it (the mixin pattern)."""

    class ReadsOutput(TopKTranscoder):
        architecture = "test_reads_output"

    @dataclasses.dataclass(kw_only=True)
    class ReadsOutputSAEConfig(TopKTranscoderSAEConfig):
        module_class = ReadsOutput

    class ReadsOutputSAE(TopKTranscoderSAE):
        """ReadsOutput as an SAE-Lens SAE."""

    entry = registry.Architecture(
        name=ReadsOutput.architecture, module=ReadsOutput, sae=ReadsOutputSAE, sae_config=ReadsOutputSAEConfig
    )
    stranger = type("Elsewhere", (TopKTranscoder,), {"architecture": "nowhere"})
    try:
        registry.register(entry)  # registers it with SAE-Lens too
        assert SAE_CLASS_REGISTRY[entry.name] == (ReadsOutputSAE, ReadsOutputSAEConfig)
        register_with_saelens([entry])  # twice is fine
        module = ReadsOutput(dataclasses.replace(make_module("topk_transcoder").cfg, input_site="mlp_out"))
        folder = module.save(tmp_path / "m")
        sae = SAE.load_from_disk(folder)
        assert type(sae).__name__ == "ReadsOutputSAE" and isinstance(sae, saelens.TopKTranscoderSAE)
        assert sae.cfg.architecture() == "test_reads_output" and sae.cfg.input_site == "mlp_out"
        x = x_of()
        assert torch.equal(sae(x), module.reconstruct(x))
        assert type(mxd_lens.load(folder)) is ReadsOutput
        # An architecture mxd_lens does not know can neither join SAE-Lens nor be saved.
        with pytest.raises(ValueError, match="'nowhere' is not in mxd_lens.registry"):
            register_with_saelens(
                [registry.Architecture(name="nowhere", module=stranger, sae=ReadsOutputSAE, sae_config=ReadsOutputSAEConfig)]
            )
        assert "nowhere" not in SAE_CLASS_REGISTRY
        with pytest.raises(ValueError, match="register it with mxd_lens.registry.register first"):
            stranger(module.cfg).save(tmp_path / "stranger")
    finally:
        registry.unregister(entry.name)
    # Unregistering takes it out of SAE-Lens's registry as well.
    assert entry.name not in SAE_CLASS_REGISTRY and registry.find(entry.name) is None
    with pytest.raises(ValueError, match="unknown architecture 'test_reads_output'"):
        mxd_lens.load(folder)
