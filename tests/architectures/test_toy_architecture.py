"""A new architecture defined entirely in this file goes through the whole pipeline.

`GainTranscoder` is a TopK transcoder whose mixture is scaled, token by token, by a
learned gate:

    a = TopK_k(ReLU(W_enc^T x + b_enc))
    g = max_gain * sigmoid(W_gate^T x + b_gate)     one scalar per token (its context)
    y = g * (W_dec^T a) + b_dec

It has its own config field (`max_gain`), its own parameters (W_gate, b_gate), its own
context, mixture and output (`context`, `mix_output`, `combine`), an extra graph node
(the gate, `hook_gain`), its own training hook (unit-norm decoder rows after each step),
its own metric (`gain_bias`) and its own SAE-Lens view, made with the same mixin pattern
as the package's architectures. Registering it with `mxd_lens.registry` is all it takes:
training, evaluation, saving and loading, SAE-Lens's HookedSAETransformer and patching
then work without touching any package file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY
from torch import Tensor, nn
from torch.testing import assert_close
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

import mxd_lens
from mxd_lens import attach, registry
from mxd_lens.architectures.base import (
    HookFn,
    Replacement,
    ReplacementConfig,
    ReplacementSAE,
    ReplacementSAEConfig,
    Sizes,
    UnitMath,
)
from mxd_lens.evals import evaluate_many
from mxd_lens.functional import linear_init_, nmse, squared_error_sums, transcoder_combine, unit_norm_rows_
from mxd_lens.model_io import capture_mlp_io
from mxd_lens.patching import activation_patch, attribution_patch, capture, find_site, node_attributions, patched_metrics
from mxd_lens.saelens import hooked_sae_transformer
from mxd_lens.training import TrainerConfig, fit
from mxd_lens.training.config import ActivationConfig

NAME = "toy_gain_transcoder"
METHOD = "gain_transcoder"
D_MODEL, LAYER, N_UNITS, K = 32, 1, 40, 4


# --- the architecture: config, math, module, SAE-Lens view -----------------------------------
@dataclass(kw_only=True)
class GainConfig(ReplacementConfig):
    """A TopK transcoder whose mixture is scaled by a learned per-token gate."""

    d_sae: int
    """Number of latents."""
    max_gain: float = 2.0
    """The gate's largest value: g = max_gain * sigmoid(W_gate^T x + b_gate)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.max_gain, (int, float)) and not isinstance(self.max_gain, bool) and self.max_gain > 0):
            raise ValueError(f"max_gain={self.max_gain!r} must be a positive number")


class GainMath(UnitMath):
    """The math shared by the module and its SAE-Lens view (same parameter names)."""

    W_gate: Tensor
    b_gate: Tensor
    gain_hook_name: ClassVar[str]
    """The hook point on the gate g (`hook_gain` on the module, `hook_toy_gain` in SAE-Lens)."""
    context_doc: ClassVar[str | None] = "the per-token gain g(x)"

    def context(self, x: Float[Tensor, "... d_in"], h: HookFn) -> Float[Tensor, "... 1"]:
        gain = self.cfg.max_gain * torch.sigmoid(x @ self.W_gate + self.b_gate)
        return h(getattr(self, self.gain_hook_name), gain)

    def mix_output(self, mix: Tensor, context: Tensor | None) -> Tensor:
        return context * mix

    def combine(self, mix: Tensor, context: Tensor | None) -> Tensor:
        return transcoder_combine(self.mix_output(mix, context), self.b_dec, None)


class GainTranscoder(GainMath, Replacement):
    """The module. Hooks: `hook_in`, `hook_latent_pre`, `hook_latent_acts`, `hook_gain`,
    `hook_error`, `hook_out`."""

    cfg: GainConfig
    config_class = GainConfig
    architecture = NAME
    gain_hook_name = "hook_gain"
    extra_nodes = {"gain": "hook_gain"}

    def __init__(self, cfg: GainConfig) -> None:
        super().__init__(cfg)
        kw = self._param_kwargs()
        self.W_gate = nn.Parameter(torch.empty(cfg.d_in, 1, **kw))
        self.b_gate = nn.Parameter(torch.empty(1, **kw))
        self.hook_gain = HookPoint()
        self._finish_init()

    @classmethod
    def build(cls, sizes: Sizes, k: int, **common: Any) -> "GainTranscoder":
        return cls(GainConfig(d_in=sizes.d_model, d_out=sizes.d_model, k=k, d_sae=sizes.width, **common))

    def reset_parameters(self) -> None:
        linear_init_(self.W_enc, self.cfg.d_in)
        linear_init_(self.W_gate, self.cfg.d_in)
        with torch.no_grad():
            self.b_enc.zero_()
            self.b_gate.zero_()
            self.W_dec.normal_()
            self.b_dec.zero_()
        unit_norm_rows_(self.W_dec)

    def after_optimizer_step(self) -> None:
        unit_norm_rows_(self.W_dec)  # the gate carries the scale, the rows only a direction

    def metrics(self) -> dict[str, float]:
        return {"gain_bias": float(self.cfg.max_gain * torch.sigmoid(self.b_gate.detach().float()))}


@dataclass(kw_only=True)
class GainSAEConfig(ReplacementSAEConfig):
    """SAE-Lens config of a GainTranscoder."""

    max_gain: float = 2.0
    """The gate's largest value."""

    module_class: ClassVar[type[Replacement]] = GainTranscoder


class GainSAE(GainMath, ReplacementSAE):
    """A GainTranscoder as an SAE-Lens SAE; SAE-Lens's hooks plus `hook_toy_gain`."""

    gain_hook_name = "hook_toy_gain"
    W_gate: nn.Parameter
    b_gate: nn.Parameter

    def __init__(self, cfg: GainSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self.hook_toy_gain = HookPoint()
        self.setup()


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arch():
    entry = registry.register(
        registry.Architecture(
            name=NAME, module=GainTranscoder, sae=GainSAE, sae_config=GainSAEConfig,
            method=METHOD, label="gain transcoder (toy)", color="#8c564b",
        )
    )
    yield entry
    registry.unregister(NAME)
    assert registry.find(NAME) is None and registry.find(METHOD) is None
    assert NAME not in SAE_CLASS_REGISTRY


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, d_mlp=64, n_ctx=16, d_head=8, n_heads=4, d_vocab=61,
        act_fn="silu", gated_mlp=True, normalization_type="RMSPre", seed=0,
    )
    return HookedTransformer(cfg).eval()


def tokens(rows: int, seed: int) -> Tensor:
    return torch.randint(0, 61, (rows, 16), generator=torch.Generator().manual_seed(seed))


def mlp_io(model: HookedTransformer, toks: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad(), capture_mlp_io(model, [LAYER]) as io:
        model(toks, stop_at_layer=LAYER + 1)
    x, y = io[LAYER]
    return x.reshape(-1, D_MODEL), y.reshape(-1, D_MODEL)


@pytest.fixture(scope="module")
def trained(arch, model) -> tuple[GainTranscoder, dict]:
    """The module after a short `fit` (and what its loss was before)."""
    torch.manual_seed(0)
    sizes = Sizes(d_model=D_MODEL, width=N_UNITS, d_hidden=64, glu=True, act_fn="silu")
    module = arch.module_class.build(sizes, K, max_gain=3.0)
    assert type(module) is GainTranscoder and module.cfg.max_gain == 3.0
    held_x, held_y = mlp_io(model, tokens(8, seed=2))
    with torch.no_grad():
        before = float(nmse(module.reconstruct(held_x, hooked=False) + held_y.mean(0), held_y))
    gate_before = module.W_gate.detach().clone()
    cfg = TrainerConfig(
        train_tokens=40 * 256, batch_size=256, lr=3e-3, warmup_steps=5, log_every=10, seed=0,
        autocast=None, progress=False, aux_tokens=None, dead_tokens=512,
        activations=ActivationConfig(model_batch_rows=32, buffer_tokens=2048),
    )
    summary = fit(model, {"toy": (LAYER, module)}, tokens(64, seed=1), cfg, eval_tokens=tokens(8, seed=2))["toy"]
    return module, {"before": before, "gate_before": gate_before, "summary": summary, "held": (held_x, held_y)}


# --- training ----------------------------------------------------------------------------------
def test_fit_trains_it(trained) -> None:
    module, info = trained
    summary = info["summary"]
    assert summary.architecture == NAME and summary.n_units == N_UNITS and summary.k == K and summary.steps == 40
    # The held-out NMSE fell well below the untrained module's (even given the mean as bias).
    assert summary.heldout_nmse < 0.7 * info["before"]
    train_nmse = [h["nmse"] for h in summary.history if "nmse" in h]
    assert train_nmse[-1] < train_nmse[0]
    # fit's number is the module's own reconstruction of the held-out MLP outputs.
    held_x, held_y = info["held"]
    with torch.no_grad():
        err, energy = squared_error_sums(module.reconstruct(held_x, hooked=False), held_y)
    assert summary.heldout_nmse == pytest.approx(err / energy, rel=1e-5)
    # The architecture's own pieces took part: the gate learned, the training hook ran.
    assert not torch.equal(module.W_gate.detach(), info["gate_before"])
    assert_close(module.W_dec.norm(dim=-1), torch.ones(N_UNITS), atol=1e-5, rtol=0)
    assert module.cfg.layer == LAYER and module.cfg.hook_name == f"blocks.{LAYER}.ln2.hook_normalized"


# --- evaluation --------------------------------------------------------------------------------
def test_evaluate_many(trained, model) -> None:
    module, _ = trained
    toks = tokens(4, seed=3)
    report = evaluate_many(model, {"toy": {LAYER: module}}, toks, batch_size=2, progress=False)
    result = report.results["toy"]
    x, y = mlp_io(model, toks)
    with torch.no_grad():
        err, energy = squared_error_sums(module.reconstruct(x, hooked=False), y)
        acts = module.encode(x, hooked=False).dense(N_UNITS)
        with attach(model, {LAYER: module}):
            ce = float(model(toks, return_type="loss"))
        ce_clean = float(model(toks, return_type="loss"))
    assert result.nmse == pytest.approx(err / energy, rel=1e-4)
    assert result.ce == pytest.approx(ce, rel=1e-5) and report.baselines.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert result.l0 == pytest.approx(float((acts != 0).sum(-1).float().mean()), rel=1e-6) and result.l0 <= K
    assert result.module_metrics == module.metrics() and result.expert_cos is None


# --- saving and loading ------------------------------------------------------------------------
def test_save_and_load(trained, tmp_path: Path) -> None:
    module, _ = trained
    folder = module.save(tmp_path / registry.module_folder_name(METHOD, K))
    assert folder.name == f"{METHOD}_k{K}" and registry.parse_module_folder_name(folder.name) == (METHOD, K)
    raw = json.loads((folder / "cfg.json").read_text())
    assert raw["architecture"] == NAME and raw["max_gain"] == 3.0 and raw["d_sae"] == N_UNITS
    # cfg.json is exactly the SAE-Lens view's config (plus our envelope), as for the built-ins.
    assert set(raw) - {"architecture", "mxd_lens_format"} == {f.name for f in dataclasses.fields(GainSAEConfig)}
    back = mxd_lens.load(folder)
    assert type(back) is GainTranscoder and back.cfg == module.cfg
    assert back.state_dict().keys() == module.state_dict().keys()
    for name, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    x = torch.randn(3, 5, D_MODEL)
    assert torch.equal(back.reconstruct(x), module.reconstruct(x))
    # The loader checks our own parameters like any other: a wrong gate shape is refused.
    weights = folder / "sae_weights.safetensors"
    save_file({**load_file(str(weights)), "W_gate": torch.zeros(D_MODEL, 2)}, str(weights))
    with pytest.raises(ValueError, match=r"tensor 'W_gate' has shape \(32, 2\) but cfg.json implies \(32, 1\)"):
        mxd_lens.load(folder)


# --- SAE-Lens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_error_term", [False, True])
def test_sae_lens_splice_equals_attach(trained, model, use_error_term: bool, tmp_path: Path) -> None:
    module, _ = trained
    sae = SAE.load_from_disk(module.save(tmp_path / "m"))
    assert type(sae) is GainSAE and sae.cfg.max_gain == 3.0 and sae.cfg.architecture() == NAME
    toks = tokens(3, seed=4)
    with attach(model, {LAYER: module}, use_error_term=use_error_term):
        ref = model(toks)  # sparse decoding: nothing hooks the units
        ref_cached, cache = model.run_with_cache(toks)  # dense decoding through the hooks
    hsae = hooked_sae_transformer(model)
    hsae.add_sae(sae, use_error_term=use_error_term)
    try:
        out = hsae(toks)
        out_cached, sae_cache = hsae.run_with_cache(toks)
    finally:
        hsae.reset_saes()
    assert not hsae.acts_to_saes
    assert torch.equal(out, ref) and torch.equal(out_cached, ref_cached)
    assert torch.equal(hsae.run_with_saes(toks, saes=[sae], use_error_term=use_error_term), ref)
    prefix = f"blocks.{LAYER}.hook_mlp_out"
    assert torch.equal(sae_cache[f"{prefix}.hook_sae_acts_post"], cache[f"blocks.{LAYER}.mlp.hook_latent_acts"])
    assert torch.equal(sae_cache[f"{prefix}.hook_toy_gain"], cache[f"blocks.{LAYER}.mlp.hook_gain"])
    if use_error_term:
        assert torch.equal(sae_cache[f"{prefix}.hook_sae_error"], cache[f"blocks.{LAYER}.mlp.hook_error"])
    if use_error_term:
        assert_close(out, model(toks), atol=1e-4, rtol=0)
    else:
        assert not torch.allclose(out, model(toks), atol=1e-3)
    # Without the encode of the same input, decode cannot know the gate.
    with pytest.raises(ValueError, match="per-token gain"):
        sae.decode(torch.zeros(2, N_UNITS))


# --- patching ----------------------------------------------------------------------------------
def logit_diff(logits: Tensor) -> Tensor:
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def test_patching_through_its_units_and_its_gate(trained, model) -> None:
    module, _ = trained
    clean_toks, corrupted_toks = tokens(2, seed=5), tokens(2, seed=6)
    corrupted_toks[:, :8] = clean_toks[:, :8]  # the first half agrees: patching there is a no-op
    # no_grad around it all: attribution patching turns gradients on where it needs them.
    with attach(model, {LAYER: module}, use_error_term=True) as m, torch.no_grad():
        site = find_site(m, LAYER)
        assert site.node_hooks() == {
            "unit": f"blocks.{LAYER}.mlp.hook_latent_acts",
            "error": f"blocks.{LAYER}.mlp.hook_error",
            "gain": f"blocks.{LAYER}.mlp.hook_gain",
        }
        clean, corrupted = capture(m, clean_toks, site), capture(m, corrupted_toks, site)
        attribution = node_attributions(m, clean_toks, corrupted_toks, logit_diff, LAYER, clean=clean, corrupted=corrupted)
        scores = attribution_patch(m, clean_toks, corrupted_toks, logit_diff, LAYER)
        positions = [2, 12, 15]
        patched = activation_patch(m, clean_toks, corrupted_toks, logit_diff, LAYER, positions=positions)
        corrupted_value = float(logit_diff(m(corrupted_toks)))

        # One cell by hand: the clean activation of the best-scored unit at position 15.
        unit = int(scores[15].abs().argmax())

        def set_clean(acts: Tensor, hook) -> Tensor:
            acts = acts.clone()
            acts[:, 15, unit] = clean["unit"][:, 15, unit]
            return acts

        by_hand = float(logit_diff(m.run_with_hooks(corrupted_toks, fwd_hooks=[(site.acts_name, set_clean)])))
        # Attribution is the first-order term: a small step along (clean - corrupted) of
        # that unit changes the metric by step * its score.
        eps = 1e-2

        def nudge(sign: float):
            def hook(acts: Tensor, hook) -> Tensor:
                acts = acts.clone()
                delta = clean["unit"][:, 15, unit] - corrupted["unit"][:, 15, unit]
                acts[:, 15, unit] += sign * eps * delta
                return acts

            return hook

        slope = [float(logit_diff(m.run_with_hooks(corrupted_toks, fwd_hooks=[(site.acts_name, nudge(s))]))) for s in (1, -1)]
        # The gate is a node too: patching it clean at every position.
        gain_all = patched_metrics(
            m, site, corrupted, clean, {"gain": torch.ones(1, 16, 1, dtype=torch.bool)}, logit_diff
        )[0]

        def gain_clean(g: Tensor, hook) -> Tensor:
            return clean["gain"]

        gain_by_hand = float(logit_diff(m.run_with_hooks(corrupted_toks, fwd_hooks=[(site.name("hook_gain"), gain_clean)])))

    assert scores.shape == (16, N_UNITS) and torch.equal(scores, attribution.unit)
    assert set(attribution.nodes) == {"unit", "error", "gain"} and attribution.nodes["gain"].shape == (16,)
    assert attribution.corrupted_metric == pytest.approx(corrupted_value, abs=1e-5)
    assert (scores[:8] == 0).all() and (attribution.nodes["gain"][:8] == 0).all()  # identical prefix: nothing to patch
    assert scores[8:].abs().max() > 0 and attribution.nodes["gain"][8:].abs().max() > 0
    assert patched.shape == (3, N_UNITS)
    assert_close(patched[0], torch.full((N_UNITS,), corrupted_value), atol=1e-5, rtol=0)  # position 2: a no-op
    assert patched[2, unit] == pytest.approx(by_hand, abs=1e-5)
    assert (slope[0] - slope[1]) / (2 * eps) == pytest.approx(float(scores[15, unit]), rel=2e-2, abs=1e-5)
    assert float(gain_all) == pytest.approx(gain_by_hand, abs=1e-5)
