"""Where evaluation time goes, and how many held-out tokens a delta-CE stderr of 0.002
(rows as units) needs, on the default model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval_stderr.py --layers 12,28 --rows 16
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval_stderr.py --run runs/demo --rows 64
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval_stderr.py --profile --rows 16

Default: per layer, the time of one 8-row batch split into the prefix (blocks < L, once
per batch), the blocks from L on and the unembedding (once per candidate and baseline),
and the CE/KL log-softmax; and C candidates stacked into one forward pass
(`Prefix.repeat`) against C separate passes (does batching candidates pay here?).

--run RUN_DIR: the run's modules on `--rows` held-out rows of its held-out set with its
settings: per-row delta-CE std, the stderr (rows as units), the seconds per row of the
whole evaluation, and from them the rows, tokens and minutes a stderr of 0.002 needs
(stderr = std / sqrt(rows)).

--profile: every layer's zero-ablation cost (special positions kept), the share of its
MLP output energy and of its all-position ablation effect at special positions, and the
massive activations that remain (`ablation_baselines`): the measurements the demo's
main layer is chosen from.

Wall-clock and this process's CPU time are printed; on a shared machine compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from mxd_lens.evals import ablation_baselines, evaluate_many
from mxd_lens.evals.metrics import clean_next_token, next_token_ce_kl
from mxd_lens.model_io import run_prefix
from mxd_lens.sources import load_default_corpus, load_default_model, token_rows

TARGET = 0.002


def timed(f, repeat: int = 3) -> tuple[float, float]:
    """(best wall s, best CPU s of this process) of f() after one warm-up."""
    f()
    wall, cpu = math.inf, math.inf
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        f()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def split(model, rows, layer: int, stack: int) -> None:
    with torch.no_grad():
        prefix = run_prefix(model, rows, layer)
        pre = timed(lambda: run_prefix(model, rows, layer))
        full = timed(lambda: prefix.resume(model))
        blocks = timed(lambda: prefix.resume(model, stop_at_layer=model.cfg.n_layers))
        logits = prefix.resume(model)
        clean = clean_next_token(logits, rows)
        cekl = timed(lambda: next_token_ce_kl(logits, rows, clean))
        stacked_prefix = prefix.repeat(stack)
        separate = timed(lambda: [prefix.resume(model) for _ in range(stack)], repeat=2)
        stacked = timed(lambda: stacked_prefix.resume(model), repeat=2)
    for i, kind in ((0, "wall"), (1, "cpu")):
        print(f"layer {layer}, {rows.shape[0]} rows x {rows.shape[1]} ({kind}): prefix {pre[i]:.3f} s (once per "
              f"batch); per candidate: blocks {layer}.. {blocks[i]:.3f} s + unembedding {full[i] - blocks[i]:.3f} s "
              f"+ CE/KL {cekl[i]:.3f} s = {full[i] + cekl[i]:.3f} s ({(full[i] - blocks[i]) / full[i]:.0%} of the "
              f"forward in the unembedding)")
    print(f"  {stack} candidates stacked in one pass {stacked[0]:.3f} s (cpu {stacked[1]:.3f}) vs separately "
          f"{separate[0]:.3f} s (cpu {separate[1]:.3f}): stacking saves {1 - stacked[0] / separate[0]:.0%}")


def run_stderr(run_dir: str, n_rows: int, batch: int | None) -> None:
    from safetensors import safe_open

    from mxd_lens.experiments.frontier import load_run_model, load_docs, tokenize_docs
    from mxd_lens.experiments.reeval import run_config
    from mxd_lens.experiments.results import read_results
    from mxd_lens.storage import load

    results = read_results(run_dir)
    cfg = run_config(results)
    layer = int(results["layer"])
    model = load_run_model(cfg.model, cfg.model_name, "cpu", cfg.dtype, fold_ln=cfg.fold_ln)
    cfg.eval_tokens = n_rows * cfg.context
    rows = tokenize_docs(cfg, model.tokenizer, *load_docs(cfg))[1][:n_rows]
    means = None
    try:
        with safe_open(f"{run_dir}/eval_inputs.safetensors", framework="pt") as f:
            means = {layer: f.get_tensor(f"mean_output.{layer}")}
    except (OSError, Exception):  # an older run: means over the evaluated tokens
        means = None
    from mxd_lens import registry

    names = [registry.module_folder_name(r["method"], r["k"]) for r in results["rows"]]
    modules = {name: load(f"{run_dir}/{name}") for name in names}
    w, c = time.perf_counter(), time.process_time()
    report = evaluate_many(model, {n: {layer: m} for n, m in modules.items()}, rows,
                           batch_size=batch or cfg.eval_batch_size, mean_outputs=means, progress=False)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    per_row = wall / rows.shape[0]
    b = report.baselines
    print(f"{run_dir}: layer {layer}, {rows.shape[0]} rows x {rows.shape[1]} ({b.n_tokens:,} predictions), "
          f"{len(modules)} candidates + 3 ablations: {wall:.1f} s wall ({cpu:.1f} s cpu), {per_row:.2f} s per row; "
          f"ablation cost {b.ce_zero_ablation - b.ce_clean:.4f}")
    worst = 0.0
    for name, r in report.results.items():
        std = float(torch.tensor(r.row_delta_ce, dtype=torch.float64).std())
        need = math.ceil((std / TARGET) ** 2)
        worst = max(worst, need)
        print(f"  {name:<22} dCE {r.delta_ce:+.4f} +- {r.delta_ce_stderr:.4f} (per-row std {std:.4f}); stderr "
              f"{TARGET} needs {need:,} rows = {need * (rows.shape[1] - 1):,} predictions")
    print(f"  all candidates below {TARGET}: {int(worst):,} rows, {int(worst) * rows.shape[1]:,} held-out tokens, "
          f"~{worst * per_row / 60:.1f} min of evaluation at this machine's rate")


def profile(model, rows, layers: list[int]) -> None:
    print(f"{'layer':>5}{'abl. cost':>10}{'all pos.':>10}{'E@special':>10}{'abl@special':>12}{'massive':>8}"
          f"{'max x med':>10}{'special x med':>14}{'s':>6}")
    for layer in layers:
        t = time.perf_counter()
        b = ablation_baselines(model, rows, [layer], batch_size=8, mean_ablation=False, progress=False)
        print(f"{layer:>5}{b.ce_zero_ablation - b.ce_clean:>10.4f}{b.ce_zero_ablation_all_positions - b.ce_clean:>10.4f}"
              f"{b.excluded_energy_share[layer]:>10.1%}{b.excluded_ablation_share:>12.1%}{b.massive_positions[layer]:>8}"
              f"{b.max_norm_ratio[layer]:>10.1f}{b.excluded_norm_ratio[layer]:>14.1f}{time.perf_counter() - t:>6.0f}",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="12,28")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--stack", type=int, default=3)
    p.add_argument("--run", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.run:
        run_stderr(args.run, args.rows, args.batch)
        return
    model = load_default_model()
    rows = token_rows(model.tokenizer, load_default_corpus("heldout"), 128, max_rows=args.rows)
    if args.profile:
        layers = list(range(model.cfg.n_layers)) if args.layers == "all" else [int(v) for v in args.layers.split(",")]
        profile(model, rows, layers)
        return
    for layer in (int(v) for v in args.layers.split(",")):
        split(model, rows[:8], layer, args.stack)


if __name__ == "__main__":
    main()
