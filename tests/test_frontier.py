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
    assert names == ["eval_inputs.safetensors", "evaluation.json", "frontier.html", "mxd_k2", "notes.log",
                     "results.json", "training.json"]
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


# --- learning curves and the layer sweep ------------------------------------------------
def test_learning_curve_points_equal_a_separate_evaluation_of_a_checkpoint():
    import copy

    from mxd_lens.evals import evaluate_many
    from mxd_lens.experiments.frontier import learning_curves, module_folders, train_modules

    model, rows, heldout = tiny_model(), tiny_tokens(40), tiny_tokens(6, seed=9)
    cfg = _cfg(curve_points=4, curve_tokens=64, eval_batch_size=3)  # 4 rows of 16 tokens
    curves = learning_curves(model, cfg, heldout, module_folders(cfg))
    steps = sorted(curves.steps)
    assert steps == [1, 2, 4, 8] and steps[-1] == cfg.trainer.total_steps  # log-spaced, last step included
    pick, checkpoint = steps[2], {}

    def on_step(step, modules):
        curves(step, modules)
        if step == pick:
            checkpoint.update({name: copy.deepcopy(m) for name, m in modules.items()})

    trained, _ = train_modules(model, cfg, rows, None, on_step=on_step)
    separate = evaluate_many(model, {n: {1: m.eval()} for n, m in checkpoint.items()}, heldout[:4], batch_size=3,
                             progress=False)
    for name in trained:
        points = curves.points[name]
        assert [p["step"] for p in points] == steps and [p["tokens"] for p in points] == [s * 128 for s in steps]
        point = points[steps.index(pick)]
        r = separate.results[name]
        for key in ("nmse", "delta_ce", "delta_ce_stderr", "ce_recovered", "l0", "dead_fraction"):
            assert point[key] == pytest.approx(getattr(r, key), rel=1e-6, abs=1e-9), (name, key)
        assert points[-1]["nmse"] != point["nmse"]  # the curve moves
    # measuring did not disturb the training: the same modules as without the curves
    plain, _ = train_modules(tiny_model(), cfg, rows, None)
    for name, module in trained.items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, plain[name].state_dict()[key], rtol=0, atol=0)


def test_layer_sweep_trains_from_one_activation_pass(tmp_path):
    from mxd_lens.experiments.frontier import train_modules

    model, rows = tiny_model(), tiny_tokens(40)
    passes = []
    handle = model.embed.register_forward_hook(lambda *args: passes.append(1))
    try:
        train_modules(model, _cfg(), rows, None, layers=[1])
        one_layer, passes[:] = len(passes), []
        modules, _ = train_modules(model, _cfg(), rows, None, layers=[0, 1], main=1)
        assert len(passes) == one_layer  # both layers from the same forward passes
    finally:
        handle.remove()
    assert sorted(modules) == sorted([f"{m}_k{k}" for m in METHOD_NAMES for k in (2, 4)]
                                     + [f"layer_0/{m}_k{k}" for m in METHOD_NAMES for k in (2, 4)])

    results = run_frontier(_cfg(sweep_layers=[0]), tmp_path, model=model, train_rows=rows,
                           eval_rows=tiny_tokens(6, seed=9), echo=lambda _: None)
    assert results["layer"] == 1 and len(results["rows"]) == 6
    from mxd_lens.metadata import measure_firing_rates
    from mxd_lens.storage import firing_rates

    for row in results["rows"]:
        assert mxd_lens.load(tmp_path / f"{row['method']}_k{row['k']}").cfg.layer == 1
        assert mxd_lens.load(tmp_path / "layer_0" / f"{row['method']}_k{row['k']}").cfg.layer == 0
    # sparsity.safetensors of every module (both layers) comes from the evaluation's own
    # counts; it equals a separate firing-rate pass over the held-out rows
    folders = [f"{p}{m}_k{k}" for p in ("", "layer_0/") for m in METHOD_NAMES for k in (2, 4)]
    loaded = {f: mxd_lens.load(tmp_path / f) for f in folders}
    reference = measure_firing_rates(model, loaded, tiny_tokens(6, seed=9), progress=False)
    for f in folders:
        torch.testing.assert_close(firing_rates(tmp_path / f), reference[f], rtol=1e-5, atol=1e-6)
    sweep = json.loads((tmp_path / "layers.json").read_text())
    assert sweep["main_layer"] == 1 and [s["layer"] for s in sweep["layers"]] == [0, 1]
    main = next(s for s in sweep["layers"] if s["layer"] == 1)
    by_row = {(r["method"], r["k"]): r for r in main["rows"]}
    for row in results["rows"]:  # the main layer's sweep entry is results.json's evaluation
        assert by_row[(row["method"], row["k"])]["delta_ce"] == pytest.approx(row["delta_ce"], rel=1e-12)
    assert {(r["denominator"], r["k"]) for r in main["ratios"]} == {(d, k) for d in ("transcoder", "skip_transcoder")
                                                                     for k in (2, 4)}
    for r in main["ratios"]:
        mxd = by_row[("mxd", r["k"])]["delta_ce"]
        assert r["ratio"] == pytest.approx(mxd / by_row[(r["denominator"], r["k"])]["delta_ce"], rel=1e-9)
        assert r["low"] - 1e-9 * abs(r["ratio"]) <= r["ratio"] <= r["high"] + 1e-9 * abs(r["ratio"])
    assert main["ablation_cost"] == pytest.approx(results["ce_zero_ablation"] - results["ce_clean"])
    assert (tmp_path / "layers.html").stat().st_size > 100_000
    assert results["config"]["sweep_layers"] == [0] and results["config"]["exclude_special_tokens"] is True


def test_layers_flag_picks_the_main_layer(tmp_path, capsys):
    from mxd_lens.cli import main

    assert main(["frontier", "--layers", "3,5", "--layer", "4", "--out", str(tmp_path / "x")]) == 1
    assert "--layer 4 is not among --layers 3,5" in capsys.readouterr().err
    assert main(["frontier", "--layers", "3,3", "--out", str(tmp_path / "x")]) == 1
    assert "lists a layer twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


METHOD_NAMES = ("mxd", "transcoder", "skip_transcoder")


def test_crossings_and_curve_steps():
    from mxd_lens.experiments.curves import crossings, curve_steps

    assert curve_steps(384, 6) == [1, 3, 11, 36, 117, 384] and curve_steps(5, 10) == [1, 2, 3, 4, 5]
    assert curve_steps(7, 1) == [7] and curve_steps(7, 0) == []

    def pts(values, err):
        return [{"tokens": 100 * (i + 1), "delta_ce": v, "delta_ce_stderr": err} for i, v in enumerate(values)]

    found = crossings({"mxd_k8": pts([0.5, 0.2, 0.1], 0.01), "transcoder_k8": pts([0.3, 0.25, 0.2], 0.01),
                       "mxd_k16": pts([0.3, 0.1], 0.5), "transcoder_k16": pts([0.2, 0.2], 0.5)})
    assert found == [
        {"a": "mxd_k8", "b": "transcoder_k8", "key": "delta_ce", "between_tokens": [100, 200],
         "leader_after": "mxd_k8", "clear": True},
        {"a": "mxd_k16", "b": "transcoder_k16", "key": "delta_ce", "between_tokens": [100, 200],
         "leader_after": "mxd_k16", "clear": False},
    ]
