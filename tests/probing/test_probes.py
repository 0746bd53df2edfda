"""Sparse probes: F1 as scikit-learn computes it, a planted label found exactly, chance for
a unit that carries nothing, and mean-pooled features equal to a token-by-token reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score as sk_f1

from mxd_lens import MxD, MxDConfig, TopKTranscoder, TranscoderConfig
from mxd_lens.probing.features import module_source, neuron_source, pooled_features, random_source
from mxd_lens.probing.probes import f1_score, mean_diff_ranking, one_vs_rest, probe_binary, probe_task

LAYER = 3


@pytest.mark.parametrize(
    "y_true,y_pred",
    [
        ([1, 0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0, 1, 1]),
        ([1, 1, 1, 0], [0, 0, 0, 0]),  # nothing predicted positive
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # no positives at all: 0 (zero_division=0)
        ([0, 0, 1, 1, 1], [1, 1, 1, 1, 1]),
        (np.random.default_rng(0).integers(0, 2, 101).tolist(), np.random.default_rng(1).integers(0, 2, 101).tolist()),
    ],
)
def test_f1_equals_scikit_learn(y_true, y_pred):
    assert f1_score(y_true, y_pred) == pytest.approx(sk_f1(y_true, y_pred, zero_division=0), abs=1e-12)


def test_mean_diff_ranking_matches_the_slow_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 30))
    y = rng.integers(0, 2, 40)
    slow = sorted(range(30), key=lambda u: (-abs(x[y == 1, u].mean() - x[y == 0, u].mean()), u))
    assert mean_diff_ranking(x, y).tolist() == slow


def planted(n: int, n_units: int, unit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise features, except that `unit` is the label plus a little noise (sparse like a unit:
    zero for negatives)."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    x = np.abs(rng.normal(size=(n, n_units)))
    x[:, unit] = y * (1.0 + 0.1 * np.abs(rng.normal(size=n)))
    return x, y


def test_a_planted_unit_gives_f1_one_and_a_random_unit_chance():
    x_train, y_train = planted(200, 64, unit=17, seed=0)
    x_test, y_test = planted(400, 64, unit=17, seed=1)
    r = probe_binary(x_train, y_train, x_test, y_test, top_m=10, ks=(1, 2, 5, 20))
    assert r.best_unit == 17 and r.best_f1 == 1.0 and r.best_accuracy == 1.0
    assert r.selected_unit == 17 and r.selected_f1 == 1.0
    assert all(s["f1"] == 1.0 for s in r.k_sparse.values())
    for other in (3, 40):  # a unit that carries nothing, probed alone
        alone = probe_binary(x_train[:, [other]], y_train, x_test[:, [other]], y_test, top_m=1, ks=(1,))
        assert 0.5 - 0.1 < alone.best_accuracy < 0.5 + 0.1
        assert alone.k_sparse[1]["accuracy"] == alone.best_accuracy


def test_multiclass_becomes_balanced_one_vs_rest():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    idx, y = one_vs_rest(labels, 0, seed=0)
    assert y.sum() == 10 and (y == 0).sum() == 10
    negatives = labels[idx[y == 0]]
    assert sorted(np.bincount(negatives, minlength=4)[1:].tolist()) == [3, 3, 4]  # as even as 10 / 3 allows
    # four classes, each planted in its own unit: every one-vs-rest task is solved by one unit
    rng = np.random.default_rng(0)

    def data(n_per):
        ys = np.repeat(np.arange(4), n_per)
        xs = np.abs(rng.normal(size=(ys.size, 32))) * 0.3
        xs[np.arange(ys.size), 5 + 7 * ys] += 2.0
        return xs, ys

    xtr, ytr = data(30)
    xte, yte = data(15)
    res = probe_task("planted", "m", ["a", "b", "c", "d"], torch.tensor(xtr), ytr, torch.tensor(xte), yte, top_m=5)
    assert res.best_f1 == 1.0 and res.k_sparse[1]["f1"] == 1.0
    assert [res.per_class[c]["best_unit"] for c in "abcd"] == [5, 12, 19, 26]


@pytest.fixture(scope="module")
def modules(default_model):
    cfg = default_model.cfg
    torch.manual_seed(0)
    tc = TopKTranscoder(TranscoderConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_sae=256, k=8, layer=LAYER))
    mxd = MxD(MxDConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_hidden=cfg.d_mlp, n_experts=128, k=8,
                        act_fn=cfg.act_fn, glu=cfg.gated_mlp, layer=LAYER))  # fmt: skip
    return {"tc": tc, "mxd": mxd}


def test_pooled_features_equal_a_token_by_token_reference(default_model, modules):
    """Batched with padding, specials excluded == each text alone, positions 1.. averaged."""
    model = default_model
    texts = ["The whale swam on.", "Emma laughed at the idea of it all, and said so.", "Ja."]
    sources = {name: module_source(m) for name, m in modules.items()}
    sources.update({"neurons": neuron_source, "random": random_source(model.cfg.d_model, 16, seed=0)})
    pooled = pooled_features(model, LAYER, texts, sources, max_tokens=12, batch_size=2, progress=False)
    for i, text in enumerate(texts):
        ids = [0, *model.tokenizer(text, add_special_tokens=False)["input_ids"]][:12]
        _, cache = model.run_with_cache(torch.tensor([ids]), stop_at_layer=LAYER + 1)
        x = cache[f"blocks.{LAYER}.ln2.hook_normalized"][0, 1:]  # position 0 is the separator
        expected = {name: m.encode(x, hooked=False).dense(m.n_units).mean(0) for name, m in modules.items()}
        expected["neurons"] = cache[f"blocks.{LAYER}.mlp.hook_post"][0, 1:].mean(0)
        expected["random"] = sources["random"](type("A", (), {"mlp_in": x})()).mean(0)
        for name, value in expected.items():
            torch.testing.assert_close(pooled[name][i], value, rtol=1e-4, atol=1e-5, msg=f"{name}, text {i}")
    assert pooled["tc"].shape == (3, 256) and pooled["mxd"].shape == (3, 128)


def test_an_saelens_sae_is_probed_through_its_own_encode(default_model):
    """A SAE-Lens TopK SAE on the MLP output: its units are `sae.encode` of the MLP output."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    model = default_model
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=model.cfg.d_model, d_sae=48, k=4, metadata=SAEMetadata(
        hook_name=f"blocks.{LAYER}.hook_mlp_out", model_name="SmolLM2-135M-Instruct")))
    with torch.no_grad():
        sae.W_enc.normal_()
    texts = ["The whale swam on.", "Emma laughed."]
    pooled = pooled_features(model, LAYER, texts, {"sae": module_source(sae)}, progress=False)["sae"]
    for i, text in enumerate(texts):
        ids = [0, *model.tokenizer(text, add_special_tokens=False)["input_ids"]]
        _, cache = model.run_with_cache(torch.tensor([ids]), stop_at_layer=LAYER + 1)
        expected = sae.encode(cache[f"blocks.{LAYER}.hook_mlp_out"][0, 1:]).mean(0)
        torch.testing.assert_close(pooled[i], expected, rtol=1e-4, atol=1e-5)
    assert pooled.abs().sum() > 0
