"""TopK and skip transcoders held to a dense reference."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mxd_lens import SkipTranscoder, TopKTranscoder, TranscoderConfig

from . import reference as ref

D_IN, D_OUT, D_SAE, K = 7, 5, 19, 4


def make(cls=TopKTranscoder, seed: int = 0, **overrides):
    """A float64 transcoder with every parameter random and nonzero."""
    torch.manual_seed(seed)
    cfg = dict(d_in=D_IN, d_out=D_OUT, d_sae=D_SAE, k=K, dtype="float64")
    cfg.update(overrides)
    tc = cls(TranscoderConfig(**cfg))
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p))
    return tc


def inputs(n_tokens: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n_tokens, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(tc, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = forward(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    names, params = zip(*tc.named_parameters())
    g = torch.autograd.grad((y * w).sum(), [x, *params])
    return y.detach(), {"input": g[0], **dict(zip(names, g[1:]))}


@pytest.mark.parametrize("cls", [TopKTranscoder, SkipTranscoder])
def test_forward_and_gradients_equal_the_dense_reference(cls) -> None:
    tc = make(cls)
    x = inputs()
    y, g = grads(tc, x, tc)
    y_ref, g_ref = grads(tc, x, lambda x: ref.transcoder_forward(tc, x))
    assert_close(y, y_ref)
    expected = {"input", "W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"W_skip"} if cls is SkipTranscoder else set()
    )
    assert set(g) == expected
    for name in g:
        assert_close(g[name], g_ref[name], msg=lambda m, name=name: f"gradient of {name}: {m}")
    # The hooked (dense) path agrees too.
    with torch.no_grad():
        hooked = tc.run_with_hooks(x, fwd_hooks=[("hook_latent_acts", lambda a, hook: a)])
    assert_close(hooked, y_ref)


def test_skip_term_is_present_and_is_W_skip_x() -> None:
    skip = make(SkipTranscoder)
    plain = make(TopKTranscoder)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(getattr(skip, name))
    x = inputs()
    with torch.no_grad():
        assert_close(skip(x) - plain(x), x @ skip.W_skip.T)
        assert (x @ skip.W_skip.T).abs().min() > 0
    assert skip.W_skip.shape == (D_OUT, D_IN)  # SAE-Lens layout
    fresh = SkipTranscoder(TranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=D_SAE, k=K))
    assert (fresh.W_skip == 0).all()


def test_at_most_k_latents_active_and_hook_edit_adds_the_decoder_row() -> None:
    tc = make()
    x = inputs(30)
    _, cache = tc.run_with_cache(x)
    acts = cache["hook_latent_acts"]
    assert acts.shape == (30, D_SAE) and int((acts != 0).sum(-1).max()) <= K
    assert torch.equal(acts != 0, (ref.dense_topk_relu(cache["hook_latent_pre"], K) != 0))
    n = (acts == 0).to(torch.int64).argmax(-1)
    with torch.no_grad():
        edited = tc.run_with_hooks(
            x, fwd_hooks=[("hook_latent_acts", lambda a, hook: a.scatter(-1, n[:, None], 3.0))]
        )
        assert_close(edited - tc(x), 3.0 * tc.W_dec[n])


def test_init_and_input_width_error() -> None:
    torch.manual_seed(0)
    tc = TopKTranscoder(TranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=D_SAE, k=K))
    assert_close(tc.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))
    assert (tc.b_enc == 0).all() and (tc.b_dec == 0).all()
    assert tc.n_units == D_SAE and tc.acts_hook is tc.hook_latent_acts
    with pytest.raises(ValueError, match=rf"d_in={D_IN}.*last dimension 3"):
        tc(torch.randn(2, 3))
