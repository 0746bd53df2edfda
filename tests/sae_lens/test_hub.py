"""Loading modules from the Hugging Face hub: `mxd_lens.load("user/repo", folder)` and the
classes' `from_pretrained`, offline against a hub-cache layout (huggingface_hub resolves
an offline download from `$HF_HUB_CACHE/models--user--repo/snapshots/<commit>` through
`refs/main`, exactly as here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open

import mxd_lens
from mxd_lens import MxD, SkipTranscoder, TopKTranscoder, storage
from tests.sae_lens.helpers import ARCHS, make_module

REPO = "someone/mxd-hub-test"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def serve_offline(repo_folder: Path, cache: Path, monkeypatch, repo_id: str = REPO) -> Path:
    """Lay `repo_folder` out as the hub cache holds a downloaded repo and go offline;
    returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(repo_folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> dict[str, object]:
    """A repo of the three architectures (one nested under layer_1/) served from the cache."""
    repo = tmp_path / "repo"
    modules = {}
    for i, arch in enumerate(ARCHS):
        modules[f"{arch}_k3"] = make_module(arch, seed=10 + i)
    modules["layer_1/mxd_k3"] = make_module("mxd", seed=20)
    rates = torch.linspace(0.0, 0.5, 13)
    for name, module in modules.items():
        storage.save(module, repo / name, firing_rates=rates if name == "mxd_k3" else None)
    snapshot = serve_offline(repo, tmp_path / "hub", monkeypatch)
    return {"modules": modules, "snapshot": snapshot, "rates": rates}


def test_load_reads_a_folder_of_a_hub_repo(hub) -> None:
    x = torch.randn(4, 16)
    for name, original in hub["modules"].items():
        loaded = mxd_lens.load(REPO, name)
        assert type(loaded) is type(original)
        assert torch.equal(loaded.reconstruct(x), original.reconstruct(x)), name
    cast = mxd_lens.load(REPO, "mxd_k3", dtype="float64", device="cpu")
    assert cast.dtype == torch.float64
    rates = storage.firing_rates(storage.resolve(REPO, "mxd_k3"))
    assert torch.allclose(rates, hub["rates"], atol=1e-7)
    assert storage.resolve(REPO, "mxd_k3") == hub["snapshot"] / "mxd_k3"


def test_from_pretrained_on_each_class(hub) -> None:
    x = torch.randn(3, 16)
    mxd = MxD.from_pretrained(REPO, "mxd_k3")
    assert torch.equal(mxd.reconstruct(x), hub["modules"]["mxd_k3"].reconstruct(x))
    skip = SkipTranscoder.from_pretrained(REPO, "topk_skip_transcoder_k3")
    assert torch.equal(skip.reconstruct(x), hub["modules"]["topk_skip_transcoder_k3"].reconstruct(x))
    assert isinstance(TopKTranscoder.from_pretrained(REPO, "topk_transcoder_k3"), TopKTranscoder)
    with pytest.raises(ValueError, match=r"holds a MxD \(mxd\), not a TopKTranscoder; use mxd_lens.load"):
        TopKTranscoder.from_pretrained(REPO, "mxd_k3")


def test_hub_errors_name_what_to_do(hub, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"the hub repo 'someone/mxd-hub-test' has no module folder 'mxd_k99'"):
        mxd_lens.load(REPO, "mxd_k99")
    with pytest.raises(FileNotFoundError, match=r"not in the hub cache .*SAE\.from_pretrained\('someone/other', 'mxd_k3'\)"):
        mxd_lens.load("someone/other", "mxd_k3")
    with pytest.raises(ValueError, match=r"folder='\.\./mxd_k3' must name a module folder inside the repo"):
        mxd_lens.load(REPO, "../mxd_k3")
    with pytest.raises(FileNotFoundError, match=r"not a Hugging Face repo id .*mxd_lens.load\('user/repo', 'mxd_k3'\)"):
        mxd_lens.load("not a repo", "mxd_k3")
    # One argument that is not a folder: the message shows both ways of naming a hub module.
    with pytest.raises(FileNotFoundError) as err:
        mxd_lens.load(REPO)
    assert "no module folder at someone/mxd-hub-test" in str(err.value)
    assert "mxd_lens.load('user/repo', 'mxd_k32')" in str(err.value)
    assert "sae_lens.SAE.from_pretrained('user/repo', 'mxd_k32')" in str(err.value)


def test_a_local_folder_wins_over_the_hub(hub, tmp_path: Path, monkeypatch) -> None:
    local = tmp_path / "someone" / "mxd-hub-test"
    module = make_module("topk_transcoder", seed=99)
    storage.save(module, local / "mxd_k3")  # same names as the hub repo, different module
    monkeypatch.chdir(tmp_path)
    x = torch.randn(2, 16)
    assert torch.equal(mxd_lens.load(REPO, "mxd_k3").reconstruct(x), module.reconstruct(x))


def test_save_sparsity_writes_sae_lens_log10_rates(tmp_path: Path) -> None:
    module = make_module("mxd")
    folder = storage.save(module, tmp_path / "m")
    with pytest.raises(ValueError, match=r"firing_rates has shape \(12,\); expected \(13,\)"):
        storage.save_sparsity(folder, torch.zeros(12))
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        storage.save_sparsity(folder, torch.full((13,), 1.5))
    assert not (folder / storage.SPARSITY_FILE).exists()  # nothing written for bad input
    rates = torch.tensor([0.0, 1.0, 0.5, 1e-3] + [0.25] * 9)
    storage.save_sparsity(folder, rates)
    with safe_open(str(folder / storage.SPARSITY_FILE), framework="pt") as f:
        assert list(f.keys()) == ["sparsity"]
        log = f.get_tensor("sparsity")
    expected = torch.log10(rates + 1e-10)
    assert torch.equal(log, expected) and log[0].item() == pytest.approx(-10.0) and log[1].item() == 0.0
    assert torch.allclose(storage.firing_rates(folder), rates, atol=1e-7)
