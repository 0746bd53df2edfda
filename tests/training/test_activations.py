"""The activation source: aligned MLP input/output pairs, refusals, sharding, caching, positions."""

from __future__ import annotations

import pytest
import torch

from mxd_lens.training import ActivationConfig, ActivationSource, NonFiniteActivationError
from tests.training.helpers import tiny_model, tiny_tokens


def _cache_pairs(model, tokens, layer):
    _, cache = model.run_with_cache(
        tokens, names_filter=[f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"]
    )
    d = model.cfg.d_model
    return (
        cache[f"blocks.{layer}.ln2.hook_normalized"].reshape(-1, d),
        cache[f"blocks.{layer}.hook_mlp_out"].reshape(-1, d),
    )


def _assert_stream_aligned(batches, x_ref, y_ref, n_expected):
    """Every served (x, y) pair is an (input, output) pair of the reference, and together
    they are the reference's pairs (as a multiset: rows share their position-0 token)."""
    xs, ys = [], []
    for x, y in batches:
        # locate each served input among the reference inputs, then demand its own output
        idx = torch.cdist(x.double(), x_ref.double()).argmin(1)
        torch.testing.assert_close(x, x_ref[idx], rtol=0, atol=0)
        torch.testing.assert_close(y, y_ref[idx], rtol=0, atol=0)
        xs.append(x)
        ys.append(y)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    assert x_all.shape[0] == n_expected == x_ref.shape[0]
    torch.testing.assert_close(x_all.double().sum(0), x_ref.double().sum(0))
    torch.testing.assert_close(y_all.double().pow(2).sum(0), y_ref.double().pow(2).sum(0))


def test_real_model_pairs_equal_run_with_cache(default_model):
    from mxd_lens.sources import load_default_corpus, token_rows

    tokens = token_rows(default_model.tokenizer, load_default_corpus("train")[:3], context=32, max_rows=4)
    # every position, special ones included (the trainer's default excludes them)
    cfg = ActivationConfig(buffer_tokens=64, model_batch_rows=3, exclude_special_tokens=False)
    src = ActivationSource(default_model, [3, 12], tokens, cfg, seed=1)
    assert src.chunk_rows == 2 and src.n_chunks == 2
    for layer in (3, 12):
        x_ref, y_ref = _cache_pairs(default_model, tokens, layer)
        # the pairs are the true input/output of the module attach() replaces
        with torch.no_grad():
            torch.testing.assert_close(default_model.blocks[layer].mlp(x_ref), y_ref, rtol=1e-5, atol=1e-5)
        stream = src.batches(32)
        batches = [next(stream)[1][layer] for _ in range(4)]
        _assert_stream_aligned(batches, x_ref, y_ref, n_expected=128)


def test_tiny_model_pairs_and_shuffling():
    model = tiny_model()
    tokens = tiny_tokens(12)
    src = ActivationSource(model, [1], tokens, ActivationConfig(buffer_tokens=64), seed=0)
    x_ref, y_ref = _cache_pairs(model, tokens, 1)
    stream = src.batches(16)
    pairs = [next(stream)[1][1] for _ in range(12)]
    _assert_stream_aligned(pairs, x_ref, y_ref, n_expected=192)
    # the stream is shuffled: the first batch is not 16 consecutive tokens of one row
    first = torch.cdist(pairs[0][0].double(), x_ref.double()).argmin(1)
    assert (first.diff() != 1).any()


def test_positions_resume_the_stream_exactly():
    model = tiny_model()
    src = ActivationSource(model, [0, 1], tiny_tokens(10), ActivationConfig(buffer_tokens=48), seed=3)
    full = src.batches(16)
    reference = [next(full) for _ in range(25)]  # crosses chunk and epoch boundaries
    position = reference[9][0]
    again = ActivationSource(model, [0, 1], tiny_tokens(10), ActivationConfig(buffer_tokens=48), seed=3)
    resumed = again.batches(16, position)
    for pos, batch in reference[10:]:
        pos2, batch2 = next(resumed)
        assert pos2 == pos
        for layer in (0, 1):
            assert torch.equal(batch[layer][0], batch2[layer][0]) and torch.equal(batch[layer][1], batch2[layer][1])
    assert reference[-1][0].epoch >= 1


def test_shards_partition_the_rows():
    model = tiny_model()
    tokens = tiny_tokens(11)
    shards = [ActivationSource(model, [1], tokens, ActivationConfig(rank=r, world_size=3), seed=5).rows for r in range(3)]
    joined = torch.cat(shards)
    assert sorted(joined.tolist()) == list(range(11))


def test_buffer_bound_in_bytes():
    model = tiny_model()
    cfg = ActivationConfig(buffer_tokens=100, store_dtype="bfloat16")
    src = ActivationSource(model, [0, 1], tiny_tokens(20), cfg)
    # 6 rows of 16 tokens fit in 100 tokens; 2 layers x (in + out) x 32 x 2 bytes per token
    assert src.buffer_bytes == 6 * 16 * 2 * 2 * 32 * 2
    x, _ = src.chunk(0)[0]
    assert x.dtype == torch.bfloat16 and x.shape == (96, 32)


def test_refusals_name_the_reason():
    """Every normalisation scheme is served (tests/training/test_sites.py); what is left
    to refuse is a layer, model or token matrix that has nothing to collect."""
    from mxd_lens import TopKTranscoder, TranscoderConfig, attach

    with pytest.raises(ValueError, match="layer=2 is out of range"):
        ActivationSource(tiny_model(), [2], tiny_tokens(4))
    with pytest.raises(ValueError, match="no MLP to replace"):
        ActivationSource(tiny_model(attn_only=True), [0], tiny_tokens(4))
    with pytest.raises(ValueError, match="layers is empty"):
        ActivationSource(tiny_model(), [], tiny_tokens(4))
    with pytest.raises(ValueError, match="integer token ids"):
        ActivationSource(tiny_model(), [0], tiny_tokens(4).float())
    with pytest.raises(ValueError, match=r"vocabulary is \[0, 61\)"):
        ActivationSource(tiny_model(), [0], tiny_tokens(4) + 61)
    model = tiny_model()
    with attach(model, {1: TopKTranscoder(TranscoderConfig(d_in=32, d_out=32, d_sae=8, k=2))}):
        with pytest.raises(ValueError, match="replacement attached"):
            ActivationSource(model, [1], tiny_tokens(4))


def test_captures_the_mlp_itself_not_the_hooks_after_it():
    """A hook that edits hook_mlp_out (after the MLP) does not change the pairs: they are
    the module's own input and output, the thing `attach` replaces."""
    model = tiny_model()
    tokens = tiny_tokens(4)
    plain = ActivationSource(model, [1], tokens, ActivationConfig(shuffle_rows=False)).chunk(0)[1]
    model.blocks[1].hook_mlp_out.add_perma_hook(lambda act, hook: act * 2)
    try:
        edited = ActivationSource(model, [1], tokens, ActivationConfig(shuffle_rows=False)).chunk(0)[1]
    finally:
        model.reset_hooks(including_permanent=True)
    assert torch.equal(plain[0], edited[0]) and torch.equal(plain[1], edited[1])


def test_refuses_an_mlp_that_is_not_a_function_of_its_input():
    """The first-batch check: blocks[L].mlp(captured input) must give the captured output,
    else no replacement could stand in for the MLP (here: noise injected inside it)."""
    model = tiny_model()
    model.blocks[1].mlp.hook_post.add_perma_hook(lambda act, hook: act + torch.randn_like(act))
    try:
        src = ActivationSource(model, [1], tiny_tokens(4))
        with pytest.raises(ValueError, match="differs from its captured output"):
            src.chunk(0)
        unchecked = ActivationSource(model, [1], tiny_tokens(4), ActivationConfig(check_site=False))
        unchecked.chunk(0)  # check_site=False skips the check
    finally:
        model.reset_hooks(including_permanent=True)


def test_rejects_non_finite_activations():
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn.W_V[0, 0, 0] = float("nan")
    src = ActivationSource(model, [1], tiny_tokens(4))
    with pytest.raises(NonFiniteActivationError, match="NaN/inf"):
        src.chunk(0)


def test_disk_cache_serves_later_runs_without_the_model(tmp_path):
    model = tiny_model()
    tokens = tiny_tokens(8)
    cfg = ActivationConfig(buffer_tokens=64, cache_dir=str(tmp_path), keep_in_memory=False)
    first = ActivationSource(model, [1], tokens, cfg, seed=2)
    data = [first.chunk(i)[1] for i in range(first.n_chunks)]
    assert len(list(tmp_path.rglob("chunk_*.safetensors"))) == first.n_chunks
    # the second source must not run the model at all (every weight it keys on is unchanged)
    second = ActivationSource(model, [1], tokens, cfg, seed=2)
    model.forward = lambda *a, **k: pytest.fail("the model ran although every chunk is cached")
    for i, (x, y) in enumerate(data):
        x2, y2 = second.chunk(i)[1]
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert second.collected_tokens == 0
