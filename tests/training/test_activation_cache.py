"""The activation disk cache: keyed on everything that changes the activations, and safe
when two processes fill the same cache at once (readers never see a partial shard)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mxd_lens.training import ActivationConfig, ActivationSource
from tests.training.helpers import tiny_model, tiny_tokens

ROOT = Path(__file__).resolve().parents[2]


def _key(model, tokens, layers=(1,), seed=0, **cfg):
    return ActivationSource(model, list(layers), tokens, ActivationConfig(cache_dir="unused", **cfg), seed=seed)._fingerprint()


def test_key_changes_with_everything_that_changes_the_activations():
    model = tiny_model(n_layers=3)
    tokens = tiny_tokens(8)
    base = _key(model, tokens)
    assert _key(tiny_model(n_layers=3), tokens.clone()) == base  # same weights, same ids: same key
    assert _key(model, tokens, keep_in_memory=False, check_site=False) == base  # no effect on the values

    changed = tokens.clone()
    changed[5, 7] += 1
    assert _key(model, changed) != base
    assert _key(model, tokens, layers=(0, 1)) != base
    assert _key(model, tokens, seed=1) != base  # another row order: other chunks
    assert _key(model, tokens, autocast="bfloat16") != base
    assert _key(model, tokens, store_dtype="bfloat16") != base
    assert _key(model, tokens, exclude_special_tokens=False) != base
    assert _key(model, tokens, world_size=2, rank=1) != base  # a shard is one worker's share

    # one weight anywhere before the collected layer's MLP output changes the key ...
    for name in ("embed.W_E", "blocks.0.attn.W_V", "blocks.1.attn.W_Q", "blocks.1.mlp.W_out", "blocks.1.mlp.W_gate"):
        other = tiny_model(n_layers=3)
        with torch.no_grad():
            other.get_parameter(name).view(-1)[-1] += 1e-3  # the LAST element: no prefix-only hashing
        assert _key(other, tokens) != base, name
    # ... and weights that run after it (a later block, the unembedding) do not
    other = tiny_model(n_layers=3)
    with torch.no_grad():
        other.blocks[2].mlp.W_in += 1.0
        other.unembed.W_U += 1.0
    assert _key(other, tokens) == base


def test_memory_mapped_tokens_are_hashed_like_the_same_tokens_in_memory(tmp_path):
    model = tiny_model()
    tokens = tiny_tokens(40)
    np.save(tmp_path / "t.npy", tokens.numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "t.npy", mmap_mode="c"))
    assert _key(model, mapped) == _key(model, tokens)
    # and the source serves the same pairs from the memory-mapped rows (what --dataset gives it)
    cfg = ActivationConfig(buffer_tokens=256)
    a = ActivationSource(model, [1], mapped, cfg, seed=3).chunk(1)[1]
    b = ActivationSource(model, [1], tokens, cfg, seed=3).chunk(1)[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_damaged_shard_is_collected_again_and_replaced(tmp_path):
    model = tiny_model()
    tokens = tiny_tokens(8)
    cfg = ActivationConfig(buffer_tokens=64, cache_dir=str(tmp_path), keep_in_memory=False)
    reference = ActivationSource(model, [1], tokens, ActivationConfig(buffer_tokens=64), seed=0).chunk(0)[1]
    first = ActivationSource(model, [1], tokens, cfg, seed=0)
    first.chunk(0)
    path = first._shard_path(0)
    assert (path.parent / "key.json").is_file()
    path.write_bytes(b"not a safetensors file")
    second = ActivationSource(model, [1], tokens, cfg, seed=0)
    with pytest.warns(UserWarning, match="unreadable"):
        x, y = second.chunk(0)[1]
    assert torch.equal(x, reference[0]) and torch.equal(y, reference[1])
    assert second.collected_tokens > 0
    assert torch.equal(load_file(str(path))["1.in"], reference[0])  # replaced by a whole shard


_WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import safetensors.torch
import mxd_lens.training.activations as activations
from mxd_lens.training import ActivationConfig, ActivationSource
from tests.training.helpers import tiny_model, tiny_tokens

def slow_save(tensors, path):
    # a slow disk: each shard takes 40 ms to write, so a reader polling the final name
    # would see it half-written if the final name were written in place
    data = safetensors.torch.save(tensors)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.04)
        f.write(data[len(data) // 2 :])

activations.save_file = slow_save
folder = Path({folder!r})
(folder / f"ready_{{sys.argv[1]}}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
cfg = ActivationConfig(buffer_tokens=64, cache_dir=str(folder / "cache"), keep_in_memory=False)
src = ActivationSource(tiny_model(), [0, 1], tiny_tokens(96), cfg, seed=4)
for c in range(src.n_chunks):  # the same order in both processes: they collide on every chunk
    src.chunk(c)
print("collected", src.collected_tokens // 16, "rows")
"""


def test_two_processes_filling_one_cache_at_once(tmp_path):
    """Two processes collect the same 24 chunks into one cache at the same moment, on a
    slow disk, while this process reads every shard the moment it appears (or is replaced):
    each shard read is whole and right, and the cache ends complete with no temporary
    files left."""
    model = tiny_model()
    tokens = tiny_tokens(96)
    ref_src = ActivationSource(model, [0, 1], tokens, ActivationConfig(buffer_tokens=64), seed=4)
    reference = {c: ref_src.chunk(c) for c in range(ref_src.n_chunks)}

    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER.format(root=str(ROOT), folder=str(tmp_path))))
    procs = [subprocess.Popen([sys.executable, str(script), str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready_{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (tmp_path / "go").touch()

    seen: set[tuple[str, int, int]] = set()  # (name, inode, mtime): a replaced shard is read again
    while True:
        done = all(p.poll() is not None for p in procs)
        for path in (tmp_path / "cache").glob("*/chunk_*.safetensors"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if (path.name, st.st_ino, st.st_mtime_ns) in seen:
                continue
            flat = load_file(str(path))  # a partial file would fail here or differ below
            chunk = int(path.stem.split("_")[1])
            for layer in (0, 1):
                assert torch.equal(flat[f"{layer}.in"], reference[chunk][layer][0])
                assert torch.equal(flat[f"{layer}.out"], reference[chunk][layer][1])
            seen.add((path.name, st.st_ino, st.st_mtime_ns))
        if done:
            break
        assert time.monotonic() < deadline
        time.sleep(0.002)
    outputs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    collected = [int(out.split()[1]) for out, _ in outputs]
    assert sum(collected) >= tokens.shape[0]  # every chunk's rows collected by someone
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.glob("chunk_*.safetensors")) == [f"chunk_{c:06d}.safetensors" for c in reference]
    assert len({name for name, _, _ in seen}) == len(reference)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    # a third source is served entirely from the cache
    again = ActivationSource(model, [0, 1], tokens, ActivationConfig(buffer_tokens=64, cache_dir=str(tmp_path / "cache")),
                             seed=4)
    for c in reference:
        assert torch.equal(again.chunk(c)[1][0], reference[c][1][0])
    assert again.collected_tokens == 0
