"""Steering controls: the random-direction control adds exactly the unit's norm at every
position, per-row steering adds exactly the unit's contribution, and the evaluation runs
end to end with the interval and direction-cosine it reports."""

from __future__ import annotations

import pytest
import torch

from mxd_lens import MxD, MxDConfig, TopKTranscoder, TranscoderConfig, attach
from mxd_lens.circuits.steering import (
    bootstrap_ci,
    evaluate_steering,
    random_unit_directions,
    steer_rows,
    steer_rows_random_direction,
)

LAYER = 3


@pytest.fixture(scope="module")
def modules(default_model):
    """A transcoder and an MxD whose decoder is the model's own MLP decoder (so an expert's
    direction c_n * D^T z really varies with the input)."""
    cfg = default_model.cfg
    torch.manual_seed(0)
    tc = TopKTranscoder(TranscoderConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_sae=256, k=8, layer=LAYER))
    mxd = MxD(MxDConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_hidden=cfg.d_mlp, n_experts=128, k=8,
                        act_fn=cfg.act_fn, glu=cfg.gated_mlp, layer=LAYER))  # fmt: skip
    mlp = default_model.blocks[LAYER].mlp
    with torch.no_grad():
        mxd.W_out.copy_(mlp.W_out)
        mxd.W_hidden.copy_(mlp.W_gate)
        if mxd.W_hidden_lin is not None:
            mxd.W_hidden_lin.copy_(mlp.W_in)
    return {"tc": tc, "mxd": mxd}


def mlp_outputs(model, tokens, *contexts):
    seen = {}

    def grab(y, hook):
        seen["y"] = y.detach().clone()

    from contextlib import ExitStack

    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        model.run_with_hooks(tokens, stop_at_layer=LAYER + 1, fwd_hooks=[(f"blocks.{LAYER}.mlp.hook_out", grab)])
    return seen["y"]


@pytest.mark.parametrize("name", ["tc", "mxd"])
def test_random_direction_control_has_the_units_norm(default_model, modules, name):
    model, module = default_model, modules[name]
    tokens = model.to_tokens(["It was a bright cold day in April"]).expand(3, -1)
    units, values = [None, 5, 9], [0.0, 3.0, 7.5]
    dirs = random_unit_directions(3, model.cfg.d_model, seed=0)
    with attach(model, {LAYER: module}, use_error_term=True):
        base = mlp_outputs(model, tokens)
        by_unit = mlp_outputs(model, tokens, steer_rows(model, LAYER, units, values)) - base
        by_dir = mlp_outputs(model, tokens, steer_rows_random_direction(model, LAYER, units, values, dirs)) - base
        _, cache = model.run_with_cache(tokens[:1], stop_at_layer=LAYER + 1)
    x = cache[f"blocks.{LAYER}.mlp.hook_in"][0]
    # the unsteered row: unchanged (up to the dense decoding a hooked unit path takes)
    torch.testing.assert_close(by_unit[0], torch.zeros_like(by_unit[0]), rtol=0, atol=1e-6)
    assert torch.equal(by_dir[0], torch.zeros_like(by_dir[0]))
    for b in (1, 2):
        expected = module.unit_contribution(x, units[b], torch.full((x.shape[0],), values[b]))
        torch.testing.assert_close(by_unit[b], expected, rtol=1e-4, atol=1e-5)
        # equal norm at every position, along the row's own random direction
        torch.testing.assert_close(by_dir[b].norm(dim=-1), by_unit[b].norm(dim=-1), rtol=1e-4, atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(by_dir[b], dirs[b].expand_as(by_dir[b]), dim=-1)
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-4)
    norms = by_unit[2].norm(dim=-1)
    if name == "tc":  # a fixed decoder row: the same norm everywhere
        torch.testing.assert_close(norms, norms[0].expand_as(norms), rtol=1e-4, atol=1e-6)
    else:  # an expert's norm follows the input
        assert norms.std() > 1e-3 * norms.mean()


def test_bootstrap_interval():
    const = torch.full((4, 5), 0.25)
    assert bootstrap_ci(const) == pytest.approx((0.25, 0.25, 0.25))
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(8, 6, generator=g) + 1.0
    m, lo, hi = bootstrap_ci(grid)
    assert lo < m < hi and m == pytest.approx(float(grid.mean()))
    with pytest.raises(ValueError, match="units, prompts"):
        bootstrap_ci(torch.zeros(3))


def test_evaluate_steering_end_to_end(default_model, modules, heldout_rows):
    model = default_model
    out = {}
    for name, module in modules.items():
        with attach(model, {LAYER: module}, use_error_term=True):
            out[name] = evaluate_steering(model, LAYER, heldout_rows[:2], n_units=2, strength=4.0,
                                          prompts=["I think that", "It was a"], n_new=2,
                                          min_frequency=0.0, max_frequency=1.0, progress=False)
    for name, r in out.items():
        assert len(r.units) == len(r.control_units) == 2 and not set(r.units) & set(r.control_units)
        assert all(len(t) > 0 for t in r.target_tokens)
        for cond in ("base", "unit", "random_unit", "random_direction"):
            grid = torch.tensor(r.hit_rate[cond])
            assert grid.shape == (2, 2) and ((grid >= 0) & (grid <= 1)).all()
        e = r.effects["unit - random_direction"]
        assert e["low"] <= e["mean"] <= e["high"]
        # 'unit' is steered minus unsteered, from the grids it reports
        diff = torch.tensor(r.hit_rate["unit"]) - torch.tensor(r.hit_rate["base"])
        assert r.effects["unit"]["mean"] == pytest.approx(float(diff.mean()), abs=1e-6)
    assert out["tc"].direction_cosine["mean"] == pytest.approx(1.0, abs=1e-5)  # a fixed row
    assert out["mxd"].direction_cosine["mean"] < 0.999  # input-dependent directions
