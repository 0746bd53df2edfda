"""Running the model around layer L (`mxd_lens.model_io`): the prefix and its resumption
equal a full forward pass, with shortformer positions and attention masks kept, also
when the batch is repeated; module-hook captures and constant outputs of blocks[L].mlp."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mxd_lens.model_io import capture_mlp_io, constant_mlp_outputs, post_mlp_norm, run_prefix


def tiny(**overrides) -> HookedTransformer:
    cfg = dict(n_layers=3, d_model=16, d_mlp=24, n_ctx=12, d_head=4, n_heads=4, d_vocab=29, act_fn="gelu",
               normalization_type="LN", seed=0)  # fmt: skip
    cfg.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    model.eval()
    return model


TOKENS = torch.randint(0, 29, (3, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(3, 10, dtype=torch.long)
MASK[1, :4] = 0  # a left-padded row
MASK[2, :1] = 0


@pytest.mark.parametrize("pos", ["standard", "shortformer", "rotary"])
@pytest.mark.parametrize("masked", [False, True])
def test_prefix_and_resume_equal_a_full_forward(pos, masked):
    model = tiny(positional_embedding_type=pos)
    mask = MASK if masked else None
    with torch.no_grad():
        full = model(TOKENS, attention_mask=mask)
        for start in range(3):
            prefix = run_prefix(model, TOKENS, start, attention_mask=mask)
            torch.testing.assert_close(prefix.resume(model), full, rtol=1e-5, atol=1e-5)
            # stop_at_layer: the residual entering that layer, as a full forward stopped there
            torch.testing.assert_close(
                prefix.resume(model, stop_at_layer=start + 1),
                model(TOKENS, attention_mask=mask, stop_at_layer=start + 1),
                rtol=1e-5, atol=1e-5,
            )  # fmt: skip
            # the batch repeated: every copy is the batch's own forward pass
            copies = prefix.repeat(4)
            assert copies.rows == 12
            torch.testing.assert_close(copies.resume(model).view(4, *full.shape), full.expand(4, *full.shape),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
    if masked:  # the mask matters, so dropping it would have been caught
        assert not torch.allclose(model(TOKENS)[1], full[1], atol=1e-3)


def test_mlp_io_and_constant_outputs_are_the_module_itself():
    model = tiny(normalization_type="RMS", use_normalization_before_and_after=True)
    seen = {}
    mlp = model.blocks[1].mlp
    handles = [
        mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach())),
        mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out.detach())),
    ]
    with torch.no_grad(), capture_mlp_io(model, [1, 2]) as io:
        clean = model(TOKENS)
    for h in handles:
        h.remove()
    assert set(io) == {1, 2} and not mlp._forward_hooks  # hooks gone after the context
    assert torch.equal(io[1][0], seen["x"]) and torch.equal(io[1][1], seen["y"])
    with torch.no_grad():
        torch.testing.assert_close(mlp(io[1][0]), io[1][1])
        mean = io[1][1].mean((0, 1))
        with constant_mlp_outputs(model, {1: None, 2: mean}), capture_mlp_io(model, [1, 2]) as ablated:
            out = model(TOKENS)
        assert not torch.allclose(out, clean)
        assert (ablated[1][1] == 0).all() and torch.equal(ablated[2][1], mean.expand_as(ablated[2][1]))
    assert post_mlp_norm(model) is not None and post_mlp_norm(tiny()) is None
    assert "Olmo2" in post_mlp_norm(tiny(normalization_type="RMS", original_architecture="Olmo2ForCausalLM"))


def test_run_prefix_refuses_a_layer_out_of_range():
    with pytest.raises(ValueError, match=r"start=3 is out of range: the model has layers 0..2"):
        run_prefix(tiny(), TOKENS, 3)
