"""The frontier pipeline on a tiny model: every output written, matched sizes, atomic results."""

from __future__ import annotations

import json

import pytest
import torch

import mxd_lens
from mxd_lens.frontier import RESULT_KEYS, ROW_KEYS, FrontierConfig, build_module, resolve_sizes, run_frontier
from mxd_lens.params import transcoder_n_params
from mxd_lens.training import ActivationConfig, TrainerConfig
from tests.training.helpers import tiny_model, tiny_tokens


def _cfg(**kw):
    return FrontierConfig(
        layer=1, ks=[2, 4], width=96, d_hidden=24, progress=False,
        trainer=TrainerConfig(train_tokens=1024, batch_size=128, warmup_steps=2, progress=False,
                              activations=ActivationConfig(buffer_tokens=256)),
        **kw,
    )


def test_tiny_frontier_writes_every_output(tmp_path):
    model = tiny_model()
    lines = []
    results = run_frontier(_cfg(), tmp_path, model=model, train_rows=tiny_tokens(40), eval_rows=tiny_tokens(6, seed=9),
                           echo=lines.append)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert tuple(on_disk) == RESULT_KEYS
    assert on_disk["eval_tokens"] == 6 * 15 and on_disk["train_tokens"] == 1024
    assert set(on_disk["versions"]) == {"mxd_lens", "torch", "transformer_lens", "sae_lens"}
    assert on_disk["config"]["trainer"]["batch_size"] == 128
    assert len(on_disk["rows"]) == 6
    for row in on_disk["rows"]:
        assert tuple(row) == ROW_KEYS
        folder = tmp_path / f"{row['method']}_k{row['k']}"
        module = mxd_lens.load(folder)
        assert module.n_params() == row["n_params"]
        # the saved module is the evaluated one: its NMSE on fresh data is finite and < 2
        assert row["nmse"] is not None and 0 < row["nmse"] < 2
    assert (tmp_path / "frontier.html").stat().st_size > 100_000  # plotly.js embedded: standalone
    assert "skip_transcoder" in lines[0]
    training = json.loads((tmp_path / "training.json").read_text())
    assert set(training["summaries"]) == {f"{m}_k{k}" for m in ("mxd", "transcoder", "skip_transcoder") for k in (2, 4)}


def test_sizes_are_parameter_matched():
    model = tiny_model()
    sizes = resolve_sizes(model, _cfg())
    budget = transcoder_n_params(32, 32, 96)
    mxd_params = lambda n: 32 * 24 * 2 + 24 + 24 * 32 + 32 + n * (32 + 1 + 32)  # noqa: E731
    n_experts = build_module("mxd", 2, sizes, 1, None, "float32", "meta").n_units
    assert mxd_params(n_experts) <= budget < mxd_params(n_experts + 1)
    assert sizes.glu and sizes.act_fn == "silu"


def test_failed_run_leaves_no_result(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn.W_V[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        run_frontier(_cfg(), tmp_path, model=model, train_rows=tiny_tokens(40), eval_rows=tiny_tokens(6))
    assert not (tmp_path / "results.json").exists()


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="unknown method"):
        FrontierConfig(methods=["mxd", "pca"])
    with pytest.raises(ValueError, match="K=64 is larger than the transcoder width 32"):
        FrontierConfig(ks=[64], width=32)
    with pytest.raises(ValueError, match="K=80 is larger than the MxD's"):
        resolve_sizes(tiny_model(), FrontierConfig(layer=1, ks=[80], width=96, d_hidden=24))


def _snapshot(folder):
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _nan_model():
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn.W_V[0, 0, 0] = float("nan")
    return model


def test_failed_run_leaves_a_finished_run_and_other_files_untouched(tmp_path):
    run_frontier(_cfg(), tmp_path, model=tiny_model(), train_rows=tiny_tokens(40), eval_rows=tiny_tokens(6, seed=9),
                 echo=lambda _: None)
    (tmp_path / "notes.log").write_text("the user's log")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="NaN/inf"):  # fails mid-training, after modules were staged
        run_frontier(_cfg(), tmp_path, model=_nan_model(), train_rows=tiny_tokens(40), eval_rows=tiny_tokens(6),
                     overwrite=True)
    assert _snapshot(tmp_path) == before


def test_failed_run_into_a_new_folder_removes_it(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="NaN/inf"):
        run_frontier(_cfg(), out, model=_nan_model(), train_rows=tiny_tokens(40), eval_rows=tiny_tokens(6))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_finished_run_only_on_success(tmp_path):
    quiet = dict(train_rows=tiny_tokens(40), eval_rows=tiny_tokens(6, seed=9), echo=lambda _: None)
    run_frontier(_cfg(), tmp_path, model=tiny_model(), **quiet)
    (tmp_path / "notes.log").write_text("the user's log")
    with pytest.raises(ValueError, match="already holds results.json"):
        run_frontier(_cfg(), tmp_path, model=tiny_model(), **quiet)
    cfg = FrontierConfig(**{**_cfg().to_dict(), "ks": [2], "methods": ["mxd"]})
    results = run_frontier(cfg, tmp_path, model=tiny_model(), overwrite=True, **quiet)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    names = sorted(p.name for p in tmp_path.iterdir())
    # the old run's other modules went with it; the user's file stayed; nothing staged is left
    assert names == ["frontier.html", "mxd_k2", "notes.log", "results.json", "training.json"]
    assert (tmp_path / "notes.log").read_text() == "the user's log"


def test_run_folder_protocol(tmp_path):
    from mxd_lens.run_folder import STAGING_PREFIX, RunFolder

    out = tmp_path / "out"
    # a dead writer's staging folder is cleared; a failure keeps checkpoints that hold something
    (out / f"{STAGING_PREFIX}999999999-x").mkdir(parents=True)
    folder = RunFolder(out, keep_on_failure=["checkpoints"])
    with pytest.raises(KeyboardInterrupt):
        with folder:
            (folder.staging / "results.json").write_text("{}")
            (out / "checkpoints" / "step_1").mkdir(parents=True)
            (out / "checkpoints" / "step_1" / "state.pt").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    # empty checkpoint folders of a failed run that created --out go with it
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with RunFolder(fresh, keep_on_failure=["checkpoints"]):
            (fresh / "checkpoints").mkdir()
            raise RuntimeError("boom")
    assert not fresh.exists()
    # a commit moves the marker in last and replaces same-named entries in one rename each
    with RunFolder(out, marker="results.json") as folder:
        (folder.staging / "a").mkdir()
        (folder.staging / "results.json").write_text('{"new": 1}')
        folder.commit()
    assert (out / "results.json").read_text() == '{"new": 1}' and (out / "a").is_dir()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="already holds results.json"):
        RunFolder(out).check()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        RunFolder(blocker).check()
    with pytest.raises(ValueError, match="not writable"):
        RunFolder(blocker / "run").check()
