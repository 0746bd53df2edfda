"""Circuit analysis through experts on SmolLM2-135M-Instruct: indirect-object identification.

"When Mary and John went to the store, John gave a drink to" -> " Mary" (clean) versus
"..., Mary gave a drink to" -> " John" (corrupted); metric: logit(" Mary") - logit(" John").

1. checks the model gets the task right (per-prompt logit differences);
2. trains (or reads from --run) a parameter-matched MxD and TopK transcoder with
   mxd_lens.training.fit and a TopK SAE on the MLP output with SAE-Lens's own runner,
   all with the same K, at --layer;
3. attribution patching of every node, an activation-patching heatmap over positions x
   the top experts, the Spearman correlation of the two on the top 50 nodes, the time
   of a full activation-patching sweep vs one attribution pass;
4. faithfulness curves of MxD vs transcoder vs SAE (error term as its own node) in one
   plotly figure, and a dashboard page for the top experts.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python demos/circuit_demo.py --out demo_out/circuit

Layer 0 (the default) carries the whole behaviour (patching its MLP output moves 100% of
the logit difference: the MLP turns the repeated name's token into the representation later
layers read); layer 17 carries ~14% and is the most interesting late layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mxd_lens import MxD, MxDConfig, TopKTranscoder, TranscoderConfig, attach, load, match_n_experts
from mxd_lens.circuits import (
    attribution_agreement,
    curve_figure,
    faithfulness_curve,
    ioi_task,
    patching_heatmap,
    write_html,
    write_json,
)
from mxd_lens.experts import collect_activations, logit_effect, write_dashboard
from mxd_lens.patching import activation_patch, attribution_patch
from mxd_lens.sae_site import SAETrainConfig, train_output_sae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--k", type=int, default=16, help="TopK K of every module")
    p.add_argument("--width", type=int, default=4608, help="transcoder / SAE width (the MxD is parameter-matched)")
    p.add_argument("--train-tokens", type=int, default=300_000)
    p.add_argument("--corpus-rows", type=int, default=1200, help="128-token training rows")
    p.add_argument("--n-prompts", type=int, default=12)
    p.add_argument("--top-experts", type=int, default=16, help="experts shown in the heatmap")
    p.add_argument("--run", help="reuse modules from a run folder (mxd_kK, transcoder_kK, sae_kK; e.g. OUT/modules)")
    p.add_argument("--full-sweep", action="store_true", help="also time a full activation-patching sweep")
    p.add_argument("--out", default="demo_out/circuit")
    return p.parse_args(argv)


def get_modules(model, args) -> dict:
    """MxD, transcoder and output-site SAE at args.layer: read from --run when there,
    otherwise trained (and always saved under OUT/modules for a later --run)."""
    from mxd_lens.sources import load_default_corpus, token_rows
    from mxd_lens.training import TrainerConfig, fit

    d, h = model.cfg.d_model, model.cfg.d_mlp
    rows = token_rows(model.tokenizer, load_default_corpus("train"), 128, max_rows=args.corpus_rows)
    modules: dict = {}
    run = Path(args.run) if args.run else None
    names = {"MxD": f"mxd_k{args.k}", "transcoder": f"transcoder_k{args.k}", "SAE (mlp_out)": f"sae_k{args.k}"}
    if run is not None:
        for label, folder in names.items():
            if (run / folder / "cfg.json").is_file():
                modules[label] = load(run / folder, dtype=next(model.parameters()).dtype)
        print(f"read {sorted(modules)} from {run}")
    if "MxD" not in modules or "transcoder" not in modules:
        n = match_n_experts(d, d, h, args.width, glu=model.cfg.gated_mlp)
        modules["MxD"] = MxD(MxDConfig(d_in=d, d_out=d, d_hidden=h, n_experts=n, k=args.k, act_fn=model.cfg.act_fn,
                                       glu=model.cfg.gated_mlp, layer=args.layer))  # fmt: skip
        modules["transcoder"] = TopKTranscoder(TranscoderConfig(d_in=d, d_out=d, d_sae=args.width, k=args.k,
                                                                layer=args.layer))  # fmt: skip
        t = time.perf_counter()
        summary = fit(model, {"mxd": (args.layer, modules["MxD"]), "transcoder": (args.layer, modules["transcoder"])},
                      rows, TrainerConfig(train_tokens=args.train_tokens))  # fmt: skip
        print(f"trained MxD + transcoder in {time.perf_counter() - t:.0f}s: "
              + ", ".join(f"{k} NMSE {v.nmse:.3f}" for k, v in summary.items()))  # fmt: skip
    if "SAE (mlp_out)" not in modules:
        t = time.perf_counter()
        modules["SAE (mlp_out)"] = train_output_sae(
            model, args.layer, rows, SAETrainConfig(d_sae=args.width, k=args.k, training_tokens=args.train_tokens)
        )
        print(f"trained the output-site SAE with SAE-Lens's runner in {time.perf_counter() - t:.0f}s")
    for label, folder in names.items():
        modules[label].save(Path(args.out) / "modules" / folder)
    return modules


def main(argv: list[str] | None = None) -> int:
    from mxd_lens.sources import load_default_corpus, load_default_model, token_rows

    args = parse_args(argv)
    out = Path(args.out)
    model = load_default_model()
    task = ioi_task(model.tokenizer, args.n_prompts)
    metric = task.metric()
    with torch.no_grad():
        lc, lk = model(task.clean), model(task.corrupted)
    rows = torch.arange(len(task.good))
    d_clean = (lc[rows, -1, task.good] - lc[rows, -1, task.bad]).tolist()
    d_corr = (lk[rows, -1, task.good] - lk[rows, -1, task.bad]).tolist()
    print(f"IOI, {len(d_clean)} prompt pairs of {task.clean.shape[1]} tokens: clean logit diff mean "
          f"{sum(d_clean) / len(d_clean):.2f} (positive on {sum(x > 0 for x in d_clean)}), corrupted mean "
          f"{sum(d_corr) / len(d_corr):.2f}")  # fmt: skip

    modules = get_modules(model, args)
    results: dict = {"layer": args.layer, "k": args.k, "clean_logit_diff": d_clean, "corrupted_logit_diff": d_corr}
    curves = []
    for label, module in modules.items():
        with attach(model, {args.layer: module}, use_error_term=True):
            curve = faithfulness_curve(model, task.clean, task.corrupted, metric, args.layer, label=label)
        curves.append(curve)
        print(f"{label:14s} K={module.cfg.k} params={module.n_params():,}: 80% at {curve.nodes_to_recover(0.8)} nodes "
              f"({curve.units_to_recover(0.8)} units); all units without error {curve.units_fraction:.3f}; "
              f"error alone {curve.error_fraction:.3f}; layer share {curve.layer_share:.3f}")  # fmt: skip
    results["curves"] = [c.to_dict() for c in curves]
    write_html(curve_figure(curves, f"IOI faithfulness at layer {args.layer} (K={args.k})"), out / "curves.html")

    mxd = modules["MxD"]
    with attach(model, {args.layer: mxd}, use_error_term=True):
        t = time.perf_counter()
        attr = attribution_patch(model, task.clean, task.corrupted, metric, args.layer)
        t_attr = time.perf_counter() - t
        top = attr.abs().amax(0).argsort(descending=True)[: args.top_experts].tolist()
        t = time.perf_counter()
        heat = activation_patch(model, task.clean, task.corrupted, metric, args.layer, units=top, progress=True)
        t_heat = time.perf_counter() - t
        baseline = float(heat[0, 0])  # position 0 never differs: the unpatched corrupted metric
        write_html(patching_heatmap(heat, baseline, task.labels, top,
                                    f"MxD layer {args.layer}: activation patching, positions x top experts"),
                   out / "heatmap.html")  # fmt: skip
        agree = attribution_agreement(model, task.clean, task.corrupted, metric, args.layer, n_nodes=50)
        print(f"attribution pass {t_attr:.2f}s; activation patching of {args.top_experts} experts x "
              f"{task.clean.shape[1]} positions {t_heat:.2f}s; Spearman(attribution, activation) on the "
              f"top 50 nodes = {agree.spearman:.3f}")  # fmt: skip
        results.update(attribution_seconds=t_attr, heatmap_seconds=t_heat, heatmap_experts=top,
                       spearman_top50=agree.spearman)  # fmt: skip
        if args.full_sweep:
            t = time.perf_counter()
            activation_patch(model, task.clean, task.corrupted, metric, args.layer, progress=True)
            results["full_sweep_seconds"] = time.perf_counter() - t
            print(f"full activation-patching sweep: {results['full_sweep_seconds']:.1f}s vs attribution {t_attr:.2f}s")
        heldout = token_rows(model.tokenizer, load_default_corpus("heldout"), 128, max_rows=64)
        acts = collect_activations(model, args.layer, heldout)
        for unit in top[:3]:
            write_dashboard(model, acts, unit, out / f"expert_{unit}.html")
            eff = logit_effect(model, acts, unit)
            print(f"expert {unit}: promotes {[t for t, _ in eff.top(model.tokenizer, 6)]}")
    write_json(results, out / "results.json")
    print(f"wrote {out}/curves.html, heatmap.html, expert_*.html, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
