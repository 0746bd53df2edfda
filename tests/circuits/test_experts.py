"""Expert inspection and steering mechanics on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from mxd_lens import attach
from mxd_lens.experts import collect_activations, logit_effect, most_active_units, write_dashboard
from mxd_lens.steering import steer
from tests.circuits.test_patching import LAYER, make_mxd, make_transcoder, tiny_model  # noqa: F401


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return torch.randint(0, 50, (9, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("make", [make_mxd, make_transcoder], ids=["mxd", "transcoder"])
def test_sparse_record_matches_dense_activations(tiny_model, corpus, make):
    module = make()
    name = f"blocks.{LAYER}.mlp.{module.acts_hook_name}"
    with attach(tiny_model, {LAYER: module}):
        acts = collect_activations(tiny_model, LAYER, corpus, batch_rows=4, progress=False)
        dense = tiny_model.run_with_cache(corpus, names_filter=name)[1][name]
    k = module.cfg.k
    assert acts.indices.shape == acts.values.shape == (9, 12, k)  # sparse: K per token, never n_units
    rebuilt = torch.zeros_like(dense).scatter(-1, acts.indices.long(), acts.values)
    torch.testing.assert_close(rebuilt, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acts.frequency(), (dense > 0).float().mean((0, 1)))
    unit = most_active_units(acts, 1)[0]
    top = acts.top_contexts(unit, 5)
    assert [c.value for c in top] == sorted((c.value for c in top), reverse=True)
    assert top[0].value == pytest.approx(dense[..., unit].max().item())
    assert dense[top[0].row, top[0].pos, unit].item() == pytest.approx(top[0].value)
    with pytest.raises(ValueError, match=f"unit={module.n_units}"):
        acts.top_contexts(module.n_units)


@pytest.mark.parametrize("make", [make_mxd, make_transcoder], ids=["mxd", "transcoder"])
def test_logit_effect_matches_explicit_expert_map(tiny_model, corpus, make):
    module = make()
    with attach(tiny_model, {LAYER: module}):
        acts = collect_activations(tiny_model, LAYER, corpus, progress=False)
        unit = most_active_units(acts, 1)[0]
        effect = logit_effect(tiny_model, acts, unit, n_contexts=6)
        _, cache = tiny_model.run_with_cache(corpus, names_filter=f"blocks.{LAYER}.mlp.hook_in")
    x_all = cache[f"blocks.{LAYER}.mlp.hook_in"]
    terms = []
    with torch.no_grad():
        for c in acts.top_contexts(unit, 6):
            x = x_all[c.row, c.pos]
            if module.architecture == "mxd":  # the full-rank expert W_n = D diag(c_n) acting on z
                terms.append(c.value * (module.hidden(x) @ module.expert_weight(unit)))
            else:
                terms.append(c.value * module.W_dec[unit])
        ref = torch.stack(terms).mean(0) @ tiny_model.W_U
    assert effect.n_contexts == 6
    torch.testing.assert_close(effect.logits, ref, rtol=1e-4, atol=1e-5)


def test_dashboard_is_standalone_html(tiny_model, corpus, tmp_path):
    module = make_mxd()
    with attach(tiny_model, {LAYER: module}):
        acts = collect_activations(tiny_model, LAYER, corpus, progress=False)
        unit = most_active_units(acts, 1)[0]
        path = write_dashboard(tiny_model, acts, unit, tmp_path / "expert.html", n_contexts=4)
    text = path.read_text()
    assert "plotly" in text.lower() and f"unit {unit}" in text and "activating contexts" in text
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no temp left


@pytest.mark.parametrize("make", [make_mxd, make_transcoder], ids=["mxd", "transcoder"])
@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steer_edits_exactly_the_chosen_units(tiny_model, corpus, make, mode):
    module = make()
    name = f"blocks.{LAYER}.mlp.{module.acts_hook_name}"
    units = {1: 3.0, 4: -0.5}
    with attach(tiny_model, {LAYER: module}):
        base_logits, base = tiny_model.run_with_cache(corpus[:2], names_filter=name)
        with steer(tiny_model, LAYER, units, mode=mode):
            logits, cache = tiny_model.run_with_cache(corpus[:2], names_filter=name)
            generated = tiny_model.generate(corpus[:1, :4], max_new_tokens=3, verbose=False, do_sample=False, stop_at_eos=False)
        after = tiny_model(corpus[:2])
    expected = base[name].clone()
    for u, v in units.items():
        expected[..., u] = expected[..., u] + v if mode == "add" else v
    torch.testing.assert_close(cache[name], expected)
    assert not torch.allclose(logits, base_logits)
    torch.testing.assert_close(after, base_logits)  # hooks gone after the context
    assert generated.shape == (1, 7)


def test_steer_rejects_bad_input(tiny_model):
    with attach(tiny_model, {LAYER: make_mxd()}):
        with pytest.raises(ValueError, match=r"units \[24\] out of range"):
            with steer(tiny_model, LAYER, {24: 1.0}):
                pass
        with pytest.raises(ValueError, match="mode='scale'"):
            with steer(tiny_model, LAYER, {0: 1.0}, mode="scale"):
                pass
    with pytest.raises(ValueError, match="no mxd_lens replacement is attached at layer 1"):
        with steer(tiny_model, LAYER, {0: 1.0}):
            pass
