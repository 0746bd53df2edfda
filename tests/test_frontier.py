"""The frontier pipeline on a tiny model: every output written, matched sizes, atomic results."""

from __future__ import annotations

import json

import pytest
import torch

import mxd_lens
from mxd_lens.frontier import RESULT_KEYS, ROW_KEYS, FrontierConfig, resolve_sizes, run_frontier
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
    assert mxd_params(sizes.n_experts) <= budget < mxd_params(sizes.n_experts + 1)
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
