"""The GPU check's Python part (benchmarks/gpu_check.sh runs it after installing the wheels).

Prints, in order: the device; the CUDA tests' result (pytest tests/gpu); the device's
measured float32 and bfloat16 matmul rates; activation collection and training throughput
(MxD, TopK transcoder, skip transcoder) on randomly initialised HookedTransformers of the
default model's sizes and GPT-2 small's (24,576 latents, K=32, batch 4,096) as fractions of
those rates (benchmarks/bench_limits.py); and the 2-process NCCL run when the machine has
two GPUs (with one, it says so and skips it).

  python benchmarks/gpu_check.py              on the GPU machine (about 3 minutes)
  python benchmarks/gpu_check.py --cpu-smoke  anywhere: the same steps at tiny sizes on CPU
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_cuda_tests(timeout: int) -> None:
    section("CUDA tests (pytest -m cuda tests/gpu)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"]
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"CUDA tests: TIMED OUT after {timeout} s")
        return
    lines = (result.stdout + result.stderr).strip().splitlines()
    print("\n".join(lines[-25:]))
    print(f"CUDA tests: exit status {result.returncode} in {time.perf_counter() - start:.0f} s")


def nccl_worker() -> None:
    """One rank of the 2-process NCCL check: `fit` alone (before the group exists), then
    `fit` inside the NCCL group; rank 0 prints the largest difference between the two."""
    import torch
    import torch.distributed as dist

    from mxd_lens.training import ActivationConfig, TrainerConfig, fit
    from tests.training.helpers import tiny_model, tiny_modules, tiny_tokens

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cfg = TrainerConfig(train_tokens=64 * 8, batch_size=64, autocast=None, progress=False, device="cuda",
                        activations=ActivationConfig(buffer_tokens=256))

    def train():
        modules = {k: (1, m.cuda()) for k, m in tiny_modules().items()}
        fit(tiny_model().cuda(), modules, tiny_tokens(32), cfg)
        return {k: m for k, (_, m) in modules.items()}

    alone = train()
    dist.init_process_group("nccl")
    together = train()
    worst = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-12))
                for k in alone for p, q in zip(together[k].parameters(), alone[k].parameters()))
    if rank == 0:
        print(f"NCCL, 2 processes: largest relative difference from one process {worst:.2e} (expected < 1e-4)")
    dist.destroy_process_group()


def nccl_check(cpu_smoke: bool) -> None:
    section("2-process NCCL run")
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        print(f"not run: this machine has {n} GPU{'' if n == 1 else 's'}, and a 2-process NCCL run needs 2 "
              "(one process per GPU). The same 2-process path runs on CPU with gloo in the tests "
              "(torchrun --standalone --nproc_per_node=2 -m mxd_lens train ...).")
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), "--nccl-worker"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print("\n".join((result.stdout + result.stderr).strip().splitlines()[-10:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: proves every step runs")
    p.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    if args.nccl_worker:
        nccl_worker()
        return
    started = time.perf_counter()
    import torch

    section("device")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run with --cpu-smoke for the CPU smoke test")
    import importlib.metadata

    import transformer_lens

    versions = {name: importlib.metadata.version(name) for name in ("transformer-lens", "sae-lens")}
    print(f"{versions} (TransformerLens from {Path(transformer_lens.__file__).parent})")
    if not args.skip_tests:
        run_cuda_tests(timeout=150)

    import bench_limits

    if args.cpu_smoke:
        section("throughput against the limit (CPU smoke test: tiny sizes)")
        bench_limits.main(["--device", "cpu", "--models", "tiny", "--rows", "8", "--ctx", "64", "--batch", "128",
                           "--train-tokens", "512", "--matmul-n", "256", "--batch-rows", "8"])
    else:
        section("throughput against the limit: default model's sizes (random weights)")
        bench_limits.main(["--device", "cuda", "--models", "smollm", "--random", "--batch", "4096", "--k", "32"])
        section("throughput against the limit: GPT-2 small's sizes, 24,576 latents, K=32, batch 4,096")
        bench_limits.main(["--device", "cuda", "--models", "gpt2", "--batch", "4096", "--k", "32"])
    nccl_check(args.cpu_smoke)
    print(f"\ngpu_check: done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
