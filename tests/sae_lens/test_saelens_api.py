"""Our SAE-Lens views' share of SAE-Lens's SAE / Transcoder API, beyond what the copied
SAE-Lens tests (tests/sae_lens/upstream/) check: the TopK activation module, folding of
decoder norms and input scales against slow references, saving a folded view, and the
refusals of options our modules do not implement."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
from sae_lens.saes.topk_sae import TopK

from mxd_lens import load
from mxd_lens.architectures.base import FOLDED_SCALE_KEY, FoldedTopK
from mxd_lens.saelens import from_saelens, to_saelens
from tests.sae_lens.helpers import ARCHS, OUTPUT_SAE, make_module


def views(arch: str, seed: int = 0) -> tuple:
    """(module, its SAE-Lens view) with every weight random, decoder rows of random norms."""
    module = make_module(arch, seed=seed)
    return module, to_saelens(module)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS + (OUTPUT_SAE,))
def test_activation_fn_is_saelens_topk_and_matches_encode(arch: str, x: torch.Tensor):
    _, sae = views(arch)
    assert type(sae.activation_fn) is TopK and sae.activation_fn.k == sae.cfg.k
    pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.activation_fn(pre), sae.encode(x), rtol=0, atol=0)
    assert sae.d_out == sae.cfg.d_out == 16


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_W_dec_norm_preserves_the_module(arch: str, x: torch.Tensor):
    module, sae = views(arch)
    norms = sae.W_dec.detach().norm(dim=-1)
    assert (norms - 1).abs().max() > 0.1  # random rows: folding is not a no-op
    acts = sae.encode(x)
    sae.fold_W_dec_norm()
    # the folded view: unit rows, activations scaled by the norms, the module's output
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones_like(norms))
    out, folded = sae.forward_with_activations(x)
    torch.testing.assert_close(folded, acts * norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, module.reconstruct(x), rtol=1e-4, atol=1e-4)
    # activation_fn still is SAE-Lens's TopK, and still says what encode does
    assert isinstance(sae.activation_fn, TopK) and isinstance(sae.activation_fn, FoldedTopK)
    pre = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.activation_fn(pre), folded, rtol=0, atol=0)
    # folding twice folds nothing more
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_own_fold_would_change_the_output(arch: str, x: torch.Tensor):
    """The negative control: SAE-Lens's base fold (scale the encoder, TopK on the scaled
    pre-activations) keeps other units, so the output changes. Ours must not."""
    module, sae = views(arch)
    naive = copy.deepcopy(sae)
    SAE.fold_W_dec_norm(naive)  # SAE-Lens's own, bypassing ours
    assert not torch.allclose(naive(x), module.reconstruct(x), atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_view_saves_unfolded_and_converts_back(arch: str, x: torch.Tensor, tmp_path):
    module, sae = views(arch)
    sae.fold_W_dec_norm()
    assert FOLDED_SCALE_KEY in sae.state_dict()
    sae.save_model(tmp_path / "sae")
    for loaded in (load(tmp_path / "sae"), from_saelens(sae)):
        assert type(loaded) is type(module)
        for name, p in module.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    reloaded = SAE.load_from_disk(tmp_path / "sae", fold_W_dec_norm=True)
    torch.testing.assert_close(reloaded(x), module.reconstruct(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="activation_fn.scale"):  # never silently unfolded
        to_saelens(module).load_state_dict(sae.state_dict())


def test_mxd_fold_activation_norm_scaling_factor_with_glu(x: torch.Tensor):
    """The copied SAE-Lens test builds MxDs without the gated branch; with it, both E and
    E_glu must absorb the scale: view(x / f) * f == module(x)."""
    module, sae = views("mxd")
    assert module.cfg.glu
    sae.fold_activation_norm_scaling_factor(3.0)
    torch.testing.assert_close(sae(x / 3.0) * 3.0, module.reconstruct(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.W_hidden_lin, module.W_hidden_lin * 3.0)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("normalize_activations", "layer_norm", "never normalises its input"),
        ("reshape_activations", "hook_z", "never hook_z"),
        ("apply_b_dec_to_input", True, "output bias"),
    ],
)
def test_unsupported_saelens_options_are_refused(field: str, value, match: str):
    _, sae = views("topk_skip_transcoder")
    cfg = sae.cfg.to_dict()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        SAE.from_dict(cfg)


def test_hook_z_reshaping_whitening_and_name():
    _, sae = views("mxd")
    with pytest.raises(ValueError, match="never applies"):
        sae.turn_on_forward_pass_hook_z_reshaping()
    eye = torch.eye(16)
    with pytest.raises(NotImplementedError, match="whitening"):
        sae.fold_activation_whitening(torch.zeros(16), eye, eye)
    assert sae.get_name() == f"sae_{sae.cfg.metadata.model_name}_blocks.1.ln2.hook_normalized_{sae.cfg.d_sae}"



def _peak_copies(load) -> float:
    """Peak of the tensor memory torch's CPU allocator holds while `load()` runs (its
    profiler's allocation and free events, summed in time order), in copies of the loaded
    parameters. Unlike the resident size, this does not depend on whether the kernel keeps
    the weight file's pages mapped, which varies with memory pressure."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sae = load()
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak / sum(p.numel() * p.element_size() for p in sae.parameters())


def _load_without_meta_device(folder: Path) -> SAE:
    """The double-memory path SAE-Lens's meta-device loading avoids: real initialised
    weights first, then the loaded ones."""
    cfg, state = sae_lens_disk_loader(folder, "cpu")
    sae = SAE.from_dict(cfg)
    sae.load_state_dict(state)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_load_from_disk_peaks_at_one_copy_of_the_weights(arch: str, tmp_path: Path):
    """The claim of SAE-Lens's copied peak-memory test, measured for real: its tracemalloc
    sees no torch tensor memory (tensors are not allocated through Python's allocator), so
    this counts torch's own allocations around `SAE.load_from_disk`. The same measure of a
    load that first builds real weights must read about two copies, or it proves nothing."""
    module = make_module(arch, d_model=128)
    cfg = {**to_saelens(module).cfg.to_dict(), "d_sae": 4096}  # ~4 MB of weights
    SAE.from_dict(cfg).save_model(tmp_path)
    SAE.load_from_disk(tmp_path)  # warm up code paths and lazy imports
    meta = _peak_copies(lambda: SAE.load_from_disk(tmp_path))
    naive = _peak_copies(lambda: _load_without_meta_device(tmp_path))
    assert 0.8 < meta < 1.3 and naive > 1.7, f"peak growth: {meta:.2f} copies (meta device), {naive:.2f} (without)"
