"""Training throughput per method (float32 and bfloat16 autocast) and peak memory of a run.

1. Steps of `fit` (forward, loss, AuxK, backward, AdamW, MxD row handling) for one module
   at a time at the default model's sizes: d = 576, MxD H = 1536 gated with the
   parameter-matched number of experts, transcoder width 16 * 576, on layer-12 activations
   of the default model (collection time excluded; bench_limits.train_rate). Printed: tokens/s, and that rate as a fraction
   of the FLOP limit, i.e. (FLOP per token / measured plain-matmul FLOP/s).
   FLOP per token, counting multiply-adds x 2 and the sparse backward `fit` uses:
     MxD         gate fwd 2IN + dense fwd 2(2IH + HO) + dense weight grads 2(2IH + HO) + dz 2HO
     transcoder  encoder fwd 2IW (sparse backward and decoder: K/N of that, not counted)
     skip TC     + skip fwd and weight grad 4IO
2. Peak memory (ru_maxrss) of a real `fit` run: default model, layer 12, all three methods
   at K = 32 from one stream, before and after training.
3. With --revival N: dead-unit revival measured, not assumed. The same modules (MxD and
   transcoder, K = 32, default sizes) trained on N real layer-12 tokens (default corpus,
   a few epochs) with AuxK on (aux_coeff 1/32) and off; printed: dead fraction over the
   last `dead_tokens` tokens and held-out NMSE (Persuasion).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_training.py [--steps 6] [--bf16] [--fit-rows 32]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig, match_n_experts  # noqa: E402
from mxd_lens.training import TrainerConfig  # noqa: E402

D, H, W = 576, 1536, 16 * 576


def build(method: str, k: int):
    if method == "mxd":
        n = match_n_experts(D, D, H, W, glu=True)
        return MxD(MxDConfig(d_in=D, d_out=D, d_hidden=H, n_experts=n, k=k, act_fn="silu", glu=True))
    cls = TopKTranscoder if method == "transcoder" else SkipTranscoder
    return cls(TranscoderConfig(d_in=D, d_out=D, d_sae=W, k=k))


def flops_per_token(method: str) -> float:
    if method == "mxd":
        n = match_n_experts(D, D, H, W, glu=True)
        dense = 2 * (2 * D * H + H * D)
        return 2 * D * n + 2 * dense + 2 * H * D
    return 2 * D * W + (4 * D * D if method == "skip_transcoder" else 0)


def matmul_rate(dtype: torch.dtype) -> float:
    a, b = torch.randn(1024, D, dtype=dtype), torch.randn(D, 6912, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 1024 * D * 6912 / (time.perf_counter() - start)


def step_rate(method: str, k: int, batch: int, steps: int, autocast: str | None) -> float:
    """Training tokens/s of `fit` (the real trainer) for one module at layer 12 of the
    default model, the collection time excluded (benchmarks/bench_limits.py's measure)."""
    import argparse as _argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_limits
    from mxd_lens.sources import load_default_model

    global _MODEL
    if _MODEL is None:
        _MODEL = load_default_model()
    rows = torch.randint(1, 49152, (max(2, 2 * batch // 128), 128), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = 0
    args = _argparse.Namespace(k=k, batch=batch, train_tokens=batch * steps, batch_rows=16)
    return bench_limits.train_rate(_MODEL, bench_limits.SIZES["smollm"], method, rows, args, autocast,
                                   torch.device("cpu"))


_MODEL = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="also time bfloat16 autocast (very slow without AMX)")
    p.add_argument("--fit-rows", type=int, default=32, help="128-token rows for the peak-memory fit run (0: skip)")
    p.add_argument("--revival", type=int, default=0, help="unique tokens for the AuxK on/off comparison (0: skip)")
    p.add_argument("--revival-epochs", type=int, default=3)
    p.add_argument("--skip-steps", action="store_true", help="skip the step-rate table")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    modes = [] if args.skip_steps else [None] + (["bfloat16"] if args.bf16 else [])
    for mode in modes:
        rate = matmul_rate(torch.bfloat16 if mode else torch.float32)
        print(f"\n{mode or 'float32'}: plain matmul {rate / 1e9:.0f} GFLOP/s; batch {args.batch}, K={args.k}")
        print(f"{'method':<18}{'tok/s':>9}{'MFLOP/tok':>11}{'limit tok/s':>13}{'of limit':>10}")
        for method in ("mxd", "transcoder", "skip_transcoder"):
            tps = step_rate(method, args.k, args.batch, args.steps, mode)
            f = flops_per_token(method)
            print(f"{method:<18}{tps:>9,.0f}{f / 1e6:>11.1f}{rate / f:>13,.0f}{tps * f / rate:>10.0%}")

    if args.fit_rows:
        from mxd_lens.sources import load_default_corpus, load_default_model, token_rows
        from mxd_lens.training import fit

        model = load_default_model()
        rows = token_rows(model.tokenizer, load_default_corpus("train"), context=128, max_rows=args.fit_rows)
        before = peak_rss_mb()
        modules = {m: (12, build(m, args.k)) for m in ("mxd", "transcoder", "skip_transcoder")}
        cfg = TrainerConfig(train_tokens=rows.numel(), batch_size=1024, autocast=None, progress=False)
        start = time.perf_counter()
        fit(model, modules, rows, cfg)
        print(f"\nfit(): 3 modules x {rows.numel():,} tokens from one stream in {time.perf_counter() - start:.0f} s; "
              f"peak RSS {before:,.0f} MB after loading the model, {peak_rss_mb():,.0f} MB after training")


    if args.revival:
        revival(args)


def revival(args) -> None:
    from mxd_lens.sources import load_default_corpus, load_default_model, token_rows
    from mxd_lens.training import ActivationConfig, fit

    model = load_default_model()
    rows = token_rows(model.tokenizer, load_default_corpus("train"), context=128, max_rows=args.revival // 128)
    heldout = token_rows(model.tokenizer, load_default_corpus("heldout"), context=128, max_rows=32)
    dead_tokens = max(4096, rows.numel() // 4)
    print(f"\nAuxK revival: {rows.numel():,} unique tokens x {args.revival_epochs} epochs, K={args.k}, "
          f"dead = no activation in the last {dead_tokens:,} tokens")
    print(f"{'method':<14}{'aux_coeff':>10}{'dead':>8}{'held-out NMSE':>15}{'tok/s':>8}")
    for coeff in (0.0, 1 / 32):
        torch.manual_seed(0)
        modules = {m: (12, build(m, args.k)) for m in ("mxd", "transcoder")}
        cfg = TrainerConfig(
            train_tokens=rows.numel() * args.revival_epochs, batch_size=1024, autocast=None, aux_coeff=coeff,
            dead_tokens=dead_tokens, progress=False, activations=ActivationConfig(buffer_tokens=16_384),
        )
        for name, s in fit(model, modules, rows, cfg, eval_tokens=heldout).items():
            print(f"{name:<14}{coeff:>10.4f}{s.dead_fraction:>8.1%}{s.heldout_nmse:>15.4f}{s.tokens_per_second:>8,.0f}")


if __name__ == "__main__":
    main()
