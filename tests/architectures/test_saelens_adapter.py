"""SAE-Lens SAEs and transcoders as mxd_lens modules (`saelens_adapter.SAELensModule`):
built with SAE-Lens's own classes on the default model, saved with SAE-Lens's
`save_model`, loaded back with `SAE.load_from_disk` and `mxd_lens.load`, then attached,
evaluated beside an MxD in one `evaluate_many` call, patched and inspected."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.transcoder import (
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from torch import nn
from torch.testing import assert_close

import mxd_lens
from mxd_lens import MxD, MxDConfig, attach
from mxd_lens.architectures.saelens_adapter import SAELensModule, as_module
from mxd_lens.model_io import capture_mlp_io

LAYER = 3
D_MODEL = 576
D_SAE = 256
MLP_IN = f"blocks.{LAYER}.ln2.hook_normalized"
MLP_OUT = f"blocks.{LAYER}.hook_mlp_out"
KINDS = ("jumprelu_tc", "skip_tc", "topk_sae")


def mlp_io(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real input and output of the MLP at LAYER."""
    with torch.no_grad(), capture_mlp_io(model, [LAYER]) as io:
        model(tokens, stop_at_layer=LAYER + 1)
    return io[LAYER]


def meta(hook_name: str, hook_name_out: str | None = None) -> SAEMetadata:
    return SAEMetadata(hook_name=hook_name, hook_name_out=hook_name_out, model_name="SmolLM2-135M-Instruct")


def scale_to_fire(sae: SAE, inputs: torch.Tensor, out_rms: float, fraction: float, seed: int) -> None:
    """Random weights that make about `fraction` of the latents fire on real inputs and an
    output of roughly the target's size (so the spliced model still works)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) / inputs.norm(dim=-1).mean())
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g) * out_rms / (fraction * D_SAE) ** 0.5)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.1 * out_rms)
        sae.b_enc.zero_()
        pre = sae.process_sae_in(inputs) @ sae.W_enc
        cut = pre.reshape(-1, D_SAE).quantile(1 - fraction, dim=0)
        if hasattr(sae, "threshold"):  # JumpReLU: the threshold does the cut
            sae.threshold.copy_(cut)
            sae.b_enc.copy_(0.1 * cut.abs())
        elif not hasattr(sae.cfg, "k"):  # ReLU: a negative bias does
            sae.b_enc.copy_(-cut)


@pytest.fixture(scope="session")
def saelens_saes(default_model, heldout_tokens, tmp_path_factory):
    """{kind: (SAE built here, its folder written by SAE-Lens's save_model)}."""
    x, y = mlp_io(default_model, heldout_tokens)
    rms = float(y.pow(2).mean().sqrt())
    jump = JumpReLUTranscoder(
        JumpReLUTranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, apply_b_dec_to_input=False,
                                 metadata=meta(MLP_IN, MLP_OUT))
    )  # fmt: skip
    skip = SkipTranscoder(
        SkipTranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, apply_b_dec_to_input=False,
                             metadata=meta(MLP_IN, MLP_OUT))
    )  # fmt: skip
    # b_dec subtracted from the input and decoder-norm rescaling: the adapter must not care
    topk = TopKSAE(
        TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=12, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True,
                      metadata=meta(MLP_OUT))
    )  # fmt: skip
    scale_to_fire(jump, x, rms, 0.05, seed=0)
    scale_to_fire(skip, x, rms, 0.05, seed=1)
    scale_to_fire(topk, y, rms, 12 / D_SAE, seed=2)
    with torch.no_grad():
        skip.W_skip.copy_(torch.randn(skip.W_skip.shape, generator=torch.Generator().manual_seed(3)) * 0.2 / D_MODEL**0.5)
    root = tmp_path_factory.mktemp("saelens")
    out = {}
    for kind, sae in zip(KINDS, (jump, skip, topk)):
        sae.eval()
        sae.save_model(root / kind)
        out[kind] = (sae, root / kind)
    return out


@pytest.fixture(scope="session")
def tiny_mxd() -> MxD:
    torch.manual_seed(0)
    mxd = MxD(MxDConfig(d_in=D_MODEL, d_out=D_MODEL, d_hidden=1536, n_experts=64, k=8, glu=True, act_fn="silu",
                        layer=LAYER))  # fmt: skip
    with torch.no_grad():
        mxd.W_out.normal_(0, 0.02)
    return mxd


def reference(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """SAE-Lens's own output."""
    with torch.no_grad():
        return sae(x)


def test_sites_and_config(saelens_saes):
    for kind, (sae, _) in saelens_saes.items():
        module = as_module(sae)
        assert isinstance(module, SAELensModule) and module.sae is sae
        assert module.cfg.layer == LAYER and module.n_units == D_SAE
        assert module.cfg.input_site == ("mlp_out" if kind == "topk_sae" else "mlp_in")
        assert not module.trainable
        assert module.architecture == f"sae_lens:{sae.cfg.architecture()}"
        assert module.n_params() == sum(p.numel() for p in sae.parameters())
        assert module.W_dec is sae.W_dec  # shared, not copied
        with pytest.raises(NotImplementedError, match="cannot be trained"):
            module.train_forward(torch.zeros(1, D_MODEL))
    assert as_module(saelens_saes["topk_sae"][0]).cfg.k == 12  # a TopK SAE's own k
    assert as_module(saelens_saes["jumprelu_tc"][0]).cfg.fixed_k is False


def test_reconstruction_is_saelens_forward(default_model, heldout_tokens, saelens_saes):
    x, y = mlp_io(default_model, heldout_tokens)
    for kind, (sae, folder) in saelens_saes.items():
        inp = y if kind == "topk_sae" else x
        ref = reference(sae, inp)
        with torch.no_grad():
            manual = sae.decode(sae.encode(inp))
            if kind == "skip_tc":  # SAE-Lens adds the skip term in forward, not in decode
                manual = manual + inp @ sae.W_skip.T
        assert torch.equal(manual, ref)
        fired = (sae.encode(inp) > 0).float().sum(-1).mean()
        assert 2 <= fired <= 0.5 * D_SAE, (kind, fired)
        for loaded in (as_module(SAE.load_from_disk(folder)), mxd_lens.load(folder)):
            assert isinstance(loaded, SAELensModule), kind
            with torch.no_grad():
                assert torch.equal(loaded.reconstruct(inp, hooked=False), ref), kind
                assert torch.equal(loaded.reconstruct(inp, hooked=True), ref), kind
        # attached: the model's MLP output is the SAE's output on the MLP's input / output
        module = as_module(sae)
        hooks = {h: f"blocks.{LAYER}.mlp.{h}" for h in ("hook_in", "hook_latent_pre", "hook_latent_acts")}
        with attach(default_model, {LAYER: module}), torch.no_grad():
            _, cache = default_model.run_with_cache(
                heldout_tokens, stop_at_layer=LAYER + 1, names_filter=[MLP_OUT, *hooks.values()]
            )
        assert_close(cache[hooks["hook_in"]], inp)
        assert_close(cache[MLP_OUT], ref, rtol=1e-5, atol=1e-5)
        # the pre-activation hook carries SAE-Lens's hook_sae_acts_pre, and activate() of it
        # gives the latents (TopK selection, decoder-norm rescaling, thresholds: SAE-Lens's code)
        with torch.no_grad():
            pre = module.pre_acts(inp)
            assert_close(pre, sae.process_sae_in(inp) @ sae.W_enc + sae.b_enc)
            assert_close(cache[hooks["hook_latent_pre"]], pre, rtol=1e-5, atol=1e-5)
            assert torch.equal(module.activate(pre), sae.encode(inp))
            assert_close(cache[hooks["hook_latent_acts"]], sae.encode(inp), rtol=1e-5, atol=1e-5)


def test_evaluate_many_beside_an_mxd(default_model, heldout_tokens, saelens_saes, tiny_mxd):
    from mxd_lens.evals import evaluate_many
    from mxd_lens.functional import squared_error_sums

    folders = {kind: folder for kind, (_, folder) in saelens_saes.items()}
    candidates = {
        "mxd": {LAYER: tiny_mxd},
        "jumprelu_tc": {LAYER: SAE.load_from_disk(folders["jumprelu_tc"])},  # raw SAE-Lens objects
        "topk_sae": {LAYER: SAE.load_from_disk(folders["topk_sae"])},
        "skip_tc": {LAYER: mxd_lens.load(folders["skip_tc"])},  # mxd_lens.load of a SAE-Lens folder
        "jumprelu_tc_load": {LAYER: mxd_lens.load(folders["jumprelu_tc"])},
    }
    # every position, as the direct references below (evaluate_many now leaves special ones out by default)
    report = evaluate_many(
        default_model, candidates, heldout_tokens, batch_size=8, progress=False, exclude_special_tokens=False
    )
    x, y = mlp_io(default_model, heldout_tokens)
    with torch.no_grad():
        direct = {"mxd": tiny_mxd.reconstruct(x, hooked=False)}
        for kind, (sae, _) in saelens_saes.items():
            direct[kind] = reference(sae, y if kind == "topk_sae" else x)
        direct["jumprelu_tc_load"] = direct["jumprelu_tc"]
    for name, y_hat in direct.items():
        err, energy = squared_error_sums(y_hat, y)
        r = report.results[name]
        assert r.nmse == pytest.approx(err / energy, rel=1e-6), name
        assert 0 < r.l0 <= D_SAE and r.ce > 0
    # the same SAE, however it arrived
    a, b = report.results["jumprelu_tc"], report.results["jumprelu_tc_load"]
    assert a.ce == pytest.approx(b.ce, rel=1e-6) and a.l0 == b.l0 and a.nmse == b.nmse
    # TopK: every token has exactly k active latents (all positive here)
    assert report.results["topk_sae"].l0 == pytest.approx(12, abs=0.5)


def test_patching_through_latents(default_model, saelens_saes):
    from mxd_lens.circuits import faithfulness_curve, ioi_task
    from mxd_lens.patching import activation_patch, attribution_patch

    task = ioi_task(default_model.tokenizer, 4)
    metric = task.metric()
    name = f"blocks.{LAYER}.mlp.hook_latent_acts"
    for kind in ("jumprelu_tc", "topk_sae"):
        sae = saelens_saes[kind][0]
        with attach(default_model, {LAYER: sae}, use_error_term=True):
            attr = attribution_patch(default_model, task.clean, task.corrupted, metric, LAYER)
            assert attr.shape == (task.clean.shape[1], D_SAE)
            # the top cells by attribution, measured by activation patching
            top = attr.abs().flatten().topk(4).indices
            cells = [(int(i) // D_SAE, int(i) % D_SAE) for i in top]
            positions = sorted({p for p, _ in cells})
            units = sorted({u for _, u in cells})
            patched = activation_patch(
                default_model, task.clean, task.corrupted, metric, LAYER, units=units, positions=positions
            )
            with torch.no_grad():
                corrupted_metric = float(metric(default_model(task.corrupted)))
                a_clean = default_model.run_with_cache(task.clean, stop_at_layer=LAYER + 1, names_filter=name)[1][name]
            for p, u in cells:
                effect = float(patched[positions.index(p), units.index(u)]) - corrupted_metric
                a = float(attr[p, u])
                assert effect * a > 0, (kind, p, u, effect, a)  # same direction
                assert effect == pytest.approx(a, rel=0.5, abs=1e-3), (kind, p, u, effect, a)

            # one cell against a hand-written hook
            p, u = cells[0]

            def hook(act, hook):
                act = act.clone()
                act[:, p, u] = a_clean[:, p, u]
                return act

            with torch.no_grad():
                ref = float(metric(default_model.run_with_hooks(task.corrupted, fwd_hooks=[(name, hook)])))
            assert float(patched[positions.index(p), units.index(u)]) == pytest.approx(ref, rel=1e-4, abs=1e-4)
            if kind == "jumprelu_tc":  # a faithfulness curve over its latents and the error nodes
                curve = faithfulness_curve(default_model, task.clean, task.corrupted, metric, LAYER, n_points=4)
                assert curve.label == "sae_lens:jumprelu_transcoder" and curve.n_params == as_module(sae).n_params()
                assert curve.fraction[0] == pytest.approx(0, abs=1e-3)
                assert curve.fraction[-1] == pytest.approx(1, abs=1e-3)  # every node clean: the clean MLP output


def test_dashboards_record_dense_latents(default_model, heldout_tokens, saelens_saes, tmp_path):
    from mxd_lens.circuits.experts import collect_activations, logit_effect, most_active_units, write_dashboard

    x, _ = mlp_io(default_model, heldout_tokens)
    sae = saelens_saes["jumprelu_tc"][0]
    with torch.no_grad():
        dense = sae.encode(x)
    with attach(default_model, {LAYER: sae}):
        acts = collect_activations(default_model, LAYER, heldout_tokens, progress=False)
        # every active latent of every token is recorded, with its value
        rebuilt = torch.zeros_like(dense).scatter_add(-1, acts.indices.long(), acts.values)
        assert_close(rebuilt, dense)
        unit = most_active_units(acts, 1)[0]
        effect = logit_effect(default_model, acts, unit, n_contexts=5)
        contexts = acts.top_contexts(unit, 5)
        mean_value = sum(c.value for c in contexts) / len(contexts)
        expected = (mean_value * sae.W_dec[unit]) @ default_model.W_U
        assert_close(effect.logits, expected.detach(), rtol=1e-3, atol=1e-4)
        page = write_dashboard(default_model, acts, unit, tmp_path / "unit.html", n_contexts=3)
        assert page.exists() and "sae_lens:jumprelu_transcoder" in page.read_text()
    # a smaller bound than the number of active latents keeps each token's strongest, and says so
    with attach(default_model, {LAYER: SAELensModule(sae, k=4)}):
        with pytest.warns(UserWarning, match="only the strongest k=4"):
            few = collect_activations(default_model, LAYER, heldout_tokens, progress=False)
    assert_close(few.values.sort(-1).values, dense.topk(4).values.sort(-1).values)


def test_save_move_and_error_term(default_model, heldout_tokens, saelens_saes, tmp_path):
    sae, _ = saelens_saes["skip_tc"]
    module = as_module(sae)
    loaded = mxd_lens.load(module.save(tmp_path / "skip"))
    assert isinstance(loaded, SAELensModule) and loaded.cfg == module.cfg
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.sae.state_dict()[name], p)
    x, _ = mlp_io(default_model, heldout_tokens)
    loaded.to(torch.float64)  # moves the SAE and keeps SAE-Lens's own dtype record in step
    assert loaded.sae.dtype == torch.float64 and loaded.cfg.dtype == "float64"
    with torch.no_grad():
        assert_close(loaded.reconstruct(x.double(), hooked=False).float(), reference(sae, x), rtol=1e-4, atol=1e-4)
    # with the error term the model's outputs are unchanged
    with torch.no_grad():
        base = default_model(heldout_tokens)
        with attach(default_model, {LAYER: sae}, use_error_term=True):
            spliced = default_model(heldout_tokens)
    assert_close(spliced, base, rtol=1e-4, atol=1e-4)


def test_unservable_combinations_say_why(default_model):
    resid = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=32, metadata=meta(f"blocks.{LAYER}.hook_resid_pre")))
    with pytest.raises(ValueError, match=r"hook_resid_pre.*hook_mlp_out"):
        SAELensModule(resid)
    with pytest.raises(ValueError, match=r"layer 3: .*hook_resid_pre"):
        with attach(default_model, {LAYER: resid}):
            pass
    mid = SkipTranscoder(
        SkipTranscoderConfig(d_in=D_MODEL, d_sae=32, d_out=D_MODEL, apply_b_dec_to_input=False,
                             metadata=meta(f"blocks.{LAYER}.hook_resid_mid", MLP_OUT))
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"hook_resid_mid.*not one MLP's"):
        SAELensModule(mid)
    nowhere = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=32))
    with pytest.raises(ValueError, match="no metadata.hook_name"):
        SAELensModule(nowhere)
    topk = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=32, k=4, metadata=meta(MLP_OUT)))
    with pytest.raises(ValueError, match="contradicts"):
        SAELensModule(topk, k=5)
    with pytest.raises(ValueError, match="expected an mxd_lens module.*Linear"):
        as_module(nn.Linear(2, 2))
    other_layer = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=32, metadata=meta("blocks.4.hook_mlp_out")))
    assert SAELensModule(other_layer).cfg.layer == 4  # the layer comes from the hook name


def _other_architectures() -> list[SAE]:
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE, MatchingPursuitSAEConfig

    m = meta("blocks.1.hook_mlp_out")
    torch.manual_seed(0)
    return [
        GatedSAE(GatedSAEConfig(d_in=16, d_sae=32, metadata=m)),
        MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=16, d_sae=32, residual_threshold=0.1, metadata=m)),
        JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=32, metadata=m, normalize_activations="layer_norm")),
    ]


@pytest.mark.parametrize("sae", _other_architectures(), ids=lambda s: s.cfg.architecture())
def test_other_architectures_are_their_own_forward(sae):
    """Gated (the gate's pre-activations are not hook_sae_acts_pre's), matching pursuit (no
    pre-activations) and an SAE normalising its input at run time."""
    module = SAELensModule(sae)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(module.reconstruct(x), sae(x))
        acts = sae.encode(x)
        assert torch.equal(module.activate(module.pre_acts(x)), acts)  # what collect_activations uses
        # a unit's contribution is what it adds to the output (linear decoder, any normalisation)
        flat, unit = x.reshape(-1, 16), 5
        value = torch.linspace(0.5, 2.0, len(flat))
        base = sae.encode(flat)
        with_unit = base.clone()
        with_unit[:, unit] += value
        sae.process_sae_in(flat)  # the run-time normalisation state decode reads
        on = sae.decode(with_unit)
        sae.process_sae_in(flat)
        expected = on - sae.decode(base)
        assert_close(module.unit_contribution(flat, unit, value), expected, rtol=1e-5, atol=1e-5)


def test_a_forward_of_its_own_is_refused():
    from sae_lens.saes.temporal_sae import TemporalSAE, TemporalSAEConfig

    sae = TemporalSAE(TemporalSAEConfig(d_in=16, d_sae=32, n_heads=2, bottleneck_factor=4, metadata=meta(MLP_OUT)))
    with pytest.raises(ValueError, match="TemporalSAE.*defines its own forward"):
        as_module(sae)


def test_a_transcoder_from_ln2_is_refused_on_an_unfolded_model():
    """With fold_ln=False, blocks.L.ln2.hook_normalized fires before ln2's weight: an
    SAE-Lens transcoder trained there would be fed the (weighted) MLP input instead."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    def tiny(norm: str) -> HookedTransformer:
        return HookedTransformer(HookedTransformerConfig(
            n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, d_vocab=40, act_fn="silu",
            normalization_type=norm, gated_mlp=True,
        ))

    tc = Transcoder(TranscoderConfig(
        d_in=16, d_sae=24, d_out=16, apply_b_dec_to_input=False,
        metadata=meta("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
    ))
    with pytest.raises(ValueError, match=r"fires before ln2's weight .*fold_ln=True"):
        with attach(tiny("RMS"), {1: tc}):
            pass
    folded = tiny("RMSPre")  # what fold_ln=True gives: the hook is the MLP input there
    with attach(folded, {1: tc}):
        folded(torch.zeros(1, 4, dtype=torch.long))
