"""The evaluator's per-unit firing rates (what a run writes to sparsity.safetensors) equal
the separate firing-rate pass `metadata.measure_firing_rates`, the slow reference."""

from __future__ import annotations

import pytest
import torch

from mxd_lens.evals import evaluate_many
from mxd_lens.metadata import measure_firing_rates
from tests.test_evals import random_mxd, random_transcoder, tiny_model


@pytest.mark.parametrize("stack", [1, 2])
def test_evaluation_firing_rates_equal_the_separate_pass(stack):
    model = tiny_model(seed=5)
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(1, model.cfg.d_vocab, (5, 12), generator=g)
    # (a tokenizer-less model has no special ids: both count every position; the exclusion
    # itself is held to hand computations in test_special_positions.py)
    modules = {"mxd": random_mxd(16, seed=1, n_experts=23, k=3), "tc": random_transcoder(16, seed=2, d_sae=31, k=4)}
    for m in modules.values():
        m.cfg.layer = 1
    report = evaluate_many(model, {n: {1: m} for n, m in modules.items()}, tokens, batch_size=2, progress=False,
                           mean_ablation=False, stack_candidates=stack)
    reference = measure_firing_rates(model, modules, tokens, batch_size=3, progress=False)
    for name, rates in reference.items():
        got = report.results[name].firing_rates[1]
        assert got.shape == (modules[name].n_units,)
        assert 0 < float(got.sum()) and float((got == 0).sum()) > 0  # some units fire, some never do
        torch.testing.assert_close(got, rates, rtol=0, atol=1e-7)
        assert float(got.sum()) == pytest.approx(report.results[name].l0, rel=1e-6)  # rates sum to L0
        assert "firing_rates" not in report.results[name].to_dict()
