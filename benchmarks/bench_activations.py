"""Activation collection throughput on the default model, and the error of the fast modes.

Collects layer-L MLP (input, output) pairs with `ActivationSource.collect` (one forward
pass stopped after layer L) in three modes: float32, bfloat16 autocast, and the model's
weights cast to bfloat16; prints tokens/s and each mode's relative error against float32
(||a - a_fp32|| / ||a_fp32|| over all tokens, for the MLP input and output).

bfloat16 is only fast on CPUs with AMX / AVX512-BF16 (or on CUDA); elsewhere it is
emulated and far slower. The script prints what this CPU has.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_activations.py [--rows 16] [--layer 12]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mxd_lens.sources import load_default_corpus, load_default_model, token_rows  # noqa: E402
from mxd_lens.training import ActivationConfig, ActivationSource  # noqa: E402


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def collect(model, rows, layer, autocast, repeats):
    src = ActivationSource(model, [layer], rows, ActivationConfig(autocast=autocast, shuffle_rows=False, check_site=False))
    src.collect(src.rows[: min(2, len(src.rows))])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data = src.collect(src.rows)
        best = min(best, time.perf_counter() - start)
    return data[layer], rows.numel() / best


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16, help="128-token rows per timed pass")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-bf16", action="store_true", help="only float32 (bf16 is very slow without AMX)")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {cpu_flags()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}")
    model = load_default_model()
    rows = token_rows(model.tokenizer, load_default_corpus("train"), context=128, max_rows=args.rows)
    (x32, y32), rate32 = collect(model, rows, args.layer, None, args.repeats)
    print(f"layer {args.layer}, {rows.numel()} tokens per pass (model batch 16 rows)")
    print(f"{'mode':<22}{'tok/s':>10}{'x speed':>9}{'input rel err':>15}{'output rel err':>16}")
    print(f"{'float32':<22}{rate32:>10,.0f}{1.0:>9.2f}{0.0:>15.4f}{0.0:>16.4f}")
    if args.skip_bf16:
        return
    (xa, ya), rate_a = collect(model, rows, args.layer, "bfloat16", args.repeats)
    print(f"{'bfloat16 autocast':<22}{rate_a:>10,.0f}{rate_a / rate32:>9.2f}{rel(xa, x32):>15.4f}{rel(ya, y32):>16.4f}")
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    (xb, yb), rate_b = collect(model_bf16, rows, args.layer, None, args.repeats)
    print(f"{'bfloat16 weights':<22}{rate_b:>10,.0f}{rate_b / rate32:>9.2f}{rel(xb, x32):>15.4f}{rel(yb, y32):>16.4f}")


if __name__ == "__main__":
    main()
