"""Time one training step of MxD (sparse mixing), MxD with dense mixing, and a TopK transcoder.

A step is forward + MSE loss + backward + AdamW step (for both MxD forms also the
paper's handling of C: parallel gradient removed before, rows renormalised after).
Sizes are the default model's (SmolLM2-135M): d = 576, H = 1536 gated, transcoder width
16 * 576 = 9216, k = 32, and the parameter-matched number of experts.

FLOP counting (matmul multiply-adds x 2, per token; a training step counts 3x the
forward: the forward product, plus the two backward products of the same size):
  MxD         gate 2*I*N + hidden 2*I*H*2 (gated) + decoder 2*H*O + sparse mixing 2*K*O
  dense MxD   the same with dense mixing 2*N*O instead of 2*K*O
  transcoder  encoder 2*I*W + sparse decoder 2*K*O
Element-wise work (TopK, activations, AdamW) is not counted, so "fraction of matmul
rate" is how close a method's step comes to the machine's speed on plain matmuls: the
three products of a linear layer's training step at [tokens x 576] @ [576 x N]
(y = x W, x-grad g W^T, W-grad x^T g), timed interleaved with the steps.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train_step.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

# Idle OpenMP threads sleep rather than spin: on a shared 2-core machine spinning threads of
# several processes starve each other. Read once, when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mxd_lens import MxD, MxDConfig, TopKTranscoder, TranscoderConfig, match_n_experts  # noqa: E402
from mxd_lens.functional import dense_mix, densify, mxd_combine, topk_relu  # noqa: E402

D_MODEL, D_HIDDEN, K = 576, 1536, 32
WIDTH = 16 * D_MODEL
N_EXPERTS = match_n_experts(D_MODEL, D_MODEL, D_HIDDEN, WIDTH, glu=True)


def dense_mxd_forward(mxd: MxD, x: torch.Tensor) -> torch.Tensor:
    """The same math as MxD with dense mixing: a = dense TopK scatter, (a @ C) * (D^T z) + b."""
    a = densify(topk_relu(mxd.gate_pre(x), mxd.cfg.k), mxd.cfg.n_experts)
    return mxd_combine(dense_mix(a, mxd.W_dec), mxd.hidden(x) @ mxd.W_out, mxd.b_dec)


@dataclass
class Method:
    name: str
    module: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    flops_per_token: int
    """Forward matmul FLOPs per token (a step counts 3x)."""
    is_mxd: bool
    opt: torch.optim.Optimizer | None = None


def mxd_flops(dense_mixing: bool) -> int:
    i = o = D_MODEL
    mixing = 2 * N_EXPERTS * o if dense_mixing else 2 * K * o
    return 2 * i * N_EXPERTS + 2 * i * D_HIDDEN * 2 + 2 * D_HIDDEN * o + mixing


def transcoder_flops() -> int:
    return 2 * D_MODEL * WIDTH + 2 * K * D_MODEL


def make_methods(seed: int = 0) -> list[Method]:
    torch.manual_seed(seed)
    cfg = MxDConfig(
        d_in=D_MODEL, d_out=D_MODEL, d_hidden=D_HIDDEN, n_experts=N_EXPERTS, k=K, glu=True, act_fn="silu"
    )
    mxd, dense = MxD(cfg), MxD(cfg)
    with torch.no_grad():
        mxd.W_out.normal_(0, D_HIDDEN**-0.5)  # D = 0 at init; a trained layer's D is not
        dense.load_state_dict(mxd.state_dict())
    tc = TopKTranscoder(TranscoderConfig(d_in=D_MODEL, d_out=D_MODEL, d_sae=WIDTH, k=K))
    methods = [
        Method("MxD (sparse)", mxd, mxd, mxd_flops(False), True),
        Method("MxD (dense mixing)", dense, lambda x: dense_mxd_forward(dense, x), mxd_flops(True), True),
        Method("TopK transcoder", tc, tc, transcoder_flops(), False),
    ]
    for m in methods:
        m.opt = torch.optim.AdamW(m.module.parameters(), lr=1e-4, weight_decay=0.0)
    return methods


def train_step(m: Method, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> None:
    m.opt.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = m.forward(x)
    loss = (out.float() - y).pow(2).mean()
    loss.backward()
    if m.is_mxd:
        m.module.remove_parallel_grads_()
    m.opt.step()
    if m.is_mxd:
        m.module.normalize_experts_()


def probe_matmul_rate(dtype: torch.dtype, tokens: int = 128, runs: int = 3) -> float:
    """FLOP/s of [tokens x 576] @ [576 x N_EXPERTS] in `dtype`, median of `runs`: a quick
    probe (small, since a bf16 matmul can be ~50x slower than fp32 on CPUs without bf16 units)."""
    a = torch.randn(tokens, D_MODEL).to(dtype)
    b = torch.randn(D_MODEL, N_EXPERTS).to(dtype)
    a @ b
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        rates.append(2 * tokens * D_MODEL * N_EXPERTS / (time.perf_counter() - t))
    return statistics.median(rates)


MATMUL = "matmul"


def time_methods(
    methods: list[Method],
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: bool,
    repeats: int,
    steps: int,
    label: str,
) -> dict[str, float]:
    """Median seconds per step, and of the reference matmul (key MATMUL), all interleaved
    (order rotated) within every repeat so that load from other processes hits each alike."""
    dtype = torch.bfloat16 if autocast else torch.float32
    a = torch.randn(x.shape[0], D_MODEL).to(dtype)
    b = torch.randn(D_MODEL, N_EXPERTS).to(dtype)
    g = torch.randn(x.shape[0], N_EXPERTS).to(dtype)

    def linear_step() -> None:
        # The three products of a bias-free linear layer's training step, in the
        # layouts autograd uses: y = a b, grad_a = g b^T, grad_b = a^T g.
        a @ b, g @ b.T, a.T @ g

    for m in methods:  # warm-up: allocator, Adam state, oneDNN kernels
        train_step(m, x, y, autocast)
    linear_step()
    jobs: list[tuple[str, Callable[[], object]]] = [
        (m.name, lambda m=m: train_step(m, x, y, autocast)) for m in methods
    ] + [(MATMUL, linear_step)]
    times: dict[str, list[float]] = {name: [] for name, _ in jobs}
    for r in tqdm(range(repeats), desc=f"{label} repeats", leave=False):
        for name, job in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
            t = time.perf_counter()
            for _ in range(steps):
                job()
            times[name].append((time.perf_counter() - t) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile(method: Method, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> None:
    from torch.profiler import profile as torch_profile

    train_step(method, x, y, autocast)
    with torch_profile() as prof:
        train_step(method, x, y, autocast)
    print(f"\nprofile of one step: {method.name}, {'bf16 autocast' if autocast else 'fp32'}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def report(label: str, methods: list[Method], sec: dict[str, float], tokens: int) -> None:
    rate = 3 * 2 * tokens * D_MODEL * N_EXPERTS / sec[MATMUL]
    dense, tc = sec["MxD (dense mixing)"], sec["TopK transcoder"]
    shape = f"[{tokens} x {D_MODEL}] @ [{D_MODEL} x {N_EXPERTS}]"
    print(f"\n{label}: matmul rate {rate / 1e9:,.1f} GFLOP/s ({shape}, forward and both backward products)")
    head = (
        f"{'method':<20} {'dtype':<14} {'ms/step':>9} {'tok/s':>9} {'/dense MxD':>11} {'/transcoder':>12} "
        f"{'of matmul rate':>15}"
    )
    print(head)
    print("-" * len(head))
    for m in methods:
        s = sec[m.name]
        achieved = 3 * m.flops_per_token * tokens / s
        print(
            f"{m.name:<20} {label:<14} {s * 1e3:>9.1f} {tokens / s:>9,.0f} {s / dense:>11.2f} "
            f"{s / tc:>12.2f} {achieved / rate:>15.1%}"
        )
    mxd = sec["MxD (sparse)"]
    print(
        f"goals: MxD/dense {mxd / dense:.2f} (<= 0.70: {'met' if mxd / dense <= 0.7 else 'MISSED'}), "
        f"MxD/transcoder {mxd / tc:.2f} (<= 2.00: {'met' if mxd / tc <= 2 else 'MISSED'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats of 1 step (default 7 of 3)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per method per repeat")
    parser.add_argument(
        "--bf16",
        choices=["auto", "on", "off", "only"],
        default="auto",
        help="time bf16 autocast too ('only': not fp32); 'auto' skips it when a bf16 matmul is slower "
        "than fp32 on this CPU",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of one step of each"
    )
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 3)

    print(
        f"d={D_MODEL} H={D_HIDDEN} (gated) k={K}; transcoder width {WIDTH}; MxD experts {N_EXPERTS} "
        f"(parameter-matched); {args.tokens} tokens/step; {repeats} repeats x {steps} steps; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    methods = make_methods()
    for m in methods:
        print(
            f"  {m.name:<20} {sum(p.numel() for p in m.module.parameters()):>12,} parameters, "
            f"{3 * m.flops_per_token / 1e6:,.1f} MFLOP/token per step"
        )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, D_MODEL, generator=g)
    y = torch.randn(args.tokens, D_MODEL, generator=g) * 0.1

    fp32_rate = probe_matmul_rate(torch.float32)
    bf16_rate = probe_matmul_rate(torch.bfloat16, runs=1)
    print(f"matmul probe (128 tokens): fp32 {fp32_rate / 1e9:,.1f}, bf16 {bf16_rate / 1e9:,.1f} GFLOP/s")
    runs = [] if args.bf16 == "only" else [("fp32", False)]
    if args.bf16 in ("on", "only") or (args.bf16 == "auto" and bf16_rate >= fp32_rate):
        runs.append(("bf16 autocast", True))
    elif args.bf16 == "auto":
        print(
            f"bf16 autocast skipped: a bf16 matmul runs at {bf16_rate / fp32_rate:.2f}x the fp32 rate on "
            "this CPU (no AMX / AVX512-BF16 units); pass --bf16 on to time it anyway"
        )

    for label, autocast in runs:
        if args.profile:
            for m in methods:
                profile(m, x, y, autocast)
        sec = time_methods(methods, x, y, autocast, repeats, steps, label)
        report(label, methods, sec, args.tokens)


if __name__ == "__main__":
    main()
