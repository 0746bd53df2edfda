"""Throughput of `evaluate_many` on the default model: 1 vs 6 candidates, and vs naive
full forward passes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval.py [--rows 16 --ctx 128 --layer 12]

evaluate_many runs blocks 0..L-1 once per batch and the clean model once, then each
candidate and the two ablations from layer L on. The naive way runs a full forward
for the clean model (with a cache of the MLP's input/output), one per candidate under
`attach` and one per ablation; both compute the same figures with the same code.
The candidates are parameter-matched random modules of the sizes the frontier uses
(TopK transcoder width 16*d_model, MxD with the model's d_mlp and the matched number
of experts, skip transcoder), at K=16 and K=32: their weights do not change the cost.
Wall-clock and this process's CPU time are both printed: on a shared machine compare
ratios within one run, and prefer the CPU figures.
"""

from __future__ import annotations

import argparse
import time

import torch

from mxd_lens import MxD, MxDConfig, SkipTranscoder, TopKTranscoder, TranscoderConfig, attach, match_n_experts
from mxd_lens.evals import evaluate_many, mlp_output_means
from mxd_lens.evals.metrics import UnitStats, clean_next_token, next_token_ce_kl
from mxd_lens.evals.runner import _reconstruct_with_stats
from mxd_lens.sources import load_default_corpus, load_default_model, token_rows


def candidates(model, layer: int, ks: list[int], width_mult: int) -> dict:
    d, h = model.cfg.d_model, model.cfg.d_mlp
    width = width_mult * d
    n_experts = match_n_experts(d, d, h, width, glu=True)
    out = {}
    for k in ks:
        torch.manual_seed(k)
        mxd = MxD(MxDConfig(d_in=d, d_out=d, d_hidden=h, n_experts=n_experts, k=k, act_fn="silu", glu=True))
        with torch.no_grad():
            mxd.W_out.normal_(std=0.02)
        out[f"mxd_k{k}"] = {layer: mxd}
        out[f"transcoder_k{k}"] = {layer: TopKTranscoder(TranscoderConfig(d_in=d, d_out=d, d_sae=width, k=k))}
        out[f"skip_transcoder_k{k}"] = {layer: SkipTranscoder(TranscoderConfig(d_in=d, d_out=d, d_sae=width, k=k))}
    return out


def naive(model, cands, tokens, batch_size: int, means: dict) -> float:
    """Full forward passes only; returns the mean delta CE of the first candidate (a
    sanity figure to compare with evaluate_many's)."""
    layer = next(iter(next(iter(cands.values()))))
    delta = []
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            logits, cache = model.run_with_cache(
                batch, names_filter=[f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"]
            )
            clean = clean_next_token(logits, batch)
            del logits
            ce_clean = clean.ce
            for i, reps in enumerate(cands.values()):
                with attach(model, reps):
                    logits = model(batch)
                ce, _ = next_token_ce_kl(logits, batch, clean)
                module = reps[layer]  # NMSE and unit statistics, as evaluate_many computes them
                y_hat = _reconstruct_with_stats(module, cache[f"blocks.{layer}.ln2.hook_normalized"], UnitStats(module.n_units))
                float((y_hat - cache[f"blocks.{layer}.hook_mlp_out"]).pow(2).sum())
                if i == 0:
                    delta.append(float((ce - ce_clean).mean()))
            for value in (None, means[layer]):
                fill = (lambda a, hook: torch.zeros_like(a)) if value is None else (
                    lambda a, hook, v=value: v.expand_as(a).clone()
                )
                logits = model.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", fill)])
                next_token_ce_kl(logits, batch)
    return sum(delta) / len(delta)


def timed(fn, label: str):
    print(f"  running: {label} ...", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - t0, time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16, help="held-out rows to evaluate")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per row")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--width-mult", type=int, default=16, help="transcoder width / d_model")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_default_model()
    tokens = token_rows(model.tokenizer, load_default_corpus("heldout"), context=args.ctx, max_rows=args.rows)
    n_tok = tokens.numel()
    cands = candidates(model, args.layer, [16, 32], args.width_mult)
    one = dict(list(cands.items())[:1])
    print(f"model SmolLM2-135M, layer {args.layer}, {tokens.shape[0]} x {tokens.shape[1]} = {n_tok} tokens, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads; candidates: {', '.join(cands)}")

    means, t_means = timed(lambda: mlp_output_means(model, tokens, [args.layer], batch_size=args.batch_size, progress=False), "mean MLP outputs")
    kw = dict(batch_size=args.batch_size, mean_outputs=means, progress=False)
    rows = []
    rep1, t1 = timed(lambda: evaluate_many(model, one, tokens, **kw), "evaluate_many x1")
    rows.append(("evaluate_many, 1 candidate", 1, t1))
    rep6, t6 = timed(lambda: evaluate_many(model, cands, tokens, **kw), "evaluate_many x6")
    rows.append(("evaluate_many, 6 candidates", 6, t6))
    _, t6m = timed(lambda: evaluate_many(model, cands, tokens, batch_size=args.batch_size, progress=False), "evaluate_many x6, means")
    rows.append(("evaluate_many, 6 cand., means from eval tokens", 6, t6m))
    d1, tn1 = timed(lambda: naive(model, one, tokens, args.batch_size, means), "naive x1")
    rows.append(("naive full forwards, 1 candidate", 1, tn1))
    d6, tn6 = timed(lambda: naive(model, cands, tokens, args.batch_size, means), "naive x6")
    rows.append(("naive full forwards, 6 candidates", 6, tn6))

    print(f"\nmean MLP outputs pass (stop_at_layer={args.layer + 1}): wall {t_means[0]:.1f} s, "
          f"cpu {t_means[1]:.1f} s, {n_tok / t_means[0]:,.0f} tok/s wall")
    print("wall = elapsed seconds; cpu = this process's CPU seconds (steadier on a shared machine)")
    print(f"{'method':<48} {'cands':>5} {'wall s':>7} {'cpu s':>7} {'tok/s wall':>10} {'tok/s cpu':>10}")
    for name, n, (wall, cpu) in rows:
        print(f"{name:<48} {n:>5} {wall:>7.1f} {cpu:>7.1f} {n_tok / wall:>10,.0f} {n_tok / cpu:>10,.0f}")
    for i, what in ((0, "wall"), (1, "cpu")):
        print(f"{what}: speed-up over naive: 1 candidate {tn1[i] / t1[i]:.2f}x, 6 candidates {tn6[i] / t6[i]:.2f}x; "
              f"6 candidates cost {t6[i] / t1[i]:.2f}x one candidate (naive {tn6[i] / tn1[i]:.2f}x)")
    first = next(iter(one))
    print(f"sanity: delta CE of {first}: evaluate_many {rep6.results[first].delta_ce:.5f} "
          f"(1-cand run {rep1.results[first].delta_ce:.5f}), naive (mean of batch means) {d1:.5f} / {d6:.5f}")


if __name__ == "__main__":
    main()
