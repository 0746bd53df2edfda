"""The `mxd-lens` command line: bad input gives one clear line on stderr, a non-zero exit
status and no result file; the real model runs end to end on a tiny budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mxd_lens.cli import main
from mxd_lens.frontier import RESULT_KEYS, ROW_KEYS

TINY = ["--width", "256", "--d-hidden", "64", "--context", "64", "--collect-tokens", "2048",
        "--train-tokens", "2048", "--batch-size", "256", "--eval-tokens", "256", "--no-progress"]


def _fails(capsys, argv, expect_in_message, code=None):
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status != 0 and (code is None or status == code)
    assert len(err.splitlines()) == 1, err
    for text in expect_in_message:
        assert text in err, err
    return err


@pytest.mark.parametrize(
    "flags, message, code",
    [
        (["--methods", "mxd,sparse_pca"], ["sparse_pca", "mxd,transcoder,skip_transcoder"], 2),
        (["--ks", "16,x"], ["comma-separated list of integers", "16,x"], 2),
        (["--ks", "300", "--width", "256"], ["K=300 is larger than the transcoder width 256"], 1),
        (["--ks", "0"], ["K=0 must be a positive integer"], 1),
        (["--batch-size", "0"], ["batch_size=0"], 1),
        (["--autocast", "fp8"], ["fp8"], 2),
    ],
)
def test_bad_flags_before_any_work(tmp_path, capsys, flags, message, code):
    out = tmp_path / "run"
    _fails(capsys, ["frontier", "--out", str(out), *flags], message, code)
    assert not (out / "results.json").exists()


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _fails(capsys, ["demo", "--out", str(blocker / "run")], ["--out", "not writable"])
    _fails(capsys, ["frontier", "--out", str(blocker)], ["exists and is not a folder"])


def test_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "texts"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    out = tmp_path / "run"
    _fails(capsys, ["frontier", "--dataset", str(empty), "--out", str(out)], ["no text found", str(empty)])
    assert not (out / "results.json").exists()


def test_existing_result_is_not_overwritten_silently(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    _fails(capsys, ["frontier", "--out", str(tmp_path)], ["already holds results.json", "--overwrite"])
    assert (tmp_path / "results.json").read_text() == "{}"


def test_layer_out_of_range_on_the_real_model(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, ["frontier", "--layer", "30", "--out", str(out), *TINY], ["layer=30 is out of range", "0..29"])
    assert not (out / "results.json").exists()


def test_eval_without_modules(capsys):
    _fails(capsys, ["eval"], ["no module folders given"])


def test_python_m_entry_point_lists_the_subcommands():
    done = subprocess.run([sys.executable, "-m", "mxd_lens", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("demo", "frontier", "train", "eval"):
        assert command in done.stdout


def test_frontier_end_to_end_on_the_real_model(tmp_path, capsys):
    """A tiny budget through the real CLI path: default model, embedded corpus, held-out
    Persuasion, all three methods at two K, then `eval` on two of the saved folders."""
    import mxd_lens

    out = tmp_path / "run"
    assert main(["frontier", "--ks", "4,8", "--seed", "3", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "skip_transcoder" in printed and "clean CE" in printed
    results = json.loads((out / "results.json").read_text())
    assert tuple(results) == RESULT_KEYS
    assert results["layer"] == 12 and results["seed"] == 3 and results["train_tokens"] == 2048
    assert results["eval_tokens"] == 4 * 63
    assert results["ce_zero_ablation"] > results["ce_clean"]
    assert [(r["method"], r["k"]) for r in results["rows"]] == [
        (m, k) for k in (4, 8) for m in ("mxd", "transcoder", "skip_transcoder")
    ]
    for row in results["rows"]:
        assert tuple(row) == ROW_KEYS
        module = mxd_lens.load(out / f"{row['method']}_k{row['k']}")
        assert module.n_params() == row["n_params"] and module.cfg.k == row["k"] == pytest.approx(row["l0"])
        assert module.cfg.hook_name == "blocks.12.ln2.hook_normalized" and module.cfg.layer == 12
        assert (row["expert_cos"] is None) == (row["method"] != "mxd")
    by = {(r["method"], r["k"]): r for r in results["rows"]}
    assert by[("mxd", 4)]["n_params"] <= by[("transcoder", 4)]["n_params"] < by[("skip_transcoder", 4)]["n_params"]
    assert "plotly" in (out / "frontier.html").read_text()[:5000].lower()

    status = main(["eval", str(out / "mxd_k4"), str(out / "transcoder_k4"), "--eval-tokens", "256",
                   "--context", "64", "--no-progress", "--out", str(tmp_path / "ev")])
    assert status == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # the same tokens and modules give the same numbers as the frontier's evaluation
    assert report["baselines"]["ce_clean"] == pytest.approx(results["ce_clean"], abs=1e-6)
    assert report["results"]["mxd_k4"]["delta_ce"] == pytest.approx(by[("mxd", 4)]["delta_ce"], abs=1e-5)
