"""The faithfulness curve against hand-written patched runs, on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from mxd_lens import attach
from mxd_lens.circuits import curve_figure, curve_grid, faithfulness_curve
from tests.circuits.test_patching import LAYER, logit_diff, make_mxd, make_transcoder, tiny_model, tokens  # noqa: F401


def run_with_nodes(model, corrupted, clean_tokens, module, nodes, metric) -> float:
    """Full forward of the corrupted tokens with the given nodes set to clean values."""
    names = {"unit": f"blocks.{LAYER}.mlp.{module.acts_hook_name}", "error": f"blocks.{LAYER}.mlp.hook_error",
             "dense": f"blocks.{LAYER}.mlp.hook_hidden"}
    _, cache = model.run_with_cache(clean_tokens, names_filter=list(names.values()))
    hooks = []
    for kind, name in names.items():
        chosen = [(p, u) for k, p, u, _ in nodes if k == kind]
        if not chosen or name not in cache:
            continue

        def hook(act, hook, chosen=chosen, clean=cache[name], kind=kind):
            act = act.clone()
            for p, u in chosen:
                if kind == "unit":
                    act[:, p, u] = clean[:, p, u]
                else:
                    act[:, p] = clean[:, p]
            return act

        hooks.append((name, hook))
    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)))


@pytest.mark.parametrize("make", [make_mxd, make_transcoder], ids=["mxd", "transcoder"])
def test_curve_points_match_hand_written_runs(tiny_model, tokens, make):
    clean, corrupted, good, bad = tokens
    metric = logit_diff(good, bad)
    module = make()
    with attach(tiny_model, {LAYER: module}, use_error_term=True):
        curve = faithfulness_curve(tiny_model, clean, corrupted, metric, LAYER, n_points=12, n_top_nodes=10**6)
        assert curve.n_nodes[0] == 0 and curve.n_nodes[-1] == curve.n_candidate_nodes
        assert curve.fraction[0] == pytest.approx(0.0, abs=1e-5)
        assert curve.fraction[-1] == pytest.approx(1.0, abs=1e-4)
        # full patch == corrupted run with the clean MLP output
        mlp = f"blocks.{LAYER}.hook_mlp_out"
        _, cache = tiny_model.run_with_cache(clean, names_filter=mlp)
        with torch.no_grad():
            ref_full = float(metric(tiny_model.run_with_hooks(corrupted, fwd_hooks=[(mlp, lambda a, hook: cache[mlp])])))
        assert curve.full_patch_metric == pytest.approx(ref_full, rel=1e-4, abs=1e-5)
        # an intermediate point: the top-n nodes patched by hand
        i = len(curve.n_nodes) // 2
        n = curve.n_nodes[i]
        assert 0 < n < curve.n_candidate_nodes
        ref = run_with_nodes(tiny_model, corrupted, clean, module, curve.top_nodes[:n], metric)
        frac = (ref - curve.corrupted_metric) / (curve.full_patch_metric - curve.corrupted_metric)
        assert curve.fraction[i] == pytest.approx(frac, rel=1e-3, abs=1e-4)
        # the error term alone
        err_nodes = [("error", p, -1, 0.0) for p in range(clean.shape[1])]
        ref_err = run_with_nodes(tiny_model, corrupted, clean, module, err_nodes, metric)
        frac_err = (ref_err - curve.corrupted_metric) / (curve.full_patch_metric - curve.corrupted_metric)
        assert curve.error_fraction == pytest.approx(frac_err, rel=1e-3, abs=1e-4)
    kinds = {k for k, *_ in curve.top_nodes}
    assert "error" in kinds and ("dense" in kinds) == (module.architecture == "mxd")
    assert len(curve.metric) == len(curve.fraction)
    assert curve.metric[-1] == pytest.approx(curve.full_patch_metric, rel=1e-4, abs=1e-5)
    fig = curve_figure([curve])
    assert len(fig.data) == 2  # the fraction (clipped) and the raw metric beside it
    assert list(fig.data[0].customdata) == curve.fraction and list(fig.data[1].y) == curve.metric


def test_curve_and_agreement_capture_each_batch_once(tiny_model, tokens):
    """The clean and corrupted batches run through the layers before `layer` once each:
    attribution, the patched runs and the clean metric reuse those captures."""
    from mxd_lens.circuits import attribution_agreement

    clean, corrupted, good, bad = tokens
    metric = logit_diff(good, bad)
    embeds = []
    handle = tiny_model.embed.register_forward_hook(lambda m, a, out: embeds.append(1))
    try:
        with attach(tiny_model, {LAYER: make_mxd()}, use_error_term=True):
            curve = faithfulness_curve(tiny_model, clean, corrupted, metric, LAYER, n_points=8)
            assert len(embeds) == 2
            agree = attribution_agreement(tiny_model, clean, corrupted, metric, LAYER, n_nodes=5)
            assert len(embeds) == 4
    finally:
        handle.remove()
    with torch.no_grad():
        assert curve.clean_metric == pytest.approx(float(metric(tiny_model(clean))), rel=1e-5)
    assert len(agree.nodes) == 5


def test_curve_grid_is_increasing_and_complete():
    for n_max in (0, 5, 40, 1000, 31_337):
        g = curve_grid(n_max, 30)
        assert g[0] == 0 and g[-1] == n_max and g == sorted(set(g))
    assert curve_grid(1000, 30)[:17] == list(range(17))


def test_curve_rejects_bad_rank(tiny_model, tokens):
    clean, corrupted, good, bad = tokens
    with attach(tiny_model, {LAYER: make_mxd()}):
        with pytest.raises(ValueError, match="rank='top'"):
            faithfulness_curve(tiny_model, clean, corrupted, logit_diff(good, bad), LAYER, rank="top")


def test_curve_figure_clips_fractions_of_a_tiny_denominator(tiny_model, tokens):
    """A curve whose layer difference is near zero (fractions in the thousands of percent)
    is drawn on the edge of the fraction axis; its raw metric is drawn as it is."""
    from dataclasses import replace

    from mxd_lens.circuits.figures import FRACTION_RANGE

    clean, corrupted, good, bad = tokens
    with attach(tiny_model, {LAYER: make_mxd()}, use_error_term=True):
        curve = faithfulness_curve(tiny_model, clean, corrupted, logit_diff(good, bad), LAYER, n_points=8)
    wild = replace(curve, fraction=[0.0, 120.0, -45.0] + curve.fraction[3:])
    fig = curve_figure([wild])
    y = list(fig.data[0].y)
    assert y[1] == FRACTION_RANGE[1] and y[2] == FRACTION_RANGE[0] and list(fig.layout.yaxis.range) == list(FRACTION_RANGE)
    assert list(fig.data[0].customdata)[:3] == [0.0, 120.0, -45.0]  # the true values, in the hover text
    assert fig.data[0].marker.symbol[1] == "circle-open" and fig.data[0].marker.symbol[0] == "circle"
    assert list(fig.data[1].y) == wild.metric


@pytest.fixture(scope="module")
def ioi2(default_model):
    from mxd_lens.circuits import ioi_task

    return ioi_task(default_model.tokenizer, 2)


@pytest.fixture(scope="module")
def shares2(default_model, ioi2):
    from mxd_lens.circuits.curves import layer_shares

    return layer_shares(default_model, ioi2.clean, ioi2.corrupted, ioi2.metric())


def test_layer_shares_match_hand_patched_runs(default_model, ioi2, shares2):
    model, task, shares = default_model, ioi2, shares2
    assert len(shares.share) == model.cfg.n_layers
    with torch.no_grad():
        assert shares.clean_metric == pytest.approx(float(task.metric()(model(task.clean))), rel=1e-5)
        assert shares.corrupted_metric == pytest.approx(float(task.metric()(model(task.corrupted))), rel=1e-5)
        for layer in (0, 5, model.cfg.n_layers - 1):
            name = f"blocks.{layer}.hook_mlp_out"
            _, cache = model.run_with_cache(task.clean, names_filter=name)
            m = float(task.metric()(model.run_with_hooks(task.corrupted, fwd_hooks=[(name, lambda a, hook: cache[name])])))
            assert shares.patched_metric[layer] == pytest.approx(m, rel=1e-4, abs=1e-4)
            share = (m - shares.corrupted_metric) / (shares.clean_metric - shares.corrupted_metric)
            assert shares.share[layer] == pytest.approx(share, rel=1e-3, abs=1e-4)
    assert shares.larger_than(0.5)[0] == 0  # layer 0's MLP carries SmolLM2's IOI difference


def test_cli_circuit_refuses_a_layer_with_no_share(default_model, shares2, tmp_path, capsys):
    """`mxd-lens circuit --run DIR --n-prompts 2` with saved (random) MxDs at layers 0 and 5.
    Layer 5's MLP carries ~0 of the IOI difference: refused (naming its share and layer 0,
    where it is larger) before any curve; with --force both curves are drawn and layer 5's
    carries the warning."""
    import argparse
    import json

    from mxd_lens import MxD, MxDConfig
    from mxd_lens.circuits import add_subcommand

    share5 = shares2.share[5]
    assert abs(share5) < 0.05
    cfg = default_model.cfg
    torch.manual_seed(0)
    for layer in (0, 5):
        mxd = MxD(MxDConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_hidden=32, n_experts=32, k=4, act_fn=cfg.act_fn,
                            glu=cfg.gated_mlp, layer=layer))  # fmt: skip
        with torch.no_grad():
            mxd.W_out.normal_(0, 0.05)
        mxd.save(tmp_path / "run" / f"mxd_l{layer}")
    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers())
    argv = ["circuit", "--run", str(tmp_path / "run"), "--n-prompts", "2", "--out", str(tmp_path / "out")]
    args = parser.parse_args(argv)
    with pytest.raises(ValueError, match=rf"layer 5's MLP carries {share5:.3f} of the behaviour.*L0 1\.00"):
        args.func(args)
    assert not (tmp_path / "out").exists()  # refused before --out is touched
    capsys.readouterr()
    args = parser.parse_args(argv + ["--force"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "WARNING: layer 5's MLP carries" in captured.err and "WARNING: layer 0" not in captured.err
    assert "mxd_l5: layer 5" in captured.out and "UNRELIABLE" in captured.out.split("mxd_l5: layer 5")[1]
    assert "80% at" in captured.out
    records = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert [r["label"] for r in records] == ["mxd_l0", "mxd_l5"]
    l0, l5 = records
    assert l0["fraction"][-1] == pytest.approx(1.0, abs=1e-3) and l0["warning"] is None
    assert l0["original_layer_share"] == pytest.approx(1.0, abs=0.05)
    assert l5["layer"] == 5 and l5["original_layer_share"] == pytest.approx(share5, abs=1e-6)
    assert "layers where it is at least 0.1: L0" in l5["warning"]
    assert (tmp_path / "out" / "curves.html").stat().st_size > 10_000
    with pytest.raises(ValueError, match="no modules given"):
        args.func(parser.parse_args(["circuit", "--out", str(tmp_path / "o2")]))
