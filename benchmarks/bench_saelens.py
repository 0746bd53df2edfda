"""Cost of splicing through SAE-Lens's HookedSAETransformer vs mxd_lens.attach, and of safe loading.

HookedSAETransformer calls encode() then decode(), and SAE-Lens's encode() returns dense
[tokens, n_units] activations, so the SAE-Lens path pays for a dense tensor that attach
never forms (attach mixes the K selected experts with embedding_bag). This prints
tokens/s of both paths on SmolLM2-135M (the forward stopped right after the spliced
layer, so the splice dominates), and the time to load a module folder with full
validation (mxd_lens.load) vs SAE.load_from_disk.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_saelens.py [--layer 3] [--rows 8] [--ctx 128]

The machine is shared: compare ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import SAE

import mxd_lens
from mxd_lens import MxD, MxDConfig, SkipTranscoder, TranscoderConfig, attach, match_n_experts
from mxd_lens.saelens import hooked_sae_transformer
from mxd_lens.sources import load_default_model


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = load_default_model()
    hsae = hooked_sae_transformer(model)
    d, h, L = model.cfg.d_model, model.cfg.d_mlp, args.layer
    width = 32 * d
    n_experts = match_n_experts(d, d, h, width, glu=True)
    hooks = {
        "layer": L,
        "hook_name": f"blocks.{L}.ln2.hook_normalized",
        "hook_name_out": f"blocks.{L}.hook_mlp_out",
    }
    modules = {
        f"mxd (N={n_experts})": MxD(
            MxDConfig(
                d_in=d, d_out=d, d_hidden=h, n_experts=n_experts, k=args.k, act_fn="silu", glu=True, **hooks
            )
        ),
        f"skip transcoder (W={width})": SkipTranscoder(
            TranscoderConfig(d_in=d, d_out=d, d_sae=width, k=args.k, **hooks)
        ),
    }
    tokens = torch.randint(
        0, model.cfg.d_vocab, (args.rows, args.ctx), generator=torch.Generator().manual_seed(0)
    )
    n_tok = tokens.numel()
    print(
        f"SmolLM2-135M layer {L}, {args.rows}x{args.ctx} tokens, k={args.k}, forward stopped at layer {L + 1}, "
        f"{torch.get_num_threads()} threads"
    )
    with torch.inference_mode():
        base = best_of(lambda: model(tokens, stop_at_layer=L + 1), args.repeats)
    print(f"  no splice                         {n_tok / base:9.0f} tok/s")
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in modules.items():
            with torch.no_grad():
                for p in module.parameters():
                    p.normal_(0, 0.02)
            folder = module.save(Path(tmp) / name.split()[0])
            sae = SAE.load_from_disk(folder)
            with torch.inference_mode():
                with attach(model, {L: module}):
                    t_attach = best_of(lambda: model(tokens, stop_at_layer=L + 1), args.repeats)
                t_sae = best_of(
                    lambda sae=sae: hsae.run_with_saes(tokens, saes=[sae], stop_at_layer=L + 1), args.repeats
                )
                with attach(model, {L: module}, use_error_term=True):
                    t_attach_err = best_of(lambda: model(tokens, stop_at_layer=L + 1), args.repeats)
                t_sae_err = best_of(
                    lambda sae=sae: hsae.run_with_saes(
                        tokens, saes=[sae], use_error_term=True, stop_at_layer=L + 1
                    ),
                    args.repeats,
                )
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            t_load = best_of(lambda folder=folder: mxd_lens.load(folder), args.repeats)
            t_sae_load = best_of(lambda folder=folder: SAE.load_from_disk(folder), args.repeats)
            print(f"  {name}")
            print(f"    attach                          {n_tok / t_attach:9.0f} tok/s")
            print(
                f"    HookedSAETransformer            {n_tok / t_sae:9.0f} tok/s  ({t_sae / t_attach:.2f}x attach's time)"
            )
            print(f"    attach, error term              {n_tok / t_attach_err:9.0f} tok/s")
            print(
                f"    HookedSAETransformer, error term{n_tok / t_sae_err:9.0f} tok/s  ({t_sae_err / t_attach_err:.2f}x)"
            )
            print(
                f"    load {size:.0f} MiB folder: mxd_lens.load {t_load * 1e3:.0f} ms (validated), "
                f"SAE.load_from_disk {t_sae_load * 1e3:.0f} ms"
            )


if __name__ == "__main__":
    main()
