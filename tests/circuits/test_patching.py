"""activation_patch and attribution_patch against hand-written run_with_hooks references,
on a tiny random HookedTransformer (mechanics) with MxD experts and transcoder latents."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mxd_lens import MxD, MxDConfig, TopKTranscoder, TranscoderConfig, attach
from mxd_lens.patching import activation_patch, attribution_patch, node_attributions

LAYER = 1
D_MODEL = 32


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, d_mlp=64, n_ctx=16, d_head=8, n_heads=4, d_vocab=50,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    return HookedTransformer(cfg)


def make_mxd() -> MxD:
    torch.manual_seed(1)
    m = MxD(MxDConfig(d_in=D_MODEL, d_out=D_MODEL, d_hidden=48, n_experts=24, k=4, act_fn="gelu"))
    with torch.no_grad():
        m.W_out.normal_(0, 0.3)  # D = 0 at init would make every expert silent
        m.b_enc.normal_(0, 0.5)
    return m


def make_transcoder() -> TopKTranscoder:
    torch.manual_seed(2)
    t = TopKTranscoder(TranscoderConfig(d_in=D_MODEL, d_out=D_MODEL, d_sae=40, k=5))
    with torch.no_grad():
        t.W_dec.mul_(10.0)
    return t


MODULES = {"mxd": make_mxd, "transcoder": make_transcoder}


@pytest.fixture(scope="module")
def tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 50, (3, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % 50  # positions 0, 1 identical: exact no-ops
    good = torch.randint(0, 50, (3,), generator=g)
    bad = torch.randint(0, 50, (3,), generator=g)
    return clean, corrupted, good, bad


def logit_diff(good: torch.Tensor, bad: torch.Tensor):
    rows = torch.arange(len(good))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last[rows, good] - last[rows, bad]).mean()

    return metric


def acts_of(model, site_name: str, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[site_name])
    return cache[site_name]


def reference_cell(model, name, corrupted, clean_acts, metric, p, u) -> float:
    """Full forward of the corrupted tokens with one cell set to its clean value."""

    def hook(act, hook):
        act = act.clone()
        act[:, p, u] = clean_acts[:, p, u]
        return act

    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])))


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("use_error_term", [False, True])
def test_activation_patch_matches_hand_written_runs(tiny_model, tokens, kind, use_error_term):
    clean, corrupted, good, bad = tokens
    metric = logit_diff(good, bad)
    module = MODULES[kind]()
    name = f"blocks.{LAYER}.mlp.{module.acts_hook_name}"
    with attach(tiny_model, {LAYER: module}, use_error_term=use_error_term):
        a_clean = acts_of(tiny_model, name, clean)
        a_corr = acts_of(tiny_model, name, corrupted)
        result = activation_patch(tiny_model, clean, corrupted, metric, LAYER)
        assert result.shape == (7, module.n_units)
        with torch.no_grad():
            base = float(metric(tiny_model.run_with_hooks(corrupted, fwd_hooks=[(name, lambda a, hook: a)])))
        # cells that differ, including units off in every corrupted row and on in a clean one
        differs = (a_clean != a_corr).any(0)
        switched_on = ((a_corr == 0).all(0) & (a_clean > 0).any(0)).nonzero().tolist()
        assert switched_on, "the test prompts should switch some unit on"
        checks = switched_on[:4] + differs.nonzero().tolist()[:: max(1, int(differs.sum()) // 6)][:6]
        for p, u in checks:
            ref = reference_cell(tiny_model, name, corrupted, a_clean, metric, p, u)
            assert result[p, u].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
        # some patched cells do move the metric, and the no-op cells are the baseline
        assert (result[differs] - base).abs().max() > 1e-4
        assert torch.allclose(result[~differs], torch.tensor(base), atol=1e-6)
        assert not differs[:2].any()  # before the corrupted token nothing differs


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("use_error_term", [False, True])
def test_attribution_patch_matches_gradient_by_hand(tiny_model, tokens, kind, use_error_term):
    clean, corrupted, good, bad = tokens
    metric = logit_diff(good, bad)
    module = MODULES[kind]()
    name = f"blocks.{LAYER}.mlp.{module.acts_hook_name}"
    with attach(tiny_model, {LAYER: module}, use_error_term=use_error_term):
        a_clean = acts_of(tiny_model, name, clean)
        saved = {}

        def keep(act, hook):
            act.retain_grad()
            saved["a"] = act

        value = metric(tiny_model.run_with_hooks(corrupted, fwd_hooks=[(name, keep)]))
        value.backward()
        expected = ((a_clean - saved["a"].detach()) * saved["a"].grad).sum(0)
        tiny_model.zero_grad(set_to_none=True)
        module.zero_grad(set_to_none=True)
        got = attribution_patch(tiny_model, clean, corrupted, metric, LAYER)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # units off in the corrupted run and on in the clean one get a real score
    on = (saved["a"].detach() == 0).all(0) & (a_clean > 0).any(0)
    assert on.any() and got[on].abs().max() > 0


def test_error_and_dense_nodes_complete_the_layer(tiny_model, tokens):
    """With units, error and dense nodes all patched, the run is the corrupted run with the
    clean MLP output; attribution of error nodes uses the error's own gradient."""
    from mxd_lens.patching import capture, find_site, patched_metrics

    clean, corrupted, good, bad = tokens
    metric = logit_diff(good, bad)
    module = make_mxd()
    with attach(tiny_model, {LAYER: module}, use_error_term=True):
        site = find_site(tiny_model, LAYER)
        c, k = capture(tiny_model, clean, site), capture(tiny_model, corrupted, site)
        pos = clean.shape[1]
        masks = {
            "unit": torch.ones(1, pos, module.n_units, dtype=torch.bool),
            "error": torch.ones(1, pos, 1, dtype=torch.bool),
            "dense": torch.ones(1, pos, 1, dtype=torch.bool),
        }
        full = patched_metrics(tiny_model, site, k, c, masks, metric)[0]
        attr = node_attributions(tiny_model, clean, corrupted, metric, LAYER)
    with torch.no_grad():
        mlp_clean = tiny_model.run_with_cache(clean, names_filter=f"blocks.{LAYER}.hook_mlp_out")[1][
            f"blocks.{LAYER}.hook_mlp_out"
        ]
        ref = metric(
            tiny_model.run_with_hooks(
                corrupted, fwd_hooks=[(f"blocks.{LAYER}.hook_mlp_out", lambda a, hook: mlp_clean)]
            )
        )
    assert full.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    assert attr.error is not None and attr.dense is not None
    assert attr.error[:2].abs().max() == 0 and attr.error[2:].abs().max() > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, c, k, f: activation_patch(m, c, k, f, LAYER, positions=[0, 7]), "positions"),
        (lambda m, c, k, f: activation_patch(m, c, k, f, LAYER, units=[24]), "n_units=24"),
        (lambda m, c, k, f: activation_patch(m, c, k[:, :-1], f, LAYER), "shape"),
        (lambda m, c, k, f: attribution_patch(m, c, k[:2], f, LAYER), "shape"),
        (lambda m, c, k, f: activation_patch(m, c, k, f, 0), "no mxd_lens replacement is attached at layer 0"),
        (lambda m, c, k, f: attribution_patch(m, c, k, f, 0), "no mxd_lens replacement is attached at layer 0"),
        (lambda m, c, k, f: activation_patch(m, c, k, f, 5), "layer=5"),
    ],
)
def test_bad_input_raises_value_error(tiny_model, tokens, call, message):
    clean, corrupted, good, bad = tokens
    with attach(tiny_model, {LAYER: make_mxd()}):
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            call(tiny_model, clean, corrupted, logit_diff(good, bad))


def test_patched_runs_keep_shortformer_positions(tokens):
    """Patched runs resume at the layer with the positional embedding a full forward pass
    gives later blocks (a shortformer model adds it to every attention input): each cell
    and each attribution equals a full forward of the corrupted tokens."""
    clean, corrupted, good, bad = tokens
    metric = logit_diff(good, bad)
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=3, d_model=D_MODEL, d_mlp=64, n_ctx=16, d_head=8, n_heads=4, d_vocab=50,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="shortformer", seed=0,
    ))  # fmt: skip
    module = make_transcoder()
    name = f"blocks.{LAYER}.mlp.{module.acts_hook_name}"
    with attach(model, {LAYER: module}):
        a_clean, a_corr = acts_of(model, name, clean), acts_of(model, name, corrupted)
        result = activation_patch(model, clean, corrupted, metric, LAYER, positions=[2, 6])
        differs = (a_clean[:, [2, 6]] != a_corr[:, [2, 6]]).any(0).nonzero().tolist()
        assert len(differs) >= 3
        for i, u in differs[:4]:
            ref = reference_cell(model, name, corrupted, a_clean, metric, [2, 6][i], u)
            assert result[i, u].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
        saved = {}

        def keep(act, hook):
            act.retain_grad()
            saved["a"] = act

        metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, keep)])).backward()
        expected = ((a_clean - saved["a"].detach()) * saved["a"].grad).sum(0)
        model.zero_grad(set_to_none=True)
        module.zero_grad(set_to_none=True)
        attr = node_attributions(model, clean, corrupted, metric, LAYER)
    torch.testing.assert_close(attr.unit, expected, rtol=1e-4, atol=1e-6)
    assert set(attr.nodes) == {"unit"} and attr.error is None and attr.dense is None


def test_node_kinds_follow_the_module(tiny_model, tokens):
    """Attribution.nodes holds exactly the attached module's node kinds (units, the error
    term when attached with it, the architecture's extra_nodes), in that order."""
    from mxd_lens.patching import find_site

    clean, corrupted, good, bad = tokens
    for make, error in ((make_mxd, True), (make_mxd, False), (make_transcoder, True)):
        module = make()
        with attach(tiny_model, {LAYER: module}, use_error_term=error):
            attr = node_attributions(tiny_model, clean, corrupted, logit_diff(good, bad), LAYER)
            kinds = list(find_site(tiny_model, LAYER).node_hooks())
        assert list(attr.nodes) == kinds == ["unit"] + ["error"] * error + list(module.extra_nodes)
        assert attr.unit.shape == (clean.shape[1], module.n_units)
        for kind in kinds[1:]:
            assert attr.nodes[kind].shape == (clean.shape[1],)
        assert (attr.error is not None) == error and (attr.dense is not None) == ("dense" in module.extra_nodes)


def test_given_captures_are_reused_and_checked(tiny_model, tokens):
    """A capture passed in is used as is (no second run of the prefix), and one of another
    layer or batch is refused."""
    from mxd_lens.patching import capture, find_site

    clean, corrupted, good, bad = tokens
    metric = logit_diff(good, bad)
    with attach(tiny_model, {LAYER: make_mxd()}, use_error_term=True):
        site = find_site(tiny_model, LAYER)
        c, k = capture(tiny_model, clean, site), capture(tiny_model, corrupted, site)
        embeds = []
        handle = tiny_model.embed.register_forward_hook(lambda m, a, out: embeds.append(1))
        try:
            reused = activation_patch(tiny_model, clean, corrupted, metric, LAYER, positions=[2], clean=c, corrupted=k)
            attr = node_attributions(tiny_model, clean, corrupted, metric, LAYER, clean=c, corrupted=k)
            assert not embeds  # neither ran the prefix again
            fresh = activation_patch(tiny_model, clean, corrupted, metric, LAYER, positions=[2])
            assert len(embeds) == 2
        finally:
            handle.remove()
        torch.testing.assert_close(reused, fresh)
        torch.testing.assert_close(attr.unit, attribution_patch(tiny_model, clean, corrupted, metric, LAYER))
        with pytest.raises(ValueError, match="corrupted capture holds"):
            activation_patch(tiny_model, clean, corrupted, metric, LAYER, clean=c, corrupted=capture(tiny_model, corrupted[:2], site))
    with attach(tiny_model, {LAYER: make_mxd()}, use_error_term=False):
        with pytest.raises(ValueError, match="node kinds"):
            node_attributions(tiny_model, clean, corrupted, metric, LAYER, clean=c, corrupted=k)
