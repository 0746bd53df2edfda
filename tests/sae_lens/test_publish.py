"""Publishing a run as a Hugging Face repo, and loading it back from a hub-cache layout."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from sae_lens import SAE

import mxd_lens
from mxd_lens import io
from mxd_lens.publish import RESULTS_KEYS, ROW_KEYS, add_subcommand, publish
from mxd_lens.saelens import MxDSAE, TopKSkipTranscoderSAE
from tests.sae_lens.helpers import ARCHS, make_module
from tests.sae_lens.test_format import write_pickle_bomb

REPO = "someone/smollm2-mxd-l1"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def results_row(method: str, k: int, i: int) -> dict:
    row = {
        "method": method,
        "k": k,
        "n_params": 1000 + i,
        "nmse": 0.1 + i / 100,
        "ce": 4.01 + i / 1000,
        "delta_ce": 0.0123 + i / 1000,
        "delta_ce_stderr": 0.0004,
        "ce_recovered": 0.9 - i / 100,
        "kl": 0.01,
        "l0": float(k),
        "dead_fraction": 0.0,
        "usage_entropy": 3.2,
        "expert_cos": 0.05 if method == "mxd" else None,
    }
    assert tuple(row) == ROW_KEYS
    return row


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run as the training engineer writes it: real saved modules + results.json."""
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for i, arch in enumerate(ARCHS):
        module = make_module(arch, seed=i)
        rates = torch.linspace(0.0, 0.4, module.n_units) if arch == "mxd" else None
        io.save(module, run / f"{arch}_k3", firing_rates=rates, metadata={"context_size": 128})
        rows.append(results_row(arch, 3, i))
    rows.append(results_row("mxd", 8, 5))  # a row whose module was not kept
    results = {
        "model": "SmolLM2-135M-Instruct",
        "layer": 1,
        "train_tokens": 2_000_000,
        "eval_tokens": 65_536,
        "ce_clean": 4.0104,
        "ce_zero_ablation": 4.0914,
        "ce_mean_ablation": 4.0949,
        "seed": 0,
        "config": {"lr": 1e-4},
        "versions": {"mxd_lens": mxd_lens.__version__, "torch": torch.__version__},
        "rows": rows,
    }
    assert tuple(results) == RESULTS_KEYS
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_dry_run_lays_out_the_repo(run_dir: Path, tmp_path: Path) -> None:
    out = publish(run_dir, REPO, dry_run=True, out=tmp_path / "repo")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "mxd_k3",
        "results.json",
        "topk_skip_transcoder_k3",
        "topk_transcoder_k3",
    ]
    x = torch.randn(5, 16)
    for arch in ARCHS:
        folder = out / f"{arch}_k3"
        original = mxd_lens.load(run_dir / folder.name)
        assert torch.equal(mxd_lens.load(folder).reconstruct(x), original.reconstruct(x))
        assert torch.equal(SAE.load_from_disk(folder)(x), original.reconstruct(x))
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        assert meta["model_name"] == "SmolLM2-135M-Instruct" and meta["context_size"] == 128
    assert torch.allclose(io.firing_rates(out / "mxd_k3"), torch.linspace(0.0, 0.4, 13), atol=1e-6)
    assert not (out / "topk_transcoder_k3" / "sparsity.safetensors").exists()

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: saelens")
    for text in (
        "layer 1 of **SmolLM2-135M-Instruct**",
        "2,000,000 training tokens per module",
        "65,536 held-out predictions",
        "Clean model: 4.0104",
        "zero-ablated: 4.0914",
        "mean-ablated:\n4.0949",
        "| `mxd_k3` | mxd | 3 | 1,000 | 0.1000 | 4.0100 | 0.0123 | 0.0004 | 0.900 | 0.0100 | 3.0 | 0.0% |",
        "| `topk_skip_transcoder_k3` | topk_skip_transcoder | 3 | 1,002 |",
        "| (not published) | mxd | 8 |",
        f'SAE.from_pretrained("{REPO}", "mxd_k3")',
        "import mxd_lens",
        "mxd_lens.load(",
        "13 experts, k=3",
        "hook_sae_acts_post",
        "blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out",
    ):
        assert text in card, text


def test_publish_refuses_bad_runs(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repo_id='no-slash' is not a Hugging Face repo id"):
        publish(run_dir, "no-slash", out=tmp_path / "a")
    cfg = run_dir / "mxd_k3" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"k": 3', '"k": 99'))
    with pytest.raises(ValueError, match="mxd_k3/cfg.json: k=99 is larger than n_experts=13"):
        publish(run_dir, REPO, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing written before every module validated
    results = json.loads((run_dir / "results.json").read_text())
    del results["rows"][0]["kl"], results["eval_tokens"]
    (run_dir / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"missing keys \['eval_tokens'\]"):
        publish(run_dir, REPO, out=tmp_path / "c")


def test_upload_fails_in_one_sentence_when_the_hub_is_unreachable(
    run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=f"cannot upload .* to {REPO}: HF_HUB_OFFLINE is set"):
        publish(run_dir, REPO, dry_run=False, out=tmp_path / "repo")
    assert (tmp_path / "repo" / "mxd_k3" / "cfg.json").is_file()  # the folder is still there to upload later


def test_cli_subcommand(run_dir: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="mxd-lens")
    add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["publish", str(run_dir), "--repo", REPO, "--dry-run", "--out", str(tmp_path / "cli")]
    )
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "README.md").is_file() and str(tmp_path / "cli") in capsys.readouterr().out
    args = parser.parse_args(["publish", str(tmp_path / "missing"), "--repo", REPO, "--dry-run"])
    assert args.func(args) == 1
    assert "no run folder at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["publish", str(run_dir)])  # --repo is required


def hub_cache(tmp_path: Path, repo_folder: Path, monkeypatch) -> Path:
    """Serve `repo_folder` the way the hub cache lays out a downloaded repo, offline."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(repo_folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / REVISION


def test_from_pretrained_reads_a_published_repo(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    snapshot = hub_cache(tmp_path, publish(run_dir, REPO, out=tmp_path / "repo"), monkeypatch)
    x = torch.randn(2, 3, 16)
    sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(REPO, "mxd_k3")
    assert isinstance(sae, MxDSAE) and cfg["architecture"] == "mxd"
    assert torch.equal(sae(x), mxd_lens.load(run_dir / "mxd_k3").reconstruct(x))
    assert torch.allclose(sparsity, io.load_sparsity(snapshot / "mxd_k3"))
    skip = SAE.from_pretrained(REPO, "topk_skip_transcoder_k3")  # no sparsity file: still loads offline
    assert isinstance(skip, TopKSkipTranscoderSAE)
    assert torch.equal(skip(x), mxd_lens.load(run_dir / "topk_skip_transcoder_k3").reconstruct(x))


def test_from_pretrained_refuses_pickled_weights(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    snapshot = hub_cache(tmp_path, publish(run_dir, REPO, out=tmp_path / "repo"), monkeypatch)
    marker = tmp_path / "PWNED"
    write_pickle_bomb(snapshot / "mxd_k3", marker)
    with pytest.raises(Exception, match="header"):
        SAE.from_pretrained(REPO, "mxd_k3")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mxd_lens.load(snapshot / "mxd_k3")
    assert not marker.exists()


def test_publish_out_keeps_other_files_and_a_failed_publish_changes_nothing(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    publish(run_dir, REPO, out=out)
    first = {p.name for p in out.iterdir()}
    assert "notes.txt" in first and "README.md" in first and (out / "notes.txt").read_text() == "mine"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = run_dir / "mxd_k3" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"k": 3', '"k": 99'))
    with pytest.raises(ValueError, match="k=99"):
        publish(run_dir, REPO, out=out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
