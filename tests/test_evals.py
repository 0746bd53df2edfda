"""Evaluation numbers held to a slow, obvious computation with plain forward passes.

The hand computations below run the whole model on the whole token set with
`model(tokens)`, `attach`, `run_with_cache` and TransformerLens hooks on
`hook_mlp_out`, with CE and KL from torch.nn.functional: none of the evaluator's
batching, start_at_layer resumption, or forward hooks on the MLP module.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig, attach
from mxd_lens.evals import (
    CEBaselines,
    EvalReport,
    EvalResult,
    evaluate,
    evaluate_many,
    expert_cosine,
    mlp_output_means,
)
from mxd_lens.evals.metrics import clean_next_token, next_token_ce_kl, paired_stderr
from mxd_lens.model_io import run_prefix
from mxd_lens.architectures.base import Replacement, bypass, through

TOL = dict(rel=1e-5, abs=1e-5)


# --- fixtures ---------------------------------------------------------------------
def tiny_model(seed: int = 0, **overrides) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = dict(
        n_layers=3, d_model=16, d_mlp=40, n_ctx=16, d_head=4, n_heads=4, d_vocab=37,
        act_fn="gelu", normalization_type="LN", seed=seed,
    )
    cfg.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    model.eval()
    return model


def random_mxd(d: int, seed: int, d_hidden: int = 24, n_experts: int = 11, k: int = 3, **kw) -> MxD:
    torch.manual_seed(seed)
    mxd = MxD(MxDConfig(d_in=d, d_out=d, d_hidden=d_hidden, n_experts=n_experts, k=k, **kw))
    with torch.no_grad():  # D = 0 at init would make the MxD output its bias only
        mxd.W_out.normal_(std=0.3)
        mxd.b_enc.normal_(std=0.5)
    return mxd


def random_transcoder(d: int, seed: int, d_sae: int = 29, k: int = 4, skip: bool = False) -> TopKTranscoder:
    torch.manual_seed(seed)
    cls = SkipTranscoder if skip else TopKTranscoder
    tc = cls(TranscoderConfig(d_in=d, d_out=d, d_sae=d_sae, k=k))
    with torch.no_grad():
        tc.W_dec.normal_(std=0.3)
        if skip:
            tc.W_skip.normal_(std=0.1)
    return tc


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def tiny_tokens(tiny):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, tiny.cfg.d_vocab, (5, 12), generator=g)
    tokens[:, 0] = 0  # rows start with the separator, as on real text
    return tokens


# --- the slow, obvious reference ------------------------------------------------------
def ce_by_hand(logits, tokens):
    v = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, v).double(), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(tokens.shape[0], -1)


def kl_by_hand(logits, clean_logits):
    """KL(clean || logits) per prediction; F.kl_div(input, target) is KL(target || input)."""
    return F.kl_div(
        logits[:, :-1].double().log_softmax(-1),
        clean_logits[:, :-1].double().log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)


def by_hand(model, candidates, tokens, batch_size, mean_outputs=None):
    """Every figure of each candidate {name: {layer: module}}, from whole-token-set
    forward passes (the clean and ablated ones shared, as all candidates replace the
    same layers)."""
    layers = sorted(next(iter(candidates.values())))
    names = lambda n: n.endswith(("ln2.hook_normalized", "hook_mlp_out"))  # noqa: E731
    clean, cache = model.run_with_cache(tokens, names_filter=names)
    if mean_outputs is None:
        mean_outputs = {l: cache[f"blocks.{l}.hook_mlp_out"].mean((0, 1)) for l in layers}
    zero = model.run_with_hooks(
        tokens, fwd_hooks=[(f"blocks.{l}.hook_mlp_out", lambda a, hook: torch.zeros_like(a)) for l in layers]
    )
    mean = model.run_with_hooks(
        tokens,
        fwd_hooks=[
            (f"blocks.{l}.hook_mlp_out", lambda a, hook, l=l: mean_outputs[l].expand_as(a).clone()) for l in layers
        ],
    )
    ce_clean = ce_by_hand(clean, tokens)
    ce_zero = ce_by_hand(zero, tokens).mean().item()
    out = {}
    for name, reps in candidates.items():
        with attach(model, reps):
            spliced = model(tokens)
        ce_spliced = ce_by_hand(spliced, tokens)
        nmse, l0, dead, units, entropy = [], [], 0, 0, []
        for l in layers:
            module = reps[l]
            x, y = cache[f"blocks.{l}.ln2.hook_normalized"], cache[f"blocks.{l}.hook_mlp_out"]
            y_hat = module.reconstruct(x, hooked=False)  # the sparse path
            nmse.append(((y_hat - y).double().pow(2).sum() / y.double().pow(2).sum()).item())
            _, module_cache = module.run_with_cache(x)  # the module alone: TransformerLens's cache
            acts = module_cache[module.acts_hook_name]
            fired = (acts != 0).reshape(-1, acts.shape[-1])
            l0.append(fired.sum(-1).double().mean().item())
            counts = fired.sum(0).double()
            dead += int((counts == 0).sum())
            units += counts.numel()
            entropy.append(float(scipy.stats.entropy(counts.numpy())))
        per_row = (ce_spliced - ce_clean).mean(1)  # rows are the independent units
        out[name] = dict(
            ce_clean=ce_clean.mean().item(),
            ce_zero_ablation=ce_zero,
            ce_mean_ablation=ce_by_hand(mean, tokens).mean().item(),
            ce=ce_spliced.mean().item(),
            delta_ce=(ce_spliced - ce_clean).mean().item(),
            delta_ce_stderr=float(scipy.stats.sem(per_row.detach().numpy())),
            ce_recovered=(ce_zero - ce_spliced.mean().item()) / (ce_zero - ce_clean.mean().item()),
            kl=kl_by_hand(spliced, clean).mean().item(),
            nmse=sum(nmse) / len(nmse),
            l0=sum(l0) / len(l0),
            dead_fraction=dead / units,
            usage_entropy=sum(entropy) / len(entropy),
            n_tokens=tokens.shape[0] * (tokens.shape[1] - 1),
        )
    return out


def assert_matches(report: EvalReport, name: str, hand: dict) -> None:
    b, r = report.baselines, report.results[name]
    for key in ("ce_clean", "ce_zero_ablation", "ce_mean_ablation", "n_tokens"):
        assert getattr(b, key) == pytest.approx(hand[key], **TOL), key
    for key in ("ce", "delta_ce", "delta_ce_stderr", "ce_recovered", "kl", "nmse", "l0",
                "dead_fraction", "usage_entropy", "n_tokens"):
        assert getattr(r, key) == pytest.approx(hand[key], **TOL), key


# --- tiny model: every number against the hand computation ------------------------------
def test_tiny_model_numbers_equal_hand_computation(tiny, tiny_tokens):
    d = tiny.cfg.d_model
    cands = {
        "mxd": {1: random_mxd(d, seed=2)},
        "tc": {1: random_transcoder(d, seed=3)},
        "stc": {1: random_transcoder(d, seed=4, skip=True)},
    }
    report = evaluate_many(tiny, cands, tiny_tokens, batch_size=2, progress=False)
    assert list(report.results) == ["mxd", "tc", "stc"]
    assert report.baselines.layers == (1,) and report.baselines.mean_source == "evaluation tokens"
    hand = by_hand(tiny, cands, tiny_tokens, batch_size=2)
    for name in cands:
        assert_matches(report, name, hand[name])
        assert report.results[name].delta_ce != 0  # the modules really change the model
    assert report.results["mxd"].expert_cos == pytest.approx(expert_cosine(cands["mxd"][1]))
    assert report.results["tc"].expert_cos is None
    # the model is left as it was: original MLPs back, no hooks left behind
    assert not isinstance(tiny.blocks[1].mlp, Replacement)
    assert not tiny.blocks[1].mlp._forward_hooks
    assert not cands["mxd"][1].acts_hook._forward_hooks


def test_multi_layer_candidates(tiny, tiny_tokens):
    d = tiny.cfg.d_model
    cands = {
        "a": {0: random_mxd(d, seed=5), 2: random_transcoder(d, seed=6)},
        "b": {2: random_mxd(d, seed=7, k=2), 0: random_transcoder(d, seed=8, skip=True)},
    }
    report = evaluate_many(tiny, cands, tiny_tokens, batch_size=3, progress=False)
    assert report.baselines.layers == (0, 2)
    hand = by_hand(tiny, cands, tiny_tokens, batch_size=3)
    for name in cands:
        assert_matches(report, name, hand[name])
        assert set(report.results[name].nmse_per_layer) == {0, 2}
    # with two layers spliced, the CE is not that of either layer alone
    alone = evaluate_many(tiny, {"a0": {0: cands["a"][0]}}, tiny_tokens, batch_size=3, progress=False)
    assert alone.results["a0"].ce != pytest.approx(report.results["a"].ce, abs=1e-4)


def test_given_mean_outputs_are_used(tiny, tiny_tokens):
    reps = {2: random_mxd(tiny.cfg.d_model, seed=9)}
    g = torch.Generator().manual_seed(3)
    means = {2: torch.randn(tiny.cfg.d_model, generator=g)}
    baselines, result = evaluate(tiny, reps, tiny_tokens, batch_size=4, mean_outputs=means, progress=False)
    hand = by_hand(tiny, {"c": reps}, tiny_tokens, batch_size=4, mean_outputs=means)["c"]
    assert baselines.mean_source == "given"
    assert baselines.ce_mean_ablation == pytest.approx(hand["ce_mean_ablation"], **TOL)
    assert result.ce == pytest.approx(hand["ce"], **TOL)


class WrappedMLP(Replacement):
    """The model's own MLP as a Replacement whose units are its hidden neurons: a
    perfect replacement, so every faithfulness figure must come out exact."""

    architecture = "wrapped_mlp"
    acts_hook_name = "hook_neurons"

    def __init__(self, mlp: nn.Module, d_model: int, d_mlp: int) -> None:
        super().__init__(TranscoderConfig(d_in=d_model, d_out=d_model, d_sae=d_mlp, k=d_mlp))
        for name in ("W_in", "b_in", "W_out", "b_out"):
            setattr(self, name, nn.Parameter(getattr(mlp, name).detach().clone()))
        from transformer_lens.hook_points import HookPoint

        self.hook_neurons = HookPoint()
        self.setup()

    def reconstruct(self, x, hooked=True):
        h = through if hooked else bypass  # through the hook point or around it
        neurons = h(self.hook_neurons, F.gelu(x @ self.W_in + self.b_in))
        return neurons @ self.W_out + self.b_out


def test_the_original_mlp_recovers_everything(tiny, tiny_tokens):
    d, d_mlp = tiny.cfg.d_model, tiny.cfg.d_mlp
    reps = {1: WrappedMLP(tiny.blocks[1].mlp, d, d_mlp)}
    baselines, r = evaluate(tiny, reps, tiny_tokens, batch_size=2, progress=False)
    assert baselines.ce_zero_ablation != pytest.approx(baselines.ce_clean, abs=1e-3)
    assert r.nmse < 1e-10
    assert r.delta_ce == pytest.approx(0, abs=1e-6)
    assert r.ce_recovered == pytest.approx(1, abs=1e-5)
    assert r.kl == pytest.approx(0, abs=1e-6)
    assert r.dead_fraction == 0 and r.l0 > 0.9 * d_mlp  # GELU neurons are almost never exactly 0


def test_error_term_makes_any_module_exact(tiny, tiny_tokens):
    reps = {1: random_mxd(tiny.cfg.d_model, seed=11)}
    _, plain = evaluate(tiny, reps, tiny_tokens, batch_size=2, progress=False)
    _, r = evaluate(tiny, reps, tiny_tokens, batch_size=2, use_error_term=True, progress=False)
    assert abs(plain.delta_ce) > 1e-3
    assert r.delta_ce == pytest.approx(0, abs=1e-6) and r.kl == pytest.approx(0, abs=1e-6)
    assert r.ce_recovered == pytest.approx(1, abs=1e-5)
    assert r.nmse == pytest.approx(plain.nmse)  # NMSE is the module's own, error term or not


# --- resuming from a layer equals a full forward ----------------------------------------
@pytest.mark.parametrize("start", [0, 1, 2])
@pytest.mark.parametrize("pos", ["standard", "shortformer", "rotary"])
def test_resume_from_layer_equals_full_forward(tiny_tokens, start, pos):
    model = tiny_model(seed=12, positional_embedding_type=pos)
    reps = {start: random_mxd(model.cfg.d_model, seed=13)}
    with attach(model, reps):
        full = model(tiny_tokens)
        resumed = run_prefix(model, tiny_tokens, start).resume(model)
    torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)


# --- expert cosine --------------------------------------------------------------------
def explicit_expert_cosine(mxd: MxD, experts=None) -> float:
    """Mean |cos| over all pairs of `experts` (default: all), from the flattened
    H x O maps W_n = D diag(c_n) built one by one."""
    D, C = mxd.W_out.detach().double(), mxd.W_dec.detach().double()
    experts = range(mxd.cfg.n_experts) if experts is None else experts
    maps = [(D @ torch.diag(C[n])).flatten() for n in experts]
    cos = [abs(F.cosine_similarity(a, b, dim=0).item()) for a, b in itertools.combinations(maps, 2)]
    return sum(cos) / len(cos)


@pytest.mark.parametrize("shape", [(7, 5, 9), (13, 11, 4), (3, 17, 6)])
def test_expert_cosine_equals_explicit_maps(shape):
    d, h, n = shape
    mxd = random_mxd(d, seed=n, d_hidden=h, n_experts=n, k=2)
    assert expert_cosine(mxd, n_sample=n) == pytest.approx(explicit_expert_cosine(mxd), rel=1e-9)
    assert expert_cosine(mxd, n_sample=1000) == pytest.approx(explicit_expert_cosine(mxd), rel=1e-9)
    # a sample of 3 experts: the value is that of one of the 3-expert subsets
    subsets = [explicit_expert_cosine(mxd, s) for s in itertools.combinations(range(n), 3)]
    for seed in (0, 1):
        sampled = expert_cosine(mxd, n_sample=3, seed=seed)
        assert min(abs(sampled - v) for v in subsets) < 1e-9 * max(subsets)


def test_expert_cosine_flags_collapse():
    mxd = random_mxd(8, seed=1, n_experts=20, k=2)
    assert expert_cosine(mxd) < 0.5
    with torch.no_grad():
        mxd.W_dec.copy_(mxd.W_dec[0].expand_as(mxd.W_dec))  # every expert the same map
    assert expert_cosine(mxd) == pytest.approx(1.0)
    with torch.no_grad():
        mxd.W_out.zero_()  # the paper's init: every map is 0, no cosine exists
    assert math.isnan(expert_cosine(mxd))
    with pytest.raises(ValueError, match="n_sample=1"):
        expert_cosine(mxd, n_sample=1)
    with pytest.raises(ValueError, match="TopKTranscoder"):
        expert_cosine(random_transcoder(8, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_and_kl_equal_torch_functional(dtype):
    g = torch.Generator().manual_seed(0)
    clean_logits = (torch.randn(5, 9, 1001, generator=g) * 3).to(dtype)  # 5 rows: chunks 2, 2, 1
    logits = (clean_logits.float() + torch.randn(5, 9, 1001, generator=g)).to(dtype)
    tokens = torch.randint(0, 1001, (5, 9), generator=g)
    clean = clean_next_token(clean_logits, tokens)
    ce, kl = next_token_ce_kl(logits, tokens, clean)
    torch.testing.assert_close(clean.ce.double(), ce_by_hand(clean_logits.float(), tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.double(), ce_by_hand(logits.float(), tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_by_hand(logits.float(), clean_logits.float()), rtol=1e-5, atol=1e-5)
    assert next_token_ce_kl(logits, tokens)[1] is None


def test_paired_stderr_formula():
    diffs = [0.3, -0.1, 0.25, 0.05, 0.4]
    assert paired_stderr(diffs) == pytest.approx(float(scipy.stats.sem(diffs)))
    assert math.isnan(paired_stderr([0.2]))


def test_results_are_json_ready(tiny, tiny_tokens):
    reps = {1: random_mxd(tiny.cfg.d_model, seed=14)}
    report = evaluate_many(tiny, {"m": reps}, tiny_tokens[:1], batch_size=8, progress=False)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["results"]["m"]["delta_ce_stderr"] is None  # one row: no stderr
    # every field but the per-unit firing-rate tensors (written to sparsity.safetensors)
    assert set(d["results"]["m"]) >= {f.name for f in EvalResult.__dataclass_fields__.values()} - {"firing_rates"}
    assert set(d["baselines"]) >= set(CEBaselines.__dataclass_fields__)


# --- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.zeros(0, 8, dtype=torch.long), "at least 1 row"),
        (torch.zeros(8, dtype=torch.long), "2-D"),
        (torch.zeros(2, 1, dtype=torch.long), "at least 2 tokens"),
        (torch.zeros(2, 8), "integer"),
        (torch.full((2, 8), 37), r"\[0, 37\)"),
        ([[0, 1, 2]], "torch.Tensor"),
    ],
)
def test_bad_tokens(tiny, tokens, match):
    with pytest.raises(ValueError, match=match):
        evaluate(tiny, {1: random_mxd(tiny.cfg.d_model, seed=0)}, tokens, progress=False)


def test_bad_candidates(tiny, tiny_tokens):
    d = tiny.cfg.d_model
    m = random_mxd(d, seed=0)
    bad = [
        ({}, "non-empty"),
        ({"x": {}}, "'x'.*at least one"),
        ({"x": {1: None}}, "'x'.*NoneType"),
        ({"x": {5: m}}, "layer=5 is out of range"),
        ({"x": {1: m}, "y": {2: random_mxd(d, seed=1)}}, r"'y' replaces layers \[2\]"),
        ({"x": {1: random_mxd(d + 1, seed=0)}}, "d_in=17"),
    ]
    for candidates, match in bad:
        with pytest.raises(ValueError, match=match):
            evaluate_many(tiny, candidates, tiny_tokens, progress=False)
    with pytest.raises(ValueError, match=r"layer without replacement: \[2\]"):
        evaluate(tiny, {1: m}, tiny_tokens, mean_outputs={1: torch.zeros(d), 2: torch.zeros(d)}, progress=False)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        evaluate(tiny, {1: m}, tiny_tokens, mean_outputs={}, progress=False)
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        evaluate(tiny, {1: m}, tiny_tokens, mean_outputs={1: torch.zeros(3)}, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate(tiny, {1: m}, tiny_tokens, batch_size=0, progress=False)
    for layers in ([], [3]):
        with pytest.raises(ValueError, match=r"layers=\[.*expected one or more layers in 0..2"):
            mlp_output_means(tiny, tiny_tokens, layers, progress=False)


# --- the real default model -------------------------------------------------------------------
def real_modules(d: int) -> dict[str, dict[int, Replacement]]:
    mxd = random_mxd(d, seed=21, d_hidden=96, n_experts=48, k=8, act_fn="silu", glu=True)
    with torch.no_grad():
        mxd.W_out.normal_(std=0.02)
    tc = random_transcoder(d, seed=22, d_sae=200, k=8)
    with torch.no_grad():
        tc.W_dec.normal_(std=0.02)
    return {"mxd": {12: mxd}, "tc": {12: tc}}


def test_real_model_numbers_equal_hand_computation(default_model, heldout_tokens):
    model, tokens = default_model, heldout_tokens
    assert (tokens[:, 0] == 0).all()
    cands = real_modules(model.cfg.d_model)
    with attach(model, cands["mxd"]):  # resuming at layer 12 is the full forward
        torch.testing.assert_close(run_prefix(model, tokens, 12).resume(model), model(tokens), rtol=1e-4, atol=1e-4)
    report = evaluate_many(model, cands, tokens, batch_size=1, progress=False, exclude_special_tokens=False)
    hand = by_hand(model, cands, tokens, batch_size=1)
    for name in cands:
        assert_matches(report, name, hand[name])


@pytest.fixture(scope="module")
def heldout_4x64(default_model):
    from mxd_lens.sources import load_default_corpus, token_rows

    return token_rows(default_model.tokenizer, load_default_corpus("heldout")[:3], context=64, max_rows=4)


def test_real_model_layer12_ablations_and_exact_splice(default_model, heldout_4x64):
    reps = real_modules(default_model.cfg.d_model)["mxd"]
    b, r = evaluate(default_model, reps, heldout_4x64, batch_size=2, use_error_term=True, progress=False)
    assert b.n_tokens == 4 * 63
    assert 2.0 < b.ce_clean < 6.0  # a real model on real English text
    assert b.ce_zero_ablation > b.ce_clean + 0.02  # deleting the layer-12 MLP hurts
    assert b.ce_mean_ablation > b.ce_clean
    assert r.delta_ce == pytest.approx(0, abs=1e-5) and r.kl == pytest.approx(0, abs=1e-5)
    assert r.ce_recovered == pytest.approx(1, abs=1e-3)
    assert 0 < r.l0 <= 8 and 0 <= r.dead_fraction < 1
