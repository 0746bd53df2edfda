"""Data-parallel training on CPU: 1 vs 2 processes (torchrun, gloo), in one run.

For N in (1, 2) the script launches itself under `python -m torch.distributed.run
--standalone --nproc_per_node=N`; every process loads the default model and calls
`mxd_lens.training.fit` on the same rows (MxD and TopK transcoder, K=32, at one layer),
each collecting and training its share. Printed per N: collection tokens/s (all rows /
the slowest rank's collection time), training tokens/s (training tokens / rank 0's time
in the module steps, all-reduces included) and the ratios N=2 / N=1.

Also the choice between the two ways of splitting the work when modules outnumber
processes, measured on this machine at the run's sizes: data parallelism (this
package: every process trains every module on its 1/N of each batch and all-reduces the
gradients) against sparsify's module parallelism (`--parallel modules`: every process
trains M/N modules on the whole batch, so each batch's activations are assembled from
every process's share). Both modes are run end to end (N=2); training tokens/s counts the
slowest rank's time in its module steps (communication included). The communication
alone is also timed with gloo: one all-reduce of every module's gradients vs one
all-gather of the batch's (input, output) pairs.

On a 2-core machine (shared with other work) 2 processes cannot be faster than one
process using both cores: this is a correctness and overhead check, not a speed-up.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_distributed.py [--rows 64] [--train-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from mxd_lens.architectures.base import Sizes
    from mxd_lens.experiments.frontier import build_module
    from mxd_lens.sources import load_default_corpus, load_default_model, token_rows
    from mxd_lens.training import ActivationConfig, TrainerConfig, distributed, fit

    ctx = distributed.init_from_env("cpu")
    model = load_default_model()
    tokens = token_rows(model.tokenizer, load_default_corpus("train"), context=128, max_rows=args.rows)
    torch.manual_seed(0)
    sizes = Sizes(d_model=576, width=args.width, d_hidden=1536, glu=True, act_fn="silu")
    modules = {m: (args.layer, build_module(m, 32, sizes, args.layer, None, "float32", "cpu")) for m in ("mxd", "transcoder")}
    cfg = TrainerConfig(
        train_tokens=args.train_tokens, batch_size=1024, autocast=None, progress=False, log_every=1000,
        parallel=args.parallel,
        activations=ActivationConfig(buffer_tokens=args.rows * 128, autocast=None),
    )
    start = time.perf_counter()
    result = fit(model, modules, tokens, cfg)
    wall = time.perf_counter() - start
    # the ranks train concurrently: the slowest rank's time in the steps of the modules it
    # trains (every module under data parallelism, its own under module parallelism)
    owners = result.distributed["owners"] or {name: 0 for name in result}
    train_seconds = max(
        sum(s.seconds for name, s in result.items() if owners[name] == r) for r in set(owners.values())
    )
    report = {
        "world_size": ctx.world_size,
        "distributed": result.distributed,
        "collect_tok_s": sum(result.distributed["collected_tokens_per_rank"]) / max(result.distributed["collect_seconds_per_rank"]),
        "train_tok_s": cfg.total_steps * cfg.batch_size / train_seconds,
        "wall_s": wall,
    }
    if ctx.active:  # the communication of the two ways of splitting the work, per step
        grads = torch.zeros(sum(p.numel() for _, m in modules.values() for p in m.parameters()))
        share = torch.zeros(cfg.batch_size // ctx.world_size, 2 * 576)  # one layer's (x, y) share
        gathered = [torch.empty_like(share) for _ in range(ctx.world_size)]
        timings = {}
        for name, op in (("allreduce_grads", lambda: dist.all_reduce(grads)),
                         ("allgather_acts", lambda: dist.all_gather(gathered, share))):
            op()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(args.comm_reps):
                op()
            dist.barrier()
            timings[name] = (time.perf_counter() - t) / args.comm_reps
        report["comm"] = {
            "grad_bytes": grads.numel() * 4, "act_bytes": share.numel() * 4 * ctx.world_size,
            "allreduce_grads_s": timings["allreduce_grads"], "allgather_acts_s": timings["allgather_acts"],
        }
    if ctx.is_main:
        Path(os.environ["MXD_BENCH_OUT"]).write_text(json.dumps(report))
    distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64, help="token rows of 128 (collection: rows * 128 tokens)")
    p.add_argument("--train-tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=8 * 576, help="transcoder width (the MxD is parameter-matched)")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--comm-reps", type=int, default=5)
    p.add_argument("--parallel", default="data", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    reports = {}
    for n, mode in ((1, "data"), (2, "data"), (2, "modules")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "--worker", "--parallel", mode, *sys.argv[1:]]
            env = {**os.environ, "MXD_BENCH_OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(2 // n)}
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            reports[(n, mode)] = json.loads(out.read_text())
    one, two, mod = reports[(1, "data")], reports[(2, "data")], reports[(2, "modules")]
    print(f"default model, layer {args.layer}, {args.rows} rows x 128 tokens, MxD + transcoder (width {args.width}), "
          f"K=32, batch 1024, {args.train_tokens} training tokens; OMP threads per process = 2 / N")
    print(f"{'N':>3}{'parallel':>10}{'rows per rank':>16}{'collect tok/s':>15}{'train tok/s':>13}{'wall s':>8}")
    for (n, mode), r in reports.items():
        print(f"{n:>3}{mode:>10}{str(r['distributed']['rows_per_rank']):>16}{r['collect_tok_s']:>15,.0f}"
              f"{r['train_tok_s']:>13,.0f}{r['wall_s']:>8.1f}")
    print(f"ratio N=2 / N=1 (data): collection {two['collect_tok_s'] / one['collect_tok_s']:.2f}x, "
          f"training {two['train_tok_s'] / one['train_tok_s']:.2f}x")
    print(f"ratio N=2 modules / N=2 data: training {mod['train_tok_s'] / two['train_tok_s']:.2f}x "
          f"(batch assembly {mod['distributed']['assemble_seconds']:.2f} s on rank 0 in all)")
    c = two["comm"]
    print(f"per step, 2 processes (gloo): all-reduce of the gradients ({c['grad_bytes'] / 2**20:.1f} MiB) "
          f"{c['allreduce_grads_s'] * 1e3:.1f} ms vs all-gather of one layer's batch activations "
          f"({c['act_bytes'] / 2**20:.1f} MiB) {c['allgather_acts_s'] * 1e3:.1f} ms "
          f"(module parallelism, sparsify's choice, pays the second per layer and none of the first)")


if __name__ == "__main__":
    main()
