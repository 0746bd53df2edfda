"""The trainer: its forward equals the modules', losses, AuxK, schedule, and learning on real activations."""

from __future__ import annotations

import math

import pytest
import torch

from mxd_lens import MxD, MxDConfig, TopKTranscoder, TranscoderConfig
from mxd_lens.training import ActivationConfig, TrainerConfig, fit
from mxd_lens.training.trainer import aux_k_loss, lr_at, nmse_loss, train_forward
from tests.training.helpers import tiny_model, tiny_modules, tiny_tokens


@pytest.mark.parametrize("name", ["mxd", "tc", "stc"])
def test_train_forward_equals_reconstruct(name):
    module = tiny_modules()[name]
    with torch.no_grad():  # non-trivial weights everywhere (MxD starts with D = 0)
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(7, 3, 32)
    target = torch.randn(21, 32)
    out = train_forward(module, x.reshape(-1, 32))
    reference = module.reconstruct(x, hooked=False).reshape(-1, 32)
    torch.testing.assert_close(out.y_hat, reference, rtol=0, atol=0)
    assert out.sparse.indices.shape == (21, 5)
    # the sparse backward gives autograd's gradients through the plain forward
    grads = torch.autograd.grad((out.y_hat - target).pow(2).sum(), list(module.parameters()))
    expected = torch.autograd.grad((reference - target).pow(2).sum(), list(module.parameters()))
    for (pname, _), g, e in zip(module.named_parameters(), grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=pname)


def test_selected_pre_input_gradient():
    from mxd_lens.training.trainer import select_topk

    x = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 17, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, requires_grad=True)
    idx = (x @ W + b).detach().topk(4, dim=-1).indices
    f = lambda x, W, b: select_topk(x, W, b, (x @ W + b).detach(), idx).values.sin().sum()  # noqa: E731
    dense = lambda x, W, b: torch.relu((x @ W + b).gather(-1, idx)).sin().sum()  # noqa: E731
    for g, e in zip(torch.autograd.grad(f(x, W, b), (x, W, b)), torch.autograd.grad(dense(x, W, b), (x, W, b))):
        torch.testing.assert_close(g, e)


def test_nmse_loss_by_hand():
    y = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    y_hat = torch.tensor([[3.0, 3.0], [0.0, 0.0]])
    assert float(nmse_loss(y_hat, y, "batch")) == pytest.approx((1 + 1) / (25 + 1))
    assert float(nmse_loss(y_hat, y, "token")) == pytest.approx((1 / 25 + 1 / 1) / 2)
    # scale invariance of both normalisations
    assert float(nmse_loss(7 * y_hat, 7 * y, "token")) == pytest.approx(float(nmse_loss(y_hat, y, "token")))


@pytest.mark.parametrize("name", ["mxd", "tc"])
def test_aux_k_loss_reaches_only_dead_units(name):
    module = tiny_modules()[name]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x, y = torch.randn(40, 32), torch.randn(40, 32)
    dead = torch.zeros(module.n_units, dtype=torch.bool)
    dead[[1, 4, 9, 20]] = True
    out = train_forward(module, x)
    aux = aux_k_loss(module, x, out, y, dead, aux_k=3)
    aux.backward()
    grad_rows = module.W_dec.grad.abs().sum(1) > 0
    grad_cols = module.W_enc.grad.abs().sum(0) > 0
    assert grad_rows.any() and (grad_rows <= dead).all()
    assert (grad_cols <= dead).all()
    assert aux_k_loss(module, x, out, y, torch.zeros_like(dead), aux_k=3) is None
    # on a token subset it is the loss of that subset alone
    sub = aux_k_loss(module, x, out, y, dead, aux_k=3, tokens=11)
    out11 = train_forward(module, x[:11])
    torch.testing.assert_close(sub, aux_k_loss(module, x[:11], out11, y[:11], dead, aux_k=3))


def test_lr_schedule():
    cfg = TrainerConfig(train_tokens=100 * 64, batch_size=64, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(50, TrainerConfig(lr=2.0, warmup_steps=10)) == 2.0


def test_bad_configs_name_the_value():
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainerConfig(batch_size=0)
    with pytest.raises(ValueError, match="buffer_tokens=512 is smaller than batch_size=1024"):
        TrainerConfig(activations=ActivationConfig(buffer_tokens=512))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainerConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="rank=2"):
        ActivationConfig(rank=2, world_size=2)


def test_fit_rejects_mismatched_modules():
    model = tiny_model()
    wide = TopKTranscoder(TranscoderConfig(d_in=40, d_out=40, d_sae=64, k=4))
    with pytest.raises(ValueError, match="d_in=40"):
        fit(model, {"tc": (1, wide)}, tiny_tokens(8), TrainerConfig(train_tokens=64, batch_size=32, progress=False))
    other = TopKTranscoder(TranscoderConfig(d_in=32, d_out=32, d_sae=64, k=4, layer=0))
    with pytest.raises(ValueError, match="layer=0"):
        fit(model, {"tc": (1, other)}, tiny_tokens(8), TrainerConfig(train_tokens=64, batch_size=32, progress=False))


def test_loss_decreases_on_real_activations(default_model):
    """Two methods, one stream from SmolLM2's layer 12 MLP: held-out NMSE falls well
    below its value at initialisation, the training sites are recorded, and MxD rows stay unit-norm."""
    from mxd_lens.sources import load_default_corpus, token_rows

    tok = default_model.tokenizer
    train = token_rows(tok, load_default_corpus("train")[:40], context=64, max_rows=48)
    heldout = token_rows(tok, load_default_corpus("heldout")[:2], context=64, max_rows=8)
    torch.manual_seed(0)
    d = 576
    modules = {
        "mxd": (12, MxD(MxDConfig(d_in=d, d_out=d, d_hidden=128, n_experts=96, k=8, act_fn="silu", glu=True))),
        "tc": (12, TopKTranscoder(TranscoderConfig(d_in=d, d_out=d, d_sae=256, k=8))),
    }
    cfg = TrainerConfig(
        train_tokens=40 * 256, batch_size=256, lr=3e-3, warmup_steps=5, autocast=None, dead_tokens=2048,
        log_every=5, eval_every=20, progress=False, activations=ActivationConfig(buffer_tokens=1024),
    )
    summaries = fit(default_model, modules, train, cfg, eval_tokens=heldout)
    for name, s in summaries.items():
        module = modules[name][1]
        evals = [h["heldout_nmse"] for h in s.history if "heldout_nmse" in h]
        train_nmse = [h["nmse"] for h in s.history if "nmse" in h]
        assert s.steps == 40 and s.tokens == 40 * 256
        assert train_nmse[-1] < 0.8 * train_nmse[0], (name, train_nmse)
        # at initialisation the output is ~constant (MxD: D = 0), i.e. held-out NMSE ~1
        assert s.heldout_nmse < 0.9 and s.heldout_nmse < evals[0], (name, s.heldout_nmse, evals)
        assert module.cfg.hook_name == "blocks.12.ln2.hook_normalized"
        assert module.cfg.hook_name_out == "blocks.12.hook_mlp_out"
        assert module.cfg.layer == 12 and module.cfg.model_name == default_model.cfg.model_name
        assert s.target_mean.shape == (d,)
    torch.testing.assert_close(modules["mxd"][1].W_dec.norm(dim=1), torch.ones(96), rtol=1e-5, atol=1e-5)
