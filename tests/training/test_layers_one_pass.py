"""Modules at several layers from ONE forward pass per batch of rows, special positions
excluded from training, and the data-parallel stream's shares reassembling the
one-process batches (the layout behind `fit`'s equivalence under torchrun)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mxd_lens.training.trainer as trainer_mod
from mxd_lens import TopKTranscoder, TranscoderConfig
from mxd_lens.model_io import special_positions, special_token_ids
from mxd_lens.training import ActivationConfig, ActivationSource, TrainerConfig, fit
from tests.training.helpers import tiny_model, tiny_tokens

LAYERS = (2, 7, 11)
ROWS, CTX = 12, 32


@pytest.fixture(scope="module")
def rows(default_model):
    from mxd_lens.sources import load_default_corpus, token_rows

    return token_rows(default_model.tokenizer, load_default_corpus("train")[:4], context=CTX, max_rows=ROWS)


def _reference_pairs(model, tokens, layer):
    """The MLP's own input and output by TransformerLens's named hooks (the default model
    is pre-norm with folded norms: ln2's output is the MLP input), every position."""
    names = [f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    d = model.cfg.d_model
    return cache[names[0]].reshape(-1, d), cache[names[1]].reshape(-1, d)


def test_three_layers_train_from_one_pass_per_batch(default_model, rows, monkeypatch):
    model = default_model
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    served: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in LAYERS}
    real_step = trainer_mod._train_step

    def recording_step(run, x, y, *args, **kwargs):
        served[run.layer].append((x.detach().clone(), y.detach().clone()))
        return real_step(run, x, y, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "_train_step", recording_step)
    torch.manual_seed(0)
    d = model.cfg.d_model
    modules = {f"tc_l{layer}": (layer, TopKTranscoder(TranscoderConfig(d_in=d, d_out=d, d_sae=32, k=4))) for layer in LAYERS}
    kept_per_chunk = 4 * (CTX - 1)  # 4 rows a chunk, each row's separator (token 0) excluded
    cfg = TrainerConfig(
        train_tokens=8 * 62, batch_size=62, warmup_steps=1, autocast=None, progress=False,
        activations=ActivationConfig(buffer_tokens=4 * CTX, model_batch_rows=4, autocast=None),
    )
    try:
        result = fit(model, modules, rows, cfg)
    finally:
        handle.remove()
    # one language-model pass per batch of 4 rows feeds all three layers; the 3 chunks are
    # kept in memory, so the second epoch (steps 7-8) runs no model at all
    assert forwards == [4, 4, 4]
    assert result.memory["buffer_bytes_per_layer"] == 4 * CTX * 2 * d * 4
    assert result.memory["buffer_bytes"] == 3 * result.memory["buffer_bytes_per_layer"]

    ids = special_token_ids(model)
    special = special_positions(rows, ids).flatten()
    assert ids and special.sum() == ROWS  # every row starts with the separator
    for layer in LAYERS:
        x_ref, y_ref = _reference_pairs(model, rows, layer)
        first_epoch = served[layer][: 3 * kept_per_chunk // 62]
        x = torch.cat([b[0] for b in first_epoch])
        y = torch.cat([b[1] for b in first_epoch])
        # each served pair is the MLP's own (input, output) at one position...
        where = torch.cdist(x.double(), x_ref.double()).argmin(1)
        torch.testing.assert_close(x, x_ref[where], rtol=1e-5, atol=1e-5)
        # (per token, relative: the model ran on 4 rows here and 12 there, and ||y|| reaches
        # ~1,700 at layer 11, so float rounding differs by ~3e-5 of a token's norm)
        assert ((y - y_ref[where]).norm(dim=-1) / y_ref[where].norm(dim=-1)).max() < 1e-4
        with torch.no_grad():
            assert ((model.blocks[layer].mlp(x) - y).norm(dim=-1) / y.norm(dim=-1)).max() < 1e-4
        # ...and one epoch serves every non-special position exactly once, no special one
        assert sorted(where.tolist()) == (~special).nonzero().flatten().tolist()


def test_special_positions_are_excluded_by_default(default_model, rows):
    layer = 11  # the attention-sink layer: its MLP output at the separator is massive
    cfg = ActivationConfig(buffer_tokens=ROWS * CTX, shuffle_rows=False)
    excluded = ActivationSource(default_model, [layer], rows, cfg)
    included = ActivationSource(default_model, [layer], rows, dataclasses.replace(cfg, exclude_special_tokens=False))
    _, y_ex = excluded.chunk(0)[layer]
    _, y_in = included.chunk(0)[layer]
    assert y_in.shape[0] == ROWS * CTX and y_ex.shape[0] == ROWS * (CTX - 1)
    _, y_ref = _reference_pairs(default_model, rows, layer)
    keep = ~special_positions(rows, special_token_ids(default_model)).flatten()
    assert ((y_ex - y_ref[keep]).norm(dim=-1) / y_ref[keep].norm(dim=-1)).max() < 1e-4
    # what the exclusion removes: the 12 separator positions hold most of sum ||y||^2
    # (~85% on these rows; a few massive activations remain at ordinary tokens)
    assert y_in.pow(2).sum() > 4 * y_ex.pow(2).sum()


@pytest.mark.parametrize("world_size", [2, 3])
def test_worker_shares_reassemble_the_one_process_batches(world_size):
    model = tiny_model()
    tokens = tiny_tokens(11, seed=4)
    tokens[:, 0] = 0
    tokens[3, 5] = 0  # an excluded position inside a row too: per-worker counts differ

    def source(rank: int, world: int) -> ActivationSource:
        src = ActivationSource(model, [0, 1], tokens, ActivationConfig(buffer_tokens=64, rank=rank, world_size=world), seed=7)
        src.excluded_ids = [0]  # the tiny model has no tokenizer: exclude token 0 by hand
        return src

    single = source(0, 1).shares(40)
    workers = [source(r, world_size).shares(40) for r in range(world_size)]
    rows = [source(r, world_size).rows.tolist() for r in range(world_size)]
    assert sorted(sum(rows, [])) == list(range(11)) and all(rows)
    for _ in range(14):  # several chunks and epochs
        whole = next(single)
        parts = [next(w) for w in workers]
        assert all(p.position == whole.position for p in parts)
        slots = torch.cat([p.slots for p in parts])
        assert sorted(slots.tolist()) == list(range(40))
        for layer in (0, 1):
            x = torch.cat([p.data[layer][0] for p in parts])
            y = torch.cat([p.data[layer][1] for p in parts])
            assert torch.equal(x, whole.data[layer][0][slots]) and torch.equal(y, whole.data[layer][1][slots])
