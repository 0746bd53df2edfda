"""Choosing the compute precision by measuring it on this machine, never by assuming it:
some CPUs run bfloat16 matrix products ~10x faster than float32 (AMX), others ~8x slower
(AVX2 only, emulated)."""

from __future__ import annotations

import time

import torch

from mxd_lens.config import parse_dtype

_AUTO_CACHE: dict[str, torch.dtype | None] = {}


def resolve_autocast(setting: str | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The autocast dtype to use: None (off), a dtype name, or 'auto'.

    'auto' times one [512 x 576] @ [576 x 1536] product in float32 and in bfloat16 on
    `device` and picks bfloat16 only when it is faster: CPUs with AMX or AVX512-BF16
    run it several times faster, CPUs without (AVX2 only) emulate it ~50x slower.
    """
    if setting is None:
        return None
    if setting != "auto":
        return parse_dtype(setting)
    device = torch.device(device)
    key = str(device)
    if key not in _AUTO_CACHE:
        a = torch.randn(512, 576, device=device)
        b = torch.randn(576, 1536, device=device)
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, w = a.to(dtype), b.to(dtype)
            x @ w  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                x @ w
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[dtype] = time.perf_counter() - start
        _AUTO_CACHE[key] = torch.bfloat16 if times[torch.bfloat16] < times[torch.float32] else None
    return _AUTO_CACHE[key]


__all__ = ["resolve_autocast"]
