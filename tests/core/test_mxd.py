"""MxD held to the paper's math: the lemma, full-rank experts, sparsity, sparse == dense."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mxd_lens import MxD, MxDConfig
from mxd_lens.functional import ACT_FNS

from . import reference as ref

# Odd, mutually different sizes so that a transposed weight cannot go unnoticed.
D_IN, D_OUT, D_HIDDEN, N_EXPERTS, K = 7, 5, 11, 13, 3


def make_mxd(act_fn: str = "gelu", glu: bool = False, seed: int = 0, **sizes) -> MxD:
    """A float64 MxD with every parameter random and nonzero (D is 0 at init)."""
    cfg = dict(d_in=D_IN, d_out=D_OUT, d_hidden=D_HIDDEN, n_experts=N_EXPERTS, k=K)
    cfg.update(sizes)
    torch.manual_seed(seed)
    mxd = MxD(MxDConfig(**cfg, act_fn=act_fn, glu=glu, dtype="float64"))
    with torch.no_grad():
        for p in mxd.parameters():
            p.copy_(torch.randn_like(p))
    return mxd


def inputs(n_tokens: int = 9, d_in: int = D_IN, seed: int = 1, batch: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d_in, generator=g, dtype=torch.float64)
    return x.reshape(3, n_tokens // 3, d_in) if batch else x


def unselected(mxd: MxD, x: torch.Tensor) -> torch.Tensor:
    """Per token, one expert that TopK did not select (by the reference's own TopK)."""
    mask = ref.topk_mask(mxd.gate_pre(x), mxd.cfg.k)
    return (mask == 0).to(torch.int64).argmax(-1)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("act_fn", sorted(ACT_FNS))
def test_lemma_output_is_explicit_sum_of_full_rank_experts(act_fn: str, glu: bool) -> None:
    mxd = make_mxd(act_fn, glu)
    x = inputs()
    with torch.no_grad():
        assert_close(mxd(x), ref.mxd_forward(mxd, x))
        # The hooked (dense) path computes the same thing.
        mxd.hook_expert_acts.add_hook(lambda a, hook: a)
        try:
            assert_close(mxd(x), ref.mxd_forward(mxd, x))
        finally:
            mxd.reset_hooks()


def test_bias_is_a_constant_added_to_the_expert_sum() -> None:
    mxd = make_mxd(glu=True)
    x = inputs()
    with torch.no_grad():
        before = mxd(x)
        shift = torch.randn(D_OUT, dtype=torch.float64)
        mxd.b_dec.add_(shift)
        assert_close(mxd(x) - before, shift.expand_as(before))


def test_leading_batch_dimensions_are_kept() -> None:
    mxd = make_mxd(glu=True)
    x = inputs(batch=True)
    with torch.no_grad():
        y = mxd(x)
        assert y.shape == (*x.shape[:-1], D_OUT)
        assert_close(y.reshape(-1, D_OUT), ref.mxd_forward(mxd, x.reshape(-1, D_IN)))


@pytest.mark.parametrize("d_hidden,d_out", [(11, 5), (5, 11), (8, 8)])
def test_experts_are_full_rank(d_hidden: int, d_out: int) -> None:
    mxd = make_mxd(d_hidden=d_hidden, d_out=d_out)
    with torch.no_grad():
        # c_n uniform away from zero: no zero entry.
        mxd.W_dec.copy_(
            torch.empty_like(mxd.W_dec).uniform_(0.5, 1.5) * torch.sign(torch.randn_like(mxd.W_dec))
        )
        for n in range(mxd.cfg.n_experts):
            w = mxd.expert_weight(n)
            assert w.shape == (d_hidden, d_out)
            assert_close(w, ref.expert_weight(mxd, n))
            assert int(torch.linalg.matrix_rank(w)) == min(d_hidden, d_out)


def test_expert_weight_rejects_out_of_range_index() -> None:
    mxd = make_mxd()
    for n in (-1, N_EXPERTS):
        with pytest.raises(ValueError, match=f"n={n}"):
            mxd.expert_weight(n)


@pytest.mark.parametrize("k", [1, K, N_EXPERTS])
def test_at_most_k_active_per_token_and_they_are_the_top_k(k: int) -> None:
    mxd = make_mxd(k=k)
    x = inputs(n_tokens=30, batch=True)
    _, cache = mxd.run_with_cache(x)
    acts = cache["hook_expert_acts"]
    assert acts.shape == (*x.shape[:-1], N_EXPERTS)
    assert int((acts != 0).sum(-1).max()) <= k
    # Bias the gate so every logit is positive: then exactly k are active.
    with torch.no_grad():
        mxd.b_enc.add_(100.0)
    _, cache = mxd.run_with_cache(x)
    assert ((cache["hook_expert_acts"] != 0).sum(-1) == k).all()
    mask = ref.topk_mask(cache["hook_gate_pre"], k)
    assert torch.equal(cache["hook_expert_acts"] != 0, mask.bool())


def grads(mxd: MxD, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = forward(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    names = [n for n, _ in mxd.named_parameters()]
    params = [p for _, p in mxd.named_parameters()]
    g = torch.autograd.grad((y * weights).sum(), [x, *params])
    return y.detach(), {"input": g[0], **dict(zip(names, g[1:]))}


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("act_fn", ["gelu", "silu"])
def test_sparse_path_equals_dense_reference_forward_and_gradients(act_fn: str, glu: bool) -> None:
    mxd = make_mxd(act_fn, glu)
    x = inputs(n_tokens=12)
    assert not mxd.hook_expert_acts._forward_hooks  # the sparse (embedding_bag) path
    y, g = grads(mxd, x, mxd)
    y_ref, g_ref = grads(mxd, x, lambda x: ref.mxd_forward(mxd, x))
    assert_close(y, y_ref)
    assert set(g) == {"input", "W_hidden", "b_hidden", "W_out", "W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"W_hidden_lin"} if glu else set()
    )
    for name in g:
        assert_close(g[name], g_ref[name], msg=lambda m, name=name: f"gradient of {name}: {m}")
    # Only the selected rows of C get a gradient.
    used = ref.topk_mask(mxd.gate_pre(x), K).bool().any(0)
    assert (g["W_dec"][~used] == 0).all() and (g["W_dec"][used] != 0).any(-1).all()


def test_hook_switching_on_an_unselected_expert_adds_exactly_its_term() -> None:
    mxd = make_mxd("silu", glu=True)
    x = inputs(n_tokens=12)
    n = unselected(mxd, x)
    value = 2.5

    def switch_on(acts: torch.Tensor, hook) -> torch.Tensor:
        assert (acts.gather(-1, n[:, None]) == 0).all()
        return acts.scatter(-1, n[:, None], value)

    with torch.no_grad():
        clean = mxd(x)
        edited = mxd.run_with_hooks(x, fwd_hooks=[("hook_expert_acts", switch_on)])
        dense_out = ref.mxd_hidden(mxd, x) @ mxd.W_out  # D^T z
        assert_close(edited - clean, value * mxd.W_dec[n] * dense_out)
        acts = ref.mxd_expert_acts(mxd, x).scatter(-1, n[:, None], value)
        assert_close(edited, ref.mxd_forward(mxd, x, acts=acts))


def test_backward_hook_sees_the_dense_gradient_of_every_expert() -> None:
    mxd = make_mxd("gelu", glu=True)
    x = inputs(n_tokens=12)
    seen: list[torch.Tensor] = []
    mxd.hook_expert_acts.add_hook(lambda grad, hook: seen.append(grad.detach().clone()), dir="bwd")
    try:
        y = mxd(x)
        weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
        (y * weights).sum().backward()
    finally:
        mxd.reset_hooks()
    assert len(seen) == 1
    with torch.no_grad():
        # d (sum w * y) / d a_n = sum_o w_o c_n,o (D^T z)_o, for selected and unselected n alike.
        by_hand = (weights * (ref.mxd_hidden(mxd, x) @ mxd.W_out)) @ mxd.W_dec.T
    assert_close(seen[0], by_hand)
    n = unselected(mxd, x)
    assert (seen[0].gather(-1, n[:, None]) != 0).all()


def test_double_and_bfloat16_conversions() -> None:
    torch.manual_seed(0)
    mxd = MxD(MxDConfig(d_in=D_IN, d_out=D_OUT, d_hidden=D_HIDDEN, n_experts=N_EXPERTS, k=K, glu=True))
    with torch.no_grad():
        mxd.W_out.normal_()
    x = inputs().float()
    y32 = mxd(x)
    assert y32.dtype == torch.float32
    mxd.double()
    assert all(p.dtype == torch.float64 for p in mxd.parameters())
    y64 = mxd(x)  # float32 input is cast to the module's dtype
    assert y64.dtype == torch.float64
    assert_close(y64, ref.mxd_forward(mxd, x.double()))
    assert_close(y64.float(), y32, rtol=1e-5, atol=1e-5)
    mxd.to(torch.bfloat16)
    y16 = mxd(x)
    assert y16.dtype == torch.bfloat16
    assert_close(y16.double(), y64, rtol=0.05, atol=0.05)


def test_init_follows_the_paper() -> None:
    torch.manual_seed(0)
    mxd = MxD(MxDConfig(d_in=D_IN, d_out=D_OUT, d_hidden=D_HIDDEN, n_experts=N_EXPERTS, k=K))
    assert (mxd.W_out == 0).all()  # D = 0: the layer starts at its bias
    assert_close(mxd.W_dec.norm(dim=-1), torch.ones(N_EXPERTS))
    assert (mxd.W_dec.abs() <= 1).all() and (mxd.b_dec == 0).all()
    bound = D_IN**-0.5
    for p in (mxd.W_hidden, mxd.b_hidden, mxd.W_enc, mxd.b_enc):
        assert (p.abs() <= bound).all() and p.std() > bound / 4
    assert_close(mxd(inputs().float()), mxd.b_dec.expand(9, D_OUT))


def test_expert_row_normalisation_and_parallel_gradient_removal() -> None:
    mxd = make_mxd(glu=True)
    x = inputs()
    mxd(x).pow(2).sum().backward()
    grad_before = mxd.W_dec.grad.clone()
    rows = mxd.W_dec.detach().clone()
    mxd.remove_parallel_grads_()
    unit = rows / rows.norm(dim=-1, keepdim=True)
    assert_close((mxd.W_dec.grad * unit).sum(-1), torch.zeros(N_EXPERTS, dtype=torch.float64))
    # What remains is the orthogonal part of the old gradient.
    assert_close(mxd.W_dec.grad, grad_before - (grad_before * unit).sum(-1, keepdim=True) * unit)
    mxd.normalize_experts_()
    assert_close(mxd.W_dec.norm(dim=-1), torch.ones(N_EXPERTS, dtype=torch.float64))
    assert_close(mxd.W_dec.detach(), unit)


def test_input_width_mismatch_names_both_sizes() -> None:
    mxd = make_mxd()
    with pytest.raises(ValueError, match=rf"d_in={D_IN}.*last dimension {D_IN + 1}"):
        mxd(torch.randn(4, D_IN + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"d_in={D_IN}.*last dimension {D_IN + 1}"):
        mxd.reconstruct(torch.randn(4, D_IN + 1, dtype=torch.float64))


def autograd_ops(y: torch.Tensor) -> set[str]:
    """Names of every backward node that produced y."""
    seen, stack, names = set(), [y.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def test_mixing_is_sparse_without_hooks_and_dense_through_a_hook() -> None:
    mxd = make_mxd()
    x = inputs()
    assert any("EmbeddingBag" in name for name in autograd_ops(mxd(x)))
    mxd.hook_expert_acts.add_hook(lambda a, hook: a)
    try:
        assert not any("EmbeddingBag" in name for name in autograd_ops(mxd(x)))
    finally:
        mxd.reset_hooks()
    assert any("EmbeddingBag" in name for name in autograd_ops(mxd(x)))
