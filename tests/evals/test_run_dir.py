"""`mxd-lens eval RUN_DIR` reproduces a frontier run on the real model (special positions
excluded, learning curves on) from its folder alone."""

from __future__ import annotations

import json

import pytest

from mxd_lens.cli import main
from mxd_lens.experiments.frontier import run_frontier
from mxd_lens.experiments.config import FrontierConfig
from mxd_lens.experiments.reeval import COMPARED
from mxd_lens.training import ActivationConfig, TrainerConfig


@pytest.fixture(scope="module")
def real_run(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = FrontierConfig(
        layer=28, methods=["mxd", "transcoder"], ks=[8], width=256, d_hidden=64, context=64, collect_tokens=2048,
        eval_tokens=256, eval_batch_size=2, curve_points=2, curve_tokens=128, progress=False,
        trainer=TrainerConfig(train_tokens=1024, batch_size=256, warmup_steps=2, progress=False,
                              activations=ActivationConfig(buffer_tokens=1024)),
    )
    results = run_frontier(cfg, out, model=default_model, echo=lambda _: None)
    return out, results


def test_eval_run_dir_reproduces_the_run(real_run, tmp_path, capsys):
    run, results = real_run
    assert results["config"]["exclude_special_tokens"] is True
    assert main(["eval", str(run), "--out", str(tmp_path / "again")]) == 0
    assert "largest difference from the recorded rows" in capsys.readouterr().out
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert [(r["method"], r["k"]) for r in again["rows"]] == [(r["method"], r["k"]) for r in results["rows"]]
    for old, new in zip(results["rows"], again["rows"]):
        for key in COMPARED:
            assert new[key] == pytest.approx(old[key], rel=1e-6, abs=1e-9), key
    assert again["baselines"]["ce_zero_ablation"] == pytest.approx(results["ce_zero_ablation"], rel=1e-9)
    # settings come from the run: a flag is refused rather than silently ignored
    assert main(["eval", str(run), "--include-special-tokens"]) == 1
    assert "takes every setting from RUN_DIR/results.json" in capsys.readouterr().err


def test_run_reports_what_its_numbers_are_made_of(real_run):
    run, results = real_run
    evaluation = json.loads((run / "evaluation.json").read_text())
    b = evaluation["main"]["baselines"]
    assert b["exclude_special_tokens"] is True and 0 in b["special_ids"]
    assert b["excluded_positions"] >= 4  # every row starts with the separator
    assert 0 < b["excluded_energy_share"]["28"] < 1
    assert b["ce_zero_ablation_special_kept"] == pytest.approx(results["ce_zero_ablation"])
    curves = evaluation["learning_curves"]
    assert curves["layer"] == 28 and curves["eval_tokens"] == 2 * 63
    assert set(curves["modules"]) == {"mxd_k8", "transcoder_k8"}
    assert [p["step"] for p in curves["modules"]["mxd_k8"]] == [1, 4]
    html = (run / "frontier.html").read_text()
    assert "learning curve" in html and "special positions excluded" in html
