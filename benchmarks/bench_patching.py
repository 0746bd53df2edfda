"""Time of a full activation-patching sweep vs one attribution pass (and the naive cost).

On the default model and the IOI task with an MxD at --layer (randomly initialised with a
non-zero decoder unless --module gives a trained one: timings depend on how many cells
differ between clean and corrupted runs, which a trained gate changes).

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_patching.py --n-prompts 4
"""

from __future__ import annotations

import argparse
import time

import torch

from mxd_lens import MxD, MxDConfig, attach, load, match_n_experts
from mxd_lens.circuits import ioi_task
from mxd_lens.patching import activation_patch, attribution_patch, capture, find_site


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--width", type=int, default=4608, help="transcoder width the MxD is matched to")
    p.add_argument("--module", help="a saved module folder to use instead of a random MxD")
    args = p.parse_args()

    from mxd_lens.sources import load_default_model

    model = load_default_model()
    task = ioi_task(model.tokenizer, args.n_prompts)
    metric = task.metric()
    if args.module:
        module = load(args.module)
    else:
        torch.manual_seed(0)
        d, h = model.cfg.d_model, model.cfg.d_mlp
        n = match_n_experts(d, d, h, args.width, glu=True)
        module = MxD(MxDConfig(d_in=d, d_out=d, d_hidden=h, n_experts=n, k=args.k, act_fn="silu", glu=True))
        with torch.no_grad():
            module.W_out.normal_(0, 0.02)
    with attach(model, {args.layer: module}, use_error_term=True):
        attribution_patch(model, task.clean, task.corrupted, metric, args.layer)  # warm-up
        t = time.perf_counter()
        attribution_patch(model, task.clean, task.corrupted, metric, args.layer)
        t_attr = time.perf_counter() - t
        site = find_site(model, args.layer)
        c, k = capture(model, task.clean, site), capture(model, task.corrupted, site)
        n_cells = task.clean.shape[1] * module.n_units
        n_live = int((c["unit"] != k["unit"]).any(0).sum())
        t = time.perf_counter()
        with torch.no_grad():
            model(task.corrupted)
        t_forward = time.perf_counter() - t
        t = time.perf_counter()
        activation_patch(model, task.clean, task.corrupted, metric, args.layer, progress=True)
        t_sweep = time.perf_counter() - t
    print(f"model: {model.cfg.model_name}, layer {args.layer}, {module.architecture} with {module.n_units} units, "
          f"K={module.cfg.k}; IOI {args.n_prompts} prompts x {task.clean.shape[1]} tokens")
    print(f"cells: {n_cells:,} (positions x units); differing (patched): {n_live:,}; the rest are exact no-ops")
    print(f"one attribution pass:            {t_attr:8.2f} s")
    print(f"full activation-patching sweep:  {t_sweep:8.2f} s  ({t_sweep / t_attr:.0f}x attribution)")
    print(f"naive sweep estimate (one full forward per cell, {t_forward:.3f} s each): "
          f"{t_forward * n_cells:,.0f} s; per differing cell only: {t_forward * n_live:,.0f} s")


if __name__ == "__main__":
    main()
