"""CUDA paths: collection, the activation cache and training with the model and modules on
the GPU, held to the CPU results. Marked `cuda`: skipped, with the reason, where there is no
CUDA device (tests/conftest.py); the CPU tests of the same code run everywhere regardless.
`benchmarks/gpu_check.sh` runs them on the lent GPU machine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mxd_lens.training import ActivationConfig, ActivationSource, TrainerConfig, fit
from tests.training.helpers import tiny_model, tiny_modules, tiny_tokens

pytestmark = pytest.mark.cuda


def _on(model, device):
    return copy.deepcopy(model).to(device)


def test_collection_on_cuda_equals_cpu_and_lands_on_the_host():
    model = tiny_model(n_layers=3)
    tokens = tiny_tokens(8)
    cfg = ActivationConfig(buffer_tokens=64, shuffle_rows=False)
    cpu = ActivationSource(model, [0, 2], tokens, cfg).collect(torch.arange(8))
    gpu_src = ActivationSource(_on(model, "cuda"), [0, 2], tokens, cfg)
    gpu = gpu_src.collect(torch.arange(8))
    for layer in (0, 2):
        for a, b in zip(cpu[layer], gpu[layer]):
            assert b.device.type == "cpu"  # buffers live on the host; batches are copied over
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # the pair is the MLP's own input and output on the device
    x, y = gpu[2]
    with torch.no_grad():
        again = gpu_src.model.blocks[2].mlp(x[:16].cuda().view(1, 16, -1)).view(16, -1)
    torch.testing.assert_close(again.cpu(), y[:16], rtol=1e-4, atol=1e-5)


def test_autocast_auto_picks_bfloat16_on_cuda():
    from mxd_lens.precision import resolve_autocast

    assert resolve_autocast("auto", "cuda") == torch.bfloat16


def test_cache_key_ignores_the_device_and_serves_a_cuda_run(tmp_path):
    model = tiny_model()
    tokens = tiny_tokens(8)
    cfg = ActivationConfig(buffer_tokens=64, cache_dir=str(tmp_path), keep_in_memory=False)
    cpu = ActivationSource(model, [1], tokens, cfg)
    gpu = ActivationSource(_on(model, "cuda"), [1], tokens, cfg)
    assert cpu._fingerprint() == gpu._fingerprint()
    first = cpu.chunk(0)[1]
    assert torch.equal(gpu.chunk(0)[1][0], first[0]) and gpu.collected_tokens == 0


def test_memory_mapped_tokens_feed_a_cuda_model(tmp_path):
    tokens = tiny_tokens(8)
    np.save(tmp_path / "t.npy", tokens.numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "t.npy", mmap_mode="c"))
    model = _on(tiny_model(), "cuda")
    cfg = ActivationConfig(buffer_tokens=64, shuffle_rows=False)
    a = ActivationSource(model, [1], mapped, cfg).collect(torch.arange(8))[1][0]
    b = ActivationSource(model, [1], tokens, cfg).collect(torch.arange(8))[1][0]
    assert torch.equal(a, b)


def test_fit_on_cuda_matches_cpu_and_keeps_everything_on_the_device():
    """A few fp32 steps of every architecture on the GPU give the CPU's modules (AdamW's
    first steps move each weight by about lr, so a sign flip of a tiny gradient is within
    2 * lr * steps), and the modules stay on the device."""
    model = tiny_model()
    tokens = tiny_tokens(16)
    steps, lr = 3, 1e-3
    cfg = dict(train_tokens=64 * steps, batch_size=64, lr=lr, warmup_steps=0, autocast=None, progress=False,
               dead_tokens=128, activations=ActivationConfig(buffer_tokens=128))
    cpu_modules = tiny_modules()
    gpu_modules = {k: copy.deepcopy(m).cuda() for k, m in cpu_modules.items()}
    cpu_res = fit(model, {k: (1, m) for k, m in cpu_modules.items()}, tokens, TrainerConfig(**cfg))
    gpu_res = fit(_on(model, "cuda"), {k: (1, m) for k, m in gpu_modules.items()}, tokens,
                  TrainerConfig(**cfg, device="cuda"))
    for name, m in gpu_modules.items():
        for (pname, p), q in zip(m.named_parameters(), cpu_modules[name].parameters()):
            assert p.device.type == "cuda", pname
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=2 * lr * steps + 1e-5)
        assert abs(gpu_res[name].nmse - cpu_res[name].nmse) < 1e-2 * max(1.0, cpu_res[name].nmse)


def test_bf16_training_on_cuda_learns():
    model = _on(tiny_model(), "cuda")
    tokens = tiny_tokens(32)
    modules = {k: (1, m.cuda()) for k, m in tiny_modules().items()}
    res = fit(model, modules, tokens, TrainerConfig(train_tokens=64 * 40, batch_size=64, lr=3e-3, warmup_steps=2,
                                                     autocast="bfloat16", progress=False, device="cuda",
                                                     activations=ActivationConfig(buffer_tokens=256)))
    for name, s in res.items():
        assert s.autocast == "bfloat16", name
        assert np.isfinite(s.nmse) and s.nmse < 1.0, (name, s.nmse)  # better than predicting the mean
