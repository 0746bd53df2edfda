"""The data-dependent initialisations and training options of `mxd_lens.training.init`,
through `fit` where the trainer wires them in."""

from __future__ import annotations

import pytest
import torch

from mxd_lens import MxD, MxDConfig, TopKTranscoder, TranscoderConfig
from mxd_lens.training import ActivationConfig, TrainerConfig, fit
from mxd_lens.training import init as data_init
from tests.training.helpers import tiny_model, tiny_tokens

D = 32  # tiny_model's d_model


def _modules(seed: int = 0) -> dict[str, tuple[int, MxD | TopKTranscoder]]:
    torch.manual_seed(seed)
    return {
        "mxd": (1, MxD(MxDConfig(d_in=D, d_out=D, d_hidden=48, n_experts=37, k=5, act_fn="silu", glu=True))),
        "tc": (1, TopKTranscoder(TranscoderConfig(d_in=D, d_out=D, d_sae=53, k=5))),
    }


def _cfg(**kw) -> TrainerConfig:
    """One batch = every token of `_tokens()` (special positions kept), float32."""
    base = dict(train_tokens=64, batch_size=64, lr=1e-9, warmup_steps=0, autocast=None, aux_coeff=0.0,
                progress=False, activations=ActivationConfig(buffer_tokens=64, exclude_special_tokens=False))
    base.update(kw)
    return TrainerConfig(**base)


def _tokens() -> torch.Tensor:
    return tiny_tokens(4)  # 4 rows x 16 = 64 tokens: the first batch is all of them


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    _, cache = model.run_with_cache(_tokens(), names_filter="blocks.1.ln2.hook_normalized")
    return model, cache["blocks.1.ln2.hook_normalized"].reshape(-1, D)


def test_centred_encoder_zero_mean_preactivation_through_fit(tiny):
    """center_encoder: after fit's step 0 the first batch's mean pre-activation is zero for
    the transcoder's encoder and the MxD's gate (lr 1e-9: the one step moves nothing);
    zero_decoder zeroes the transcoder's decoder and leaves the MxD's unit rows alone."""
    model, x = tiny
    before = _modules()
    with torch.no_grad():
        pre0 = {name: m.pre_acts(x).mean(0) for name, (_, m) in before.items()}
    assert all(float(p.abs().max()) > 0.05 for p in pre0.values())  # not centred by accident
    modules = _modules()
    fit(model, modules, _tokens(), _cfg(center_encoder=True, zero_decoder=True))
    for name, (_, module) in modules.items():
        with torch.no_grad():
            mean_pre = module.pre_acts(x).mean(0)
        torch.testing.assert_close(mean_pre, torch.zeros_like(mean_pre), atol=1e-5, rtol=0)
    assert float(modules["tc"][1].W_dec.detach().abs().max()) < 1e-6
    torch.testing.assert_close(modules["mxd"][1].W_dec.norm(dim=1), torch.ones(37))


def test_default_options_change_nothing(tiny):
    """Under the default TrainerConfig every hook of the trainer leaves the weights
    bit-identical (today's training), and gives one lr per group equal to cfg.lr."""
    model, x = tiny
    cfg = _cfg(lr=1e-2)
    for name, (_, module) in _modules().items():
        start = {k: v.clone() for k, v in module.state_dict().items()}
        for p in module.parameters():
            p.grad = torch.ones_like(p)
        assert data_init.prepare_(module, model, 1, cfg) is False
        data_init.init_from_data_(module, x, cfg)
        data_init.constrain_grads_(module, cfg)
        data_init.constrain_rows_(module, cfg)
        for k, v in module.state_dict().items():
            assert torch.equal(v, start[k]), (name, k)
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in module.parameters())
        assert {g["lr"] for g in data_init.optimizer_groups(module, cfg)} == {1e-2}


def test_unit_norm_decoder_through_fit(tiny):
    """The MxD authors' transcoder recipe: the transcoder's decoder rows (norm 0.1 at init)
    are unit-norm after training; the parallel gradient is removed before each step."""
    model, _ = tiny
    modules = _modules()
    assert float(modules["tc"][1].W_dec.detach().norm(dim=1).max()) < 0.2
    fit(model, modules, _tokens(), _cfg(lr=1e-2, train_tokens=256, unit_norm_decoder=True))
    torch.testing.assert_close(modules["tc"][1].W_dec.norm(dim=1), torch.ones(53))

    tc = _modules()["tc"][1]
    tc.W_dec.grad = torch.randn_like(tc.W_dec)
    g = tc.W_dec.grad.clone()
    data_init.constrain_grads_(tc, _cfg(unit_norm_decoder=True))
    rows = tc.W_dec / tc.W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close((tc.W_dec.grad * rows).sum(1), torch.zeros(53), atol=1e-5, rtol=0)
    torch.testing.assert_close(tc.W_dec.grad, g - (g * rows).sum(1, keepdim=True) * rows)  # the hand formula
    data_init.constrain_grads_(tc, _cfg())  # off: untouched
    mxd = _modules()["mxd"][1]
    mxd.W_dec.grad = g[:37].clone()
    data_init.constrain_grads_(mxd, _cfg(unit_norm_decoder=True))  # the MxD does it itself
    assert torch.equal(mxd.W_dec.grad, g[:37])


def test_param_groups_and_lr_scales(tiny):
    """MxD's groups partition its parameters; a tiny gate multiplier freezes the gate in
    fit while the dense branch moves; a transcoder keeps one group at the base lr."""
    model, _ = tiny
    mxd = _modules()["mxd"][1]
    groups = mxd.param_groups()
    assert set(groups) == {"gate", "experts", "dense"}
    ids = [id(p) for ps in groups.values() for p in ps if p is not None]
    assert sorted(ids) == sorted(id(p) for p in mxd.parameters())
    opt = data_init.optimizer_groups(mxd, _cfg(lr=2e-3, gate_lr_scale=0.5, dense_lr_scale=3.0))
    assert {g["name"]: g["lr"] for g in opt} == pytest.approx({"gate": 1e-3, "experts": 2e-3, "dense": 6e-3})
    tc_groups = data_init.optimizer_groups(_modules()["tc"][1], _cfg(lr=2e-3, gate_lr_scale=0.5))
    assert [(g["name"], g["lr"]) for g in tc_groups] == [("all", 2e-3)]

    modules = _modules()
    start = {k: v.clone() for k, v in modules["mxd"][1].state_dict().items()}
    fit(model, modules, _tokens(), _cfg(lr=1e-2, train_tokens=256, gate_lr_scale=1e-6))
    end = modules["mxd"][1].state_dict()
    assert float((end["W_enc"] - start["W_enc"]).abs().max()) < 1e-6
    assert float((end["W_out"] - start["W_out"]).abs().max()) > 1e-3


def _kmeans_reference(x: torch.Tensor, init: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's spherical k-means, one token and one centroid at a time."""
    xs = [row / row.norm() for row in x.double()]
    cents = [col / col.norm() for col in init.double().T]
    for _ in range(iters):
        members: list[list[torch.Tensor]] = [[] for _ in cents]
        for row in xs:
            best = max(range(len(cents)), key=lambda j: float(row @ cents[j]))
            members[best].append(row)
        cents = [torch.stack(m).sum(0) / torch.stack(m).sum(0).norm() if m else c for m, c in zip(members, cents)]
    return torch.stack(cents, 1)


def test_kmeans_columns_equal_the_reference_and_find_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    x = centres.repeat_interleave(30, 0) + 0.05 * torch.randn(120, 16, generator=g)
    init = torch.randn(16, 7, generator=g)  # more centroids than clusters: some stay empty
    fast = data_init.kmeans_columns(x, init, iters=4)
    torch.testing.assert_close(fast, _kmeans_reference(x, init, 4))
    xs = (x / x.norm(dim=1, keepdim=True)).double()
    objective = [float((xs @ data_init.kmeans_columns(x, init, iters=i)).max(1).values.sum()) for i in range(5)]
    assert all(b >= a - 1e-9 for a, b in zip(objective, objective[1:])) and objective[-1] > objective[0]
    # started near the planted directions (cosine ~0.6), Lloyd lands on them
    near = torch.cat([centres.T + 1.2 * torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)], 1)
    unit_centres = centres / centres.norm(dim=1, keepdim=True)
    assert float((unit_centres.double() @ near.double() / near.double().norm(dim=0)).max(1).values.max()) < 0.9
    best = (unit_centres.double() @ data_init.kmeans_columns(x, near, iters=4)).max(1).values
    assert float(best.min()) > 0.99


def test_kmeans_gate_init_through_fit(tiny):
    """gate_init='kmeans' moves gate columns onto the data (higher best cosine with the
    centred tokens than the random columns) and keeps every column's norm."""
    model, x = tiny
    before = _modules()["mxd"][1]
    modules = _modules()
    fit(model, modules, _tokens(), _cfg(gate_init="kmeans", kmeans_iters=3))
    after = modules["mxd"][1]
    torch.testing.assert_close(after.W_enc.norm(dim=0), before.W_enc.norm(dim=0), rtol=1e-4, atol=1e-6)
    xc = x - x.mean(0)
    xc = xc / xc.norm(dim=1, keepdim=True)

    def fit_to_data(W: torch.Tensor) -> float:
        return float((xc @ (W / W.norm(dim=0))).max(1).values.mean())

    assert fit_to_data(after.W_enc.detach()) > fit_to_data(before.W_enc.detach()) + 0.1


def test_warm_start_reproduces_the_mlp_hidden_units(default_model, heldout_tokens):
    """A warm-started dense branch on SmolLM2's layer-28 MLP: hook_hidden equals the MLP's
    hook_post exactly, and any one expert at a = 1 gives the MLP's output."""
    layer = 28
    cfg = default_model.cfg
    mlp = default_model.blocks[layer].mlp
    mxd = MxD(MxDConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_hidden=cfg.d_mlp, n_experts=6, k=2,
                        act_fn=cfg.act_fn, glu=True))
    assert mxd.warm_start_from_mlp(mlp) is True
    names = [f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"]
    with torch.no_grad():
        _, cache = default_model.run_with_cache(heldout_tokens, names_filter=names)
        x, post, out = (cache[n].reshape(-1, cache[n].shape[-1]) for n in names)
        _, mcache = mxd.run_with_cache(x, names_filter="hook_hidden")
        torch.testing.assert_close(mcache["hook_hidden"], post, rtol=1e-5, atol=1e-5)
        one = torch.zeros(x.shape[0], 6)
        one[:, 3] = 1.0
        y = mxd.combine(one @ mxd.W_dec, mxd.context(x, lambda h, t: t))
    torch.testing.assert_close(y, out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="act_fn"):
        MxD(MxDConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_hidden=cfg.d_mlp, n_experts=6, k=2,
                      act_fn="gelu", glu=True)).warm_start_from_mlp(mlp)


def test_warm_start_through_fit_diversifies_rows_and_scales_the_gate(tiny):
    """warm_start_dense + expert_init_noise in fit: the dense branch is the MLP's, rows are
    unit-norm, similar but not equal; the gate is scaled so that mean_t sum_n a_tn = 1
    on the first batch (checked before the one lr-1e-9 step can matter)."""
    model, x = tiny
    modules = {"mxd": _modules()["mxd"]}
    fit(model, modules, _tokens(), _cfg(warm_start_dense=True, expert_init_noise=0.1, init_bias_from_data=False))
    mxd = modules["mxd"][1]
    mlp = model.blocks[1].mlp
    torch.testing.assert_close(mxd.W_hidden_lin.detach(), mlp.W_in.detach(), atol=1e-6, rtol=0)
    rows = mxd.W_dec.detach()
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(37))
    cos = rows @ rows.T
    off = cos[~torch.eye(37, dtype=torch.bool)]
    assert 0.8 < float(off.mean()) < 0.9999
    with torch.no_grad():
        a = mxd.encode(x, hooked=False).dense(37)
    assert float(a.sum(1).mean()) == pytest.approx(1.0, rel=1e-4)
    assert mxd.metrics()["expert_cos"] > 0.8  # reported: a warm start starts close to collapse


def test_flat_gate_warm_start_starts_at_the_mlp_on_every_token(tiny):
    """warm_start_gate_scale: the gate is flattened before the rescale, so sum_n a_tn ~ 1 on
    EVERY token of the first batch (not only on average) and, with equal rows (noise 0),
    the layer's output is the MLP's own to within that spread; the rescale alone leaves
    the sums spread over tokens and the output far from the MLP."""
    model, x = tiny
    _, cache = model.run_with_cache(_tokens(), names_filter="blocks.1.hook_mlp_out")
    y = cache["blocks.1.hook_mlp_out"].reshape(-1, D)
    spread, nmse = {}, {}
    for name, scale in (("flat", 0.01), ("rescale", None)):
        modules = {"mxd": _modules()["mxd"]}
        fit(model, modules, _tokens(), _cfg(warm_start_dense=True, expert_init_noise=0.0, init_bias_from_data=False,
                                            warm_start_gate_scale=scale))
        mxd = modules["mxd"][1]
        with torch.no_grad():
            sums = mxd.encode(x, hooked=False).dense(37).sum(1)
            y_hat = mxd.reconstruct(x, hooked=False)
        assert float(sums.mean()) == pytest.approx(1.0, rel=1e-3)
        spread[name] = float(sums.std() / sums.mean())
        nmse[name] = float((y_hat - y).pow(2).sum() / y.pow(2).sum())
    assert spread["flat"] < 0.02 < spread["rescale"]
    assert nmse["flat"] < 1e-3 < nmse["rescale"]


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="zero_decoder=True and unit_norm_decoder=True"):
        TrainerConfig(zero_decoder=True, unit_norm_decoder=True)
    with pytest.raises(ValueError, match="expert_init_noise"):
        TrainerConfig(warm_start_dense=True)
    with pytest.raises(ValueError, match="gate_init='pca'"):
        TrainerConfig(gate_init="pca")
    with pytest.raises(ValueError, match="dense_lr_scale=0"):
        TrainerConfig(dense_lr_scale=0)
    with pytest.raises(ValueError, match="warm_start_gate_scale is set but warm_start_dense=False"):
        TrainerConfig(warm_start_gate_scale=0.01)
    with pytest.raises(ValueError, match="warm_start_gate_scale=0 must be a positive number"):
        TrainerConfig(warm_start_dense=True, expert_init_noise=0.1, warm_start_gate_scale=0)
    with pytest.raises(ValueError, match="expert_init_noise=-1"):
        TrainerConfig(expert_init_noise=-1)
    assert TrainerConfig.from_dict(TrainerConfig(center_encoder=True, gate_init="kmeans").to_dict()).gate_init == "kmeans"


def test_cli_flags_set_the_options(tmp_path):
    from mxd_lens.cli import build_parser, config_from_args
    from mxd_lens.experiments.config import FrontierConfig

    argv = ["frontier", "--center-encoder", "--unit-norm-decoder", "--gate-init", "kmeans", "--gate-lr-scale", "0.5",
            "--warm-start-dense", "--expert-init-noise", "0.2", "--out", str(tmp_path / "r")]
    t = config_from_args(build_parser(argv).parse_args(argv), FrontierConfig()).trainer
    assert (t.center_encoder, t.unit_norm_decoder, t.zero_decoder, t.gate_init) == (True, True, False, "kmeans")
    assert (t.gate_lr_scale, t.experts_lr_scale, t.warm_start_dense, t.expert_init_noise) == (0.5, 1.0, True, 0.2)


def _two_rank_worker(rank: int, rendezvous: str, out: str) -> None:
    """One of two gloo processes: its half of the batch through `init_from_data_`."""
    import torch.distributed as dist

    from mxd_lens.training.distributed import DistContext

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        x = _batch()
        half = x[rank::2]  # any split works: the statistics are sums over tokens
        module = _modules()["mxd"][1]
        data_init.init_from_data_(module, half, _cfg(**_ALL_STEP0), DistContext(rank, 2))
        if rank == 1:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


_ALL_STEP0 = dict(gate_init="kmeans", center_encoder=True, warm_start_dense=True, expert_init_noise=0.1)


def _batch() -> torch.Tensor:
    return torch.randn(64, D, generator=torch.Generator().manual_seed(3)) + 0.5


def test_step0_inits_under_two_processes_equal_one(tmp_path):
    """Real torch.distributed (gloo, 2 processes), each holding half of the batch: the
    k-means gate, the centred bias and the warm-start gate scale equal one process's on
    the whole batch (the statistics are all-reduced and divided by the global batch)."""
    import torch.multiprocessing as mp

    from safetensors.torch import load_file

    out = tmp_path / "rank1.safetensors"
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "rdv"), str(out)), nprocs=2, join=True)
    two = load_file(str(out))
    module = _modules()["mxd"][1]
    data_init.init_from_data_(module, _batch(), _cfg(**_ALL_STEP0))
    for key, value in module.state_dict().items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(two["b_enc"], _modules()["mxd"][1].b_enc.detach())  # something happened


def test_default_groups_train_bit_identically_to_one_adamw_group(tiny, monkeypatch):
    """The per-group optimiser at the default multipliers is today's optimiser: ten steps of
    fit give bit-identical weights to a single AdamW group over all parameters."""
    model, _ = tiny
    a = _modules()
    fit(model, a, _tokens(), _cfg(lr=1e-2, train_tokens=640, warmup_steps=2))
    monkeypatch.setattr(data_init, "optimizer_groups",
                        lambda m, cfg: [{"params": [p for p in m.parameters() if p.requires_grad]}])
    b = _modules()
    fit(model, b, _tokens(), _cfg(lr=1e-2, train_tokens=640, warmup_steps=2))
    for name in a:
        sb = b[name][1].state_dict()
        for key, value in a[name][1].state_dict().items():
            assert torch.equal(value, sb[key]), (name, key)


def test_warm_start_of_an_ungated_mlp_with_biases():
    """A plain (ungated, biased) TransformerLens MLP: z = act(x W_in + b_in) exactly, and one
    expert at a = 1 gives W_out^T z + b_out, the MLP's output."""
    model = tiny_model(gated_mlp=False, act_fn="gelu")
    mlp = model.blocks[1].mlp
    with torch.no_grad():
        mlp.b_in.normal_()
        mlp.b_out.normal_()
    mxd = MxD(MxDConfig(d_in=D, d_out=D, d_hidden=48, n_experts=5, k=2, act_fn="gelu"))
    assert mxd.warm_start_from_mlp(mlp)
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"]
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens(), names_filter=names)
        x, post, out = (cache[n].reshape(-1, cache[n].shape[-1]) for n in names)
        _, mcache = mxd.run_with_cache(x, names_filter="hook_hidden")
        torch.testing.assert_close(mcache["hook_hidden"], post, rtol=1e-5, atol=1e-5)
        y = mxd.combine(mxd.W_dec[1].expand(x.shape[0], D), mxd.context(x, lambda h, t: t))
    torch.testing.assert_close(y, out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not gated but glu=True"):
        MxD(MxDConfig(d_in=D, d_out=D, d_hidden=48, n_experts=5, k=2, act_fn="gelu", glu=True)).warm_start_from_mlp(mlp)
