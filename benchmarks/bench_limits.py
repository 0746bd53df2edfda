"""Throughput against the machine's limit, in one run, as ratios.

1. The limit: the device's plain matmul rate in float32 and bfloat16 (one [M x K] @ [K x N]
   product, repeated; on CUDA timed between synchronisations).
2. Activation collection (`ActivationSource.collect`: the language model's forward pass,
   stopped after layer L, the MLP pairs copied to host memory) in tokens/s, against the
   forward FLOPs per token of blocks 0..L counted from the architecture sizes:
     per block  attention projections 2*d*(n_heads*d_head + 2*n_kv*d_head) + 2*n_heads*d_head*d,
                scores and mixing 4*n_heads*d_head*ctx (TransformerLens computes the whole
                ctx x ctx score matrix, masked), MLP 2*d*d_mlp*(3 if gated else 2);
   limit tok/s = matmul rate / FLOP per token.
3. Training (`fit`, the real trainer: forward, loss, AuxK, sparse TopK backward, AdamW,
   MxD row handling) of MxD, TopK transcoder and skip transcoder, one module per `fit` so
   each is timed alone, wall clock (synchronised) minus the collection time, against
   FLOPs per token counted as in bench_training.py (multiply-adds x 2, the sparse
   backward `fit` uses):
     MxD         gate fwd 2*d*N + dense fwd 2*(g*d*H + H*d) + dense weight grads (same) + dz 2*H*d
                 (g = 2 for a gated MLP, else 1; N experts matched to the transcoder's parameters)
     transcoder  encoder fwd 2*d*W (the K-sparse decoder and backward are O(K), not counted)
     skip TC     + skip path fwd and weight grad 4*d*d

Sizes: 'smollm' = the default model's (Llama-like: 30 layers, d 576, gated d_mlp 1536, 9
heads / 3 KV heads, width 16*576), on CPU the real embedded model unless --random;
'gpt2' = GPT-2 small's (12 layers, 768 / 3072 GELU, 24,576 latents); 'tiny' for a smoke run.
Models of the sizes are randomly initialised HookedTransformers (same FLOPs, same speed).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_limits.py [--device cuda] [--models smollm,gpt2]
      [--batch 1024] [--k 32] [--train-tokens N] [--rows 16] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")


@dataclass(frozen=True)
class Sizes:
    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv: int
    d_head: int
    d_vocab: int
    gated: bool
    width: int
    layer: int
    n_ctx: int


SIZES = {
    "smollm": Sizes("SmolLM2-135M sizes", 30, 576, 1536, 9, 3, 64, 49152, True, 16 * 576, 12, 2048),
    "gpt2": Sizes("GPT-2 small sizes", 12, 768, 3072, 12, 12, 64, 50257, False, 24576, 6, 1024),
    "tiny": Sizes("tiny (smoke test)", 3, 64, 128, 4, 2, 16, 512, True, 256, 1, 256),
}
METHODS = ("mxd", "transcoder", "skip_transcoder")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an [n x n] @ [n x n] product (best of a few repeats after a warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best


def forward_flops_per_token(s: Sizes, ctx: int) -> float:
    """Matmul FLOPs per token of blocks 0..s.layer (the forward stops after layer L)."""
    attn = 2 * s.d_model * (s.n_heads * s.d_head + 2 * s.n_kv * s.d_head) + 2 * s.n_heads * s.d_head * s.d_model
    scores = 4 * s.n_heads * s.d_head * ctx
    mlp = 2 * s.d_model * s.d_mlp * (3 if s.gated else 2)
    return (s.layer + 1) * (attn + scores + mlp)


def n_experts(s: Sizes) -> int:
    from mxd_lens import match_n_experts

    return match_n_experts(s.d_model, s.d_model, s.d_mlp, s.width, glu=s.gated)


def train_flops_per_token(s: Sizes, method: str) -> float:
    d, h = s.d_model, s.d_mlp
    if method == "mxd":
        dense = 2 * ((2 if s.gated else 1) * d * h + h * d)
        return 2 * d * n_experts(s) + 2 * dense + 2 * h * d
    return 2 * d * s.width + (4 * d * d if method == "skip_transcoder" else 0)


def build_module(s: Sizes, method: str, k: int):
    from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig

    if method == "mxd":
        return MxD(MxDConfig(d_in=s.d_model, d_out=s.d_model, d_hidden=s.d_mlp, n_experts=n_experts(s), k=k,
                             act_fn="silu" if s.gated else "gelu", glu=s.gated))
    cls = TopKTranscoder if method == "transcoder" else SkipTranscoder
    return cls(TranscoderConfig(d_in=s.d_model, d_out=s.d_model, d_sae=s.width, k=k))


def build_model(s: Sizes, device: torch.device, random: bool):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if s.name.startswith("SmolLM") and not random:
        from mxd_lens.sources import load_default_model

        return load_default_model().to(device).eval(), "the embedded SmolLM2-135M-Instruct"
    cfg = HookedTransformerConfig(
        n_layers=s.n_layers, d_model=s.d_model, d_mlp=s.d_mlp, n_heads=s.n_heads, d_head=s.d_head,
        n_key_value_heads=s.n_kv if s.n_kv != s.n_heads else None, d_vocab=s.d_vocab, n_ctx=s.n_ctx,
        act_fn="silu" if s.gated else "gelu_new", gated_mlp=s.gated,
        normalization_type="RMSPre" if s.gated else "LNPre",
        positional_embedding_type="rotary" if s.gated else "standard", rotary_dim=s.d_head if s.gated else None,
        device=str(device), seed=0,
    )
    return HookedTransformer(cfg).eval(), "randomly initialised"


def collect_rate(model, s: Sizes, rows: torch.Tensor, autocast: str | None, batch_rows: int) -> float:
    from mxd_lens.training import ActivationConfig, ActivationSource

    cfg = ActivationConfig(autocast=autocast, shuffle_rows=False, check_site=False, model_batch_rows=batch_rows,
                           buffer_tokens=max(rows.numel(), 16_384))
    src = ActivationSource(model, [s.layer], rows, cfg)
    src.collect(src.rows[: min(batch_rows, len(src.rows))])  # warm-up (kernels, allocator)
    start = time.perf_counter()
    src.collect(src.rows)  # ends with host copies: synchronised
    return rows.numel() / (time.perf_counter() - start)


def train_rate(model, s: Sizes, method: str, rows: torch.Tensor, args, autocast: str | None,
               device: torch.device) -> float:
    """Training tokens/s of one module trained alone by `fit`, collection time excluded."""
    from mxd_lens.training import ActivationConfig, TrainerConfig, fit

    torch.manual_seed(0)
    module = build_module(s, method, args.k).to(device)
    cfg = TrainerConfig(
        train_tokens=args.train_tokens, batch_size=args.batch, autocast=autocast, progress=False,
        device=str(device), warmup_steps=1, dead_tokens=4 * args.batch,
        activations=ActivationConfig(buffer_tokens=max(rows.numel(), args.batch), autocast=autocast,
                                     model_batch_rows=args.batch_rows, check_site=False),
    )
    sync(device)
    start = time.perf_counter()
    summary = fit(model, {method: (s.layer, module)}, rows, cfg)[method]
    sync(device)
    wall = time.perf_counter() - start
    collect_seconds = rows.numel() / summary.collect_tokens_per_second
    return args.train_tokens / max(wall - collect_seconds, 1e-9)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = open("/proc/cpuinfo").read().split()
    except (OSError, StopIteration):
        model, flags = platform.processor() or "unknown CPU", []
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no AVX2"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{model} ({isa}), {torch.get_num_threads()} threads{load}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="smollm", help="comma-separated: smollm, gpt2, tiny")
    p.add_argument("--random", action="store_true", help="random weights for the smollm sizes too")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 1024 on CPU, 4096 on CUDA)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--train-tokens", type=int, default=None, help="per module (default 4 batches CPU, 40 CUDA)")
    p.add_argument("--rows", type=int, default=None, help="128-token rows collected (default 16 CPU, 256 CUDA)")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch-rows", type=int, default=None, help="rows per forward pass (16 CPU, 128 CUDA)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size (1024 CPU, 8192 CUDA)")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (4096 if cuda else 1024)
    args.train_tokens = args.train_tokens or args.batch * (40 if cuda else 4)
    args.rows = args.rows or (256 if cuda else 16)
    args.batch_rows = args.batch_rows or (128 if cuda else 16)
    n = args.matmul_n or (8192 if cuda else 1024)
    precisions = [None if x in ("float32", "none") else x for x in args.precisions.split(",")]

    print(f"machine: {machine_line(device)}")

    def limits() -> dict[str, float]:
        # measured again before each model's tables: on a shared machine the load drifts
        rates = {"float32": matmul_rate(device, torch.float32, n), "bfloat16": matmul_rate(device, torch.bfloat16, n)}
        print(f"matmul [{n} x {n}] @ [{n} x {n}]: float32 {rates['float32'] / 1e9:,.0f} GFLOP/s, bfloat16 "
              f"{rates['bfloat16'] / 1e9:,.0f} GFLOP/s (bf16/fp32 {rates['bfloat16'] / rates['float32']:.2f}x)")
        return rates

    for key in args.models.split(","):
        s = SIZES[key]
        print()
        rates = limits()
        model, origin = build_model(s, device, args.random)
        rows = torch.randint(1, s.d_vocab, (args.rows, args.ctx), generator=torch.Generator().manual_seed(0))
        rows[:, 0] = 0
        f_fwd = forward_flops_per_token(s, args.ctx)
        print(f"{s.name} ({origin}), layer {s.layer}, ctx {args.ctx}, {rows.numel():,} tokens collected; "
              f"forward to layer {s.layer}: {f_fwd / 1e6:.1f} MFLOP/token")
        print(f"  {'collection':<28}{'tok/s':>12}{'limit tok/s':>14}{'of limit':>10}")
        for autocast in precisions:
            name = autocast or "float32"
            tps = collect_rate(model, s, rows, autocast, args.batch_rows)
            limit = rates[name] / f_fwd
            print(f"  {name + (' autocast' if autocast else ''):<28}{tps:>12,.0f}{limit:>14,.0f}{tps / limit:>10.1%}")
        if args.skip_training:
            continue
        print(f"  training: batch {args.batch}, K={args.k}, width {s.width:,}, MxD {n_experts(s):,} experts x "
              f"H {s.d_mlp}; {args.train_tokens:,} tokens per module")
        print(f"  {'method':<18}{'precision':<10}{'tok/s':>12}{'MFLOP/tok':>11}{'limit tok/s':>14}{'of limit':>10}")
        for autocast in precisions:
            name = autocast or "float32"
            for method in METHODS:
                tps = train_rate(model, s, method, rows, args, autocast, device)
                f = train_flops_per_token(s, method)
                limit = rates[name] / f
                print(f"  {method:<18}{name:<10}{tps:>12,.0f}{f / 1e6:>11.1f}{limit:>14,.0f}{tps / limit:>10.1%}")
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
