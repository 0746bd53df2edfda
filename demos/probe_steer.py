"""Are experts as interpretable as latents? Sparse probing and steering of a frontier run's
modules, side by side, with the MLP's neurons and random directions as anchors.

1. Sparse probing (Oldfield et al. 2025; SAEBench) on three labelled tasks that need no hub:
   language (fortunes in eight languages from Debian packages), topic (English fortunes'
   files) and book (paragraphs of the default corpus's seven books, split by chapter). Per
   task and method: the best single unit's test F1 among the top units by class-mean
   difference, and k-sparse probes for k = 1, 2, 5, 20 (F1 averaged over balanced
   one-vs-rest tasks).
2. Steering: random specific units of each module get strength x their peak activation
   added after TopK; greedy generations from neutral prompts are scored by the share of
   tokens among the unit's top-context tokens, against an equally strong random unit and
   an equal-norm random direction added to the MLP output (95% intervals over units and
   prompts); and how much each unit's steering direction varies across prompts.

    mxd-lens frontier --ks 32 --out runs/frontier          # or any run with <method>_k<K> folders
    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python demos/probe_steer.py --run runs/frontier --out demo_out/probe

Writes into --out: probing.html, probing.json, probing.md, steering.json, steering.md,
steering.html and report.md (both tables and the timings). Defaults fit in ~10 minutes on 2
CPU cores for three K=32 modules of the embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder whose subfolders with a cfg.json are probed (e.g. mxd_k32)")
    p.add_argument("--k", type=int, default=32,
                   help="only the modules trained at this K (folders ending _k<K>; default 32; 0: every module)")
    p.add_argument("--tasks", default="language,topic,book", help="probing tasks (default: language,topic,book)")
    p.add_argument("--n-train", type=int, default=32, help="training texts per class (default: 32)")
    p.add_argument("--n-test", type=int, default=16, help="test texts per class (default: 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens read per text (default: 32)")
    p.add_argument("--top-m", type=int, default=100, help="units tried as one-feature probes (default: 100)")
    p.add_argument("--units", type=int, default=8, help="units steered per module (default: 8)")
    p.add_argument("--strength", type=float, default=8.0, help="steering constant in multiples of the unit's peak")
    p.add_argument("--prompts", type=int, default=8, help="neutral prompts (1..12, default: 8)")
    p.add_argument("--new-tokens", type=int, default=12, help="tokens generated per prompt (default: 12)")
    p.add_argument("--corpus-rows", type=int, default=48, help="128-token corpus rows read for top contexts")
    p.add_argument("--skip-steering", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out/probe")
    return p.parse_args(argv)


def steering_figure(results: dict):
    import plotly.graph_objects as go

    from mxd_lens import registry

    names = ["unit", "unit - random_unit", "unit - random_direction"]
    fig = go.Figure()
    for module, r in results.items():
        e = r["effects"]
        try:  # the registry's colour of the module's method ('mxd_k32' -> mxd)
            color = registry.color(registry.parse_module_folder_name(module)[0])
        except ValueError:
            color = None
        fig.add_trace(go.Bar(
            name=module, x=names, y=[e[n]["mean"] for n in names], marker_color=color,
            error_y=dict(type="data", symmetric=False, array=[e[n]["high"] - e[n]["mean"] for n in names],
                         arrayminus=[e[n]["mean"] - e[n]["low"] for n in names]),
        ))
    fig.update_layout(barmode="group", title="Steering: change in the share of generated tokens among the unit's top-context tokens"
                      "<br><sup>95% bootstrap intervals over units and prompts; controls: an equally strong "
                      "random unit, an equal-norm random direction</sup>",
                      xaxis_title="effect measured", yaxis_title="effect on hit rate", template="plotly_white",
                      height=480, width=1000)
    return fig


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from mxd_lens import attach
    from mxd_lens.atomic import write_html, write_json, write_text
    from mxd_lens.circuits.steering import NEUTRAL_PROMPTS, evaluate_steering
    from mxd_lens.probing.command import format_steering, load_modules
    from mxd_lens.probing.report import format_table, probe_figure, probe_sources
    from mxd_lens.sources import load_default_corpus, load_default_model, token_rows
    from mxd_lens.sources.labelled import load_task

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run = Path(args.run)
    folders = sorted(d for d in run.iterdir() if (d / "cfg.json").is_file()) if run.is_dir() else []
    if args.k:
        folders = [d for d in folders if d.name.endswith(f"_k{args.k}")]
    if not folders:
        raise SystemExit(f"--run {args.run}: no module folders (subfolders holding a cfg.json){' at K=' + str(args.k) if args.k else ''}")
    model = load_default_model()
    model.eval()
    layer, modules = load_modules([str(f) for f in folders], None, None, dtype=next(model.parameters()).dtype)
    print(f"layer {layer}: {', '.join(f'{n} ({m.n_units:,} units, K={m.cfg.k})' for n, m in modules.items())}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tasks = [load_task(t, args.n_train, args.n_test, args.seed) for t in args.tasks.split(",")]
    for t in tasks:
        print(t.describe())
    timings["data"] = time.perf_counter() - t0
    t = time.perf_counter()
    results = probe_sources(model, layer, modules, tasks, top_m=args.top_m, max_tokens=args.max_tokens, seed=args.seed)
    timings["probing"] = time.perf_counter() - t
    table = format_table(results)
    print(table)
    write_text(out / "probing.md", table + "\n")
    write_html(probe_figure(results), out / "probing.html")
    write_json(out / "probing.json", {
        "layer": layer, "tasks": {x.task: {"classes": x.classes, "sizes": x.sizes()} for x in tasks},
        "protocol": {"top_m": args.top_m, "max_tokens": args.max_tokens, "seed": args.seed},
        "results": [r.to_dict() for r in results],
    })

    steer_table = ""
    if not args.skip_steering:
        t = time.perf_counter()
        # every fifth chapter: all six training books
        rows = token_rows(model.tokenizer, load_default_corpus("train")[::5], 128, max_rows=args.corpus_rows)
        steering = {}
        for name, module in modules.items():
            with attach(model, {layer: module}, use_error_term=True):
                r = evaluate_steering(model, layer, rows, n_units=args.units, strength=args.strength,
                                      prompts=NEUTRAL_PROMPTS[: args.prompts], n_new=args.new_tokens, seed=args.seed)
            steering[name] = dataclasses.asdict(r)
            print(f"{name}: direction cosine across prompts {r.direction_cosine['mean']:.3f}; example "
                  f"{r.examples[0]['prompt']!r} -> unit: {r.examples[0]['unit']!r}")
        timings["steering"] = time.perf_counter() - t
        steer_table = format_steering(steering)
        print(steer_table)
        write_text(out / "steering.md", steer_table + "\n")
        write_json(out / "steering.json", {"layer": layer, "strength": args.strength, "modules": steering})
        write_html(steering_figure(steering), out / "steering.html")
    timings["total"] = time.perf_counter() - t0
    times = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    print(f"time: {times}")
    sizes = "; ".join(x.describe() for x in tasks)
    write_text(out / "report.md", f"# Probing and steering, layer {layer}\n\nTasks: {sizes}\n\n## Probing (test F1)\n\n"
               f"{table}\n\n## Steering (strength {args.strength:g} x peak)\n\n{steer_table}\n\nTime: {times}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
