"""Special positions, rows as units and the energy shares, held to hand computations with
plain forward passes and TransformerLens hooks (none of the evaluator's machinery)."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from mxd_lens import attach
from mxd_lens.evals import HeldoutProbe, evaluate_many, keep_clean_outputs, mlp_output_means
from mxd_lens.evals.metrics import ratio_interval
from tests.test_evals import ce_by_hand, kl_by_hand, random_mxd, random_transcoder, tiny_model

TOL = dict(rel=1e-5, abs=1e-6)
LAYER = 1
SPECIAL = [0, 5]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def tokens(tiny):
    g = torch.Generator().manual_seed(4)
    t = torch.randint(6, tiny.cfg.d_vocab, (6, 12), generator=g)
    t[:, 0] = 0  # the separator that starts each row
    t[1, 7] = 5  # a special token inside a row
    t[4, 3] = 5
    return t


def special_mask(tokens):
    return (tokens == 0) | (tokens == 5)


def hand_spliced_logits(model, tokens, module, layer=LAYER):
    """The module's output at ordinary positions and the original MLP's at special ones,
    from one TransformerLens hook on the named MLP-output hook."""
    mask = special_mask(tokens)[..., None]
    seen = {}

    def grab(x, hook):
        seen["x"] = x

    def hook(out, hook):
        return torch.where(mask, out, module.reconstruct(seen["x"], hooked=False))

    return model.run_with_hooks(
        tokens,
        fwd_hooks=[(f"blocks.{layer}.ln2.hook_normalized", grab), (f"blocks.{layer}.hook_mlp_out", hook)],
        reset_hooks_end=True,
    )


def test_excluded_position_keeps_the_original_mlp_output(tiny, tokens):
    mxd = random_mxd(tiny.cfg.d_model, seed=5)
    with torch.no_grad():
        hand = hand_spliced_logits(tiny, tokens, mxd)
        _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{LAYER}.hook_mlp_out")
        clean_y = cache[f"blocks.{LAYER}.hook_mlp_out"]
        with attach(tiny, {LAYER: mxd}), keep_clean_outputs(tiny, {LAYER: clean_y}, special_mask(tokens)):
            spliced = tiny(tokens)
        with attach(tiny, {LAYER: mxd}):
            everywhere = tiny(tokens)
    torch.testing.assert_close(spliced, hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(everywhere, hand, atol=1e-3)  # the kept positions matter
    # attach alone is unchanged: it splices every position
    assert tiny.blocks[LAYER].mlp.__class__.__name__ != "MxD"


def test_evaluator_numbers_with_special_positions_excluded(tiny, tokens):
    mxd = random_mxd(tiny.cfg.d_model, seed=6)
    tc = random_transcoder(tiny.cfg.d_model, seed=7)
    report = evaluate_many(tiny, {"mxd": {LAYER: mxd}, "tc": {LAYER: tc}}, tokens, batch_size=4, progress=False,
                           special_ids=SPECIAL)
    mask = special_mask(tokens)
    with torch.no_grad():
        names = lambda n: n in (f"blocks.{LAYER}.hook_mlp_out", f"blocks.{LAYER}.ln2.hook_normalized")  # noqa: E731
        clean, cache = tiny.run_with_cache(tokens, names_filter=names)
        x, y = cache[f"blocks.{LAYER}.ln2.hook_normalized"], cache[f"blocks.{LAYER}.hook_mlp_out"]
        mean = y[~mask].mean(0)  # the mean ablation vector: compared positions only

        def ablate(value):
            return tiny.run_with_hooks(tokens, fwd_hooks=[(
                f"blocks.{LAYER}.hook_mlp_out", lambda a, hook: torch.where(mask[..., None], a, value.expand_as(a)))])

        ce_clean = ce_by_hand(clean, tokens)
        ce_zero = ce_by_hand(ablate(torch.zeros_like(mean)), tokens).mean().item()
        ce_zero_all = ce_by_hand(tiny.run_with_hooks(tokens, fwd_hooks=[(
            f"blocks.{LAYER}.hook_mlp_out", lambda a, hook: torch.zeros_like(a))]), tokens).mean().item()
        b = report.baselines
        assert b.ce_clean == pytest.approx(ce_clean.mean().item(), **TOL)
        assert b.ce_zero_ablation == pytest.approx(ce_zero, **TOL)
        assert b.ce_zero_ablation_special_kept == pytest.approx(ce_zero, **TOL)
        assert b.ce_zero_ablation_all_positions == pytest.approx(ce_zero_all, **TOL)
        assert b.ce_mean_ablation == pytest.approx(ce_by_hand(ablate(mean), tokens).mean().item(), **TOL)
        assert b.exclude_special_tokens and b.special_ids == SPECIAL and b.excluded_positions == int(mask.sum())
        assert b.excluded_ablation_share == pytest.approx(
            (ce_zero_all - ce_zero) / (ce_zero_all - ce_clean.mean().item()), **TOL)
        for name, module in (("mxd", mxd), ("tc", tc)):
            spliced = hand_spliced_logits(tiny, tokens, module)
            ce = ce_by_hand(spliced, tokens)
            r = report.results[name]
            per_row = (ce - ce_clean).mean(1)
            assert r.ce == pytest.approx(ce.mean().item(), **TOL)
            assert r.delta_ce == pytest.approx(per_row.mean().item(), **TOL)
            assert r.row_delta_ce == pytest.approx(per_row.tolist(), **TOL)
            assert r.delta_ce_stderr == pytest.approx(float(scipy.stats.sem(per_row.numpy())), **TOL)
            assert r.kl == pytest.approx(kl_by_hand(spliced, clean).mean().item(), **TOL)
            assert r.ce_recovered == pytest.approx((ce_zero - ce.mean().item()) / (ce_zero - ce_clean.mean().item()), **TOL)
            y_hat = module.reconstruct(x[~mask], hooked=False)
            nmse = ((y_hat - y[~mask]).double().pow(2).sum() / y[~mask].double().pow(2).sum()).item()
            assert r.nmse == pytest.approx(nmse, **TOL)
            acts = module.encode(x[~mask], hooked=False).dense(module.n_units)
            assert r.l0 == pytest.approx((acts != 0).sum(-1).double().mean().item(), **TOL)
        # with the flag off every position is spliced and compared: the ablation is the plain one
        off = evaluate_many(tiny, {"mxd": {LAYER: mxd}}, tokens, batch_size=4, progress=False,
                            special_ids=SPECIAL, exclude_special_tokens=False)
        assert off.baselines.ce_zero_ablation == pytest.approx(ce_zero_all, **TOL)
        assert off.baselines.ce_zero_ablation_special_kept == pytest.approx(ce_zero, **TOL)
        with attach(tiny, {LAYER: mxd}):
            assert off.results["mxd"].ce == pytest.approx(ce_by_hand(tiny(tokens), tokens).mean().item(), **TOL)


def test_energy_shares_and_massive_flags_equal_a_direct_computation(tiny, tokens):
    mxd = random_mxd(tiny.cfg.d_model, seed=8)
    mask = special_mask(tokens)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_mlp_out"))
    for exclude in (True, False):
        b = evaluate_many(tiny, {"m": {LAYER: mxd}, }, tokens, batch_size=5, progress=False,
                          special_ids=SPECIAL, exclude_special_tokens=exclude, massive_factor=1.5).baselines
        y = cache[f"blocks.{LAYER}.hook_mlp_out"].double()
        sq = y.pow(2).sum(-1)
        assert b.excluded_energy_share[LAYER] == pytest.approx(float(sq[mask].sum() / sq.sum()), **TOL)
        norms = y.norm(dim=-1)
        compared = norms[~mask] if exclude else norms.flatten()
        median = float(compared.float().median())
        assert b.median_norm[LAYER] == pytest.approx(median, rel=1e-5)
        assert b.massive_positions[LAYER] == int((compared / median > 1.5).sum())
        assert b.max_norm_ratio[LAYER] == pytest.approx(float(compared.max()) / median, rel=1e-5)
        assert b.excluded_norm_ratio[LAYER] == pytest.approx(float(norms[mask].mean()) / median, rel=1e-5)
        for row, pos, tok in b.massive_examples[LAYER]:
            assert norms[row, pos] / median > 1.5 and tokens[row, pos] == tok


def test_mean_outputs_skip_special_positions(tiny, tokens):
    means = mlp_output_means(tiny, tokens, [LAYER], batch_size=4, progress=False, exclude_ids=SPECIAL)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{LAYER}.hook_mlp_out")
    y = cache[f"blocks.{LAYER}.hook_mlp_out"]
    torch.testing.assert_close(means[LAYER], y[~special_mask(tokens)].mean(0), rtol=1e-5, atol=1e-6)


def test_probe_equals_evaluate_many(tiny, tokens):
    mxd = random_mxd(tiny.cfg.d_model, seed=9)
    probe = HeldoutProbe(tiny, tokens, [LAYER], batch_size=4, special_ids=SPECIAL)
    mxd.train()
    got = probe.measure({"m": {LAYER: mxd}})["m"]
    assert mxd.training  # left as found
    want = evaluate_many(tiny, {"m": {LAYER: mxd}}, tokens, batch_size=4, progress=False, special_ids=SPECIAL).results["m"]
    for key in ("ce", "delta_ce", "delta_ce_stderr", "ce_recovered", "nmse", "l0", "dead_fraction"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-6, abs=1e-9), key
    assert math.isnan(got.kl)


def test_ratio_interval():
    g = torch.Generator().manual_seed(0)
    den = (torch.rand(200, generator=g) + 0.5).tolist()
    num = [0.5 * d for d in den]
    ratio, lo, hi = ratio_interval(num, den)
    assert ratio == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # exact pairing
    noisy = [0.5 * d + float(e) for d, e in zip(den, torch.randn(200, generator=g) * 0.3)]
    ratio, lo, hi = ratio_interval(noisy, den)
    assert ratio == pytest.approx(sum(noisy) / sum(den))
    assert lo < ratio < hi
    # the slow, obvious bootstrap with the same resampled rows
    idx = torch.randint(0, 200, (2000, 200), generator=torch.Generator().manual_seed(0))
    boots = sorted(sum(noisy[i] for i in row) / sum(den[i] for i in row) for row in idx.tolist())
    assert lo == pytest.approx(float(torch.tensor(boots, dtype=torch.float64).quantile(0.025)), rel=1e-9)
    with pytest.raises(ValueError, match="same rows"):
        ratio_interval([1.0], [1.0, 2.0])


def test_stacked_candidates_equal_one_by_one(tiny, tokens):
    cands = {"mxd": {LAYER: random_mxd(tiny.cfg.d_model, seed=10)},
             "tc": {LAYER: random_transcoder(tiny.cfg.d_model, seed=11)},
             "stc": {LAYER: random_transcoder(tiny.cfg.d_model, seed=12, skip=True)}}
    kw = dict(batch_size=4, progress=False, special_ids=SPECIAL)
    one = evaluate_many(tiny, cands, tokens, **kw)
    for stack in (2, 3):
        stacked = evaluate_many(tiny, cands, tokens, stack_candidates=stack, **kw)
        for name in cands:
            a, b = one.results[name], stacked.results[name]
            for key in ("ce", "delta_ce", "delta_ce_stderr", "kl", "nmse", "l0"):
                assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-5, abs=1e-6), (stack, name, key)
