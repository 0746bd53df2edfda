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


# --- a fast start: no torch on the paths that only parse ------------------------------------
_PROBE = (
    "import sys, time; t = time.perf_counter(); from mxd_lens.cli import main; status = main(sys.argv[1:]); "
    "heavy = sorted(m for m in ('torch', 'transformer_lens', 'sae_lens', 'transformers') if m in sys.modules); "
    "print('PROBE', status, ','.join(heavy) or '-', file=sys.stderr)"
)
_FAST_COMMANDS = [
    ["--help"],
    ["--version"],
    ["frontier", "--methods", "bogus", "--out", "unused"],
    ["frontier", "--ks", "1,x", "--out", "unused"],
    ["train", "--help"],
    ["eval", "--help"],
    ["circuit", "--help"],
    ["publish", "--help"],
]


def _console_script() -> list[str]:
    from pathlib import Path

    script = Path(sys.executable).parent / "mxd-lens"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mxd_lens"]


@pytest.mark.parametrize("argv", _FAST_COMMANDS, ids=" ".join)
def test_parse_only_paths_import_no_torch(argv):
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60)
    probe = done.stderr.strip().splitlines()[-1].split()
    assert probe[0] == "PROBE", done.stderr
    assert probe[2] == "-", f"{argv} imported {probe[2]}"
    assert int(probe[1]) == (0 if argv[-1] in ("--help", "--version") else 2)


@pytest.mark.parametrize("argv", _FAST_COMMANDS[:4], ids=" ".join)
def test_parse_only_paths_answer_through_the_console_script(argv):
    """The installed `mxd-lens` itself (how fast: benchmarks/bench_startup.py; tests
    assert what it imports, above, not how long it takes on a shared machine)."""
    done = subprocess.run([*_console_script(), *argv], capture_output=True, text=True, timeout=60)
    if argv == ["--version"]:
        assert done.stdout.strip() == f"mxd-lens {__import__('mxd_lens').__version__}"
    if argv[-1] == "unused":
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_help_shows_defaults_from_the_config_fields(capsys):
    from mxd_lens.config import field_docs
    from mxd_lens.experiments.config import FrontierConfig
    from mxd_lens.training.config import TrainerConfig

    assert main(["frontier", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(field_docs(TrainerConfig)["lr"].split()) + " (default: 0.001)" in text
    assert field_docs(FrontierConfig)["layer"] + " (default: 12)" in text
    assert "(default: 16,32)" in text and "(default: mxd,transcoder,skip_transcoder)" in text
    assert main(["demo", "--help"]) == 0  # the demo's own budget is its default
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 196608)" in text and "(default: 0.01)" in text


def test_method_aliases_and_lists(tmp_path):
    from mxd_lens.cli import build_parser, config_from_args
    from mxd_lens.experiments.config import FrontierConfig

    argv = ["frontier", "--methods", "topk_transcoder,mxd", "--ks", "8, 16", "--out", str(tmp_path / "r")]
    args = build_parser(argv).parse_args(argv)
    cfg = config_from_args(args, FrontierConfig())
    assert cfg.methods == ["transcoder", "mxd"] and cfg.ks == [8, 16]
    assert cfg.trainer.device == cfg.device == "cpu" and not (tmp_path / "r").exists()


# --- a failed command leaves --out as it was --------------------------------------------------
def _snapshot(folder):
    """Every path under `folder` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def finished_run(tmp_path):
    """A folder holding a finished run (results.json) and a file of the user's."""
    run = tmp_path / "RUN"
    (run / "mxd_k4").mkdir(parents=True)
    (run / "results.json").write_text('{"model": "a finished run", "rows": [{"method": "mxd", "k": 4}]}\n')
    (run / "mxd_k4" / "cfg.json").write_text("{}")
    (run / "notes.log").write_text("the user's own log\n")
    return run


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "BAD_MODULE_FOLDER"], ["no module folder at BAD_MODULE_FOLDER"]),
        (["train", "--layer", "99"], ["layer=99 is out of range", "0..29"]),
        (["train", "--layer", "99", "--overwrite"], ["layer=99 is out of range"]),
        (["train", "--layers", "3,99", "--overwrite"], ["layer=99 is out of range"]),
        (["frontier", "--ks", "99999", "--overwrite"], ["K=99999 is larger than the MxD's", "units"]),
        (["demo", "--ks", "99999", "--overwrite"], ["K=99999 is larger than"]),
        (["frontier", "--layers", "3,99", "--overwrite"], ["layer=99 is out of range"]),
        (["frontier", "--layer", "3", "--layers", "4"], ["--layer 3 is not among --layers 4"]),
        (["frontier", "--model-name", "gpt2", "--overwrite"], ["model_name='gpt2'", "not a folder"]),
        (["train"], ["already holds results.json", "--overwrite"]),
        (["frontier"], ["already holds results.json", "--overwrite"]),
    ],
)
def test_failed_command_leaves_a_finished_run_untouched(finished_run, capsys, argv, message):
    before = _snapshot(finished_run)
    _fails(capsys, [*argv, "--out", str(finished_run)], message)
    assert _snapshot(finished_run) == before


def test_model_folder_without_config_fails_before_loading(tmp_path, finished_run, capsys):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    before = _snapshot(finished_run)
    _fails(capsys, ["frontier", "--model", str(folder), "--overwrite", "--out", str(finished_run)],
           ["not a Hugging Face model folder", "config.json"])
    assert _snapshot(finished_run) == before


def test_failed_command_into_a_new_folder_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    _fails(capsys, ["frontier", "--ks", "99999", "--out", str(out)], ["K=99999"])
    _fails(capsys, ["train", "--layer", "99", "--out", str(out)], ["layer=99"])
    empty = tmp_path / "texts"
    empty.mkdir()
    _fails(capsys, ["train", "--dataset", str(empty), "--out", str(out)], ["no text found"])
    _fails(capsys, ["eval", "BAD", "--out", str(out)], ["no module folder at BAD"])
    assert not (tmp_path / "new").exists()


def test_train_at_two_layers_on_the_real_model(tmp_path, finished_run, capsys):
    """One tiny real run: MxD at K=4 at layers 3 and 5 from one activation stream, into a
    folder that already holds a finished run and a file of the user's (--overwrite)."""
    import mxd_lens

    argv = ["train", "--methods", "mxd", "--ks", "4", "--layers", "3,5", "--out", str(finished_run), "--overwrite",
            *TINY]
    argv[argv.index("--train-tokens") + 1] = "512"
    assert main(argv) == 0
    assert "layer_3/mxd_k4" in capsys.readouterr().out
    for layer in (3, 5):
        module = mxd_lens.load(finished_run / f"layer_{layer}" / "mxd_k4")
        assert module.cfg.layer == layer and module.cfg.k == 4
    training = json.loads((finished_run / "training.json").read_text())
    assert training["layers"] == [3, 5] and set(training["summaries"]) == {"layer_3/mxd_k4", "layer_5/mxd_k4"}
    # the old result no longer describes the folder: removed, but only once the run succeeded
    assert not (finished_run / "results.json").exists()
    assert (finished_run / "notes.log").read_text() == "the user's own log\n"
    assert not [p for p in finished_run.iterdir() if p.name.startswith(".")]


# --- a post-MLP-norm model from a local Hugging Face folder, end to end ------------------------
def test_frontier_on_a_local_post_norm_folder(tmp_path, capsys):
    """A tiny random Gemma 3 folder (normalisation after the MLP: ln2_post) through the
    whole command: load_model's conversion, module-hook training, evaluation, results."""
    from tests.sources.test_model import _save_tiny_model

    folder = _save_tiny_model(tmp_path / "gemma3", "gemma3")
    text = tmp_path / "texts"  # a folder of .txt files: one document each
    text.mkdir()
    for i in range(12):
        (text / f"{i:02d}.txt").write_text(" ".join(f"w{(7 * i + j * j) % 90 + 3}" for j in range(300)))
    out = tmp_path / "run"
    status = main([
        "frontier", "--model", str(folder), "--layer", "1", "--ks", "4", "--width", "512",
        "--dataset", str(text), "--context", "16", "--collect-tokens", "1024", "--eval-tokens", "256",
        "--train-tokens", "2048", "--batch-size", "128", "--warmup-steps", "2", "--no-progress", "--out", str(out),
        # 16 steps on a random model leave the MxD at NMSE ~0.99-1.01 over the non-special
        # positions alone; with them included it is 0.99: this test is about the conversion
        "--include-special-tokens",
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Gemma3ForCausalLM conversion" in captured.out  # says which conversion it applied
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["resolved"]["model_processing"]["architecture"] == "Gemma3ForCausalLM"
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"mxd", "transcoder", "skip_transcoder"}
    for method, row in rows.items():
        assert 0 < row["nmse"] < 1.0, (method, row["nmse"])  # trained: better than predicting the mean
        assert (out / f"{method}_k4" / "cfg.json").is_file()
