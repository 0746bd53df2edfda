"""`mxd-lens probe` and `mxd-lens steer`: sparse probing and steering of saved modules."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

PROBE_DESCRIPTION = """\
Sparse probing of saved modules (mxd_lens modules or SAE-Lens SAE / transcoder folders):
each text's unit activations are mean-pooled over its tokens (special tokens excluded),
units are ranked by class-mean difference on the training split, and one-feature and
k-sparse logistic regressions are scored on the test split (F1 and accuracy, averaged
over balanced one-vs-rest binary tasks). The MLP's own neurons and random directions of
its input are probed beside them as anchors. Tasks: language, topic, book (labelled text
from Debian packages and the default corpus; no hub), or a .jsonl/.csv file with text
and label columns. Writes results.json, table.md and probing.html into --out."""

STEER_DESCRIPTION = """\
Steering evaluated: for random specific units of each module, add a constant (strength x
the unit's peak activation) after TopK, generate greedily from neutral prompts, and score
how many generated tokens are among the unit's top-context tokens, against an equally
strong random unit and an equal-norm random direction added to the MLP output; effects
come with 95% intervals over units and prompts. Also reports how much each unit's
steering direction varies with the input (mean pairwise cosine across prompts; 1 for a
fixed decoder row). Writes steering.json and steering.md into --out."""


def _csv(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("modules", nargs="*", help="module folders (mxd_lens or SAE-Lens layout)")
    p.add_argument("--run", help="a run folder (e.g. of `mxd-lens frontier`): every subfolder holding a cfg.json")
    p.add_argument("--layer", type=int, help="layer the modules sit at (default: their cfg.layer)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, random baselines and unit draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxd-lens probe`."""
    p = subparsers.add_parser("probe", help="sparse probing of saved modules on labelled text (no hub)",
                              description=PROBE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--tasks", type=_csv, default=["language", "topic", "book"],
                   help="comma list of language, topic, book or .jsonl/.csv files (default: language,topic,book)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training texts per class (default: 64 for built-in tasks; a file's: 2/3 of its smallest class)")
    p.add_argument("--n-test", type=int, default=None,
                   help="test texts per class (default: 32 for built-in tasks; a file's: 1/3 of its smallest class)")
    p.add_argument("--top-m", type=int, default=100, help="units tried as one-feature probes (default: 100)")
    p.add_argument("--ks", type=_ints, default=[1, 2, 5, 20], help="k of the k-sparse probes (default: 1,2,5,20)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens read per text, separator included (default: 64)")
    p.add_argument("--no-baselines", action="store_true", help="skip the MLP-neuron and random-direction baselines")
    p.add_argument("--out", default="probe_out", help="output folder (default: probe_out)")
    p.set_defaults(func=run_probe)
    return p


def add_steer_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxd-lens steer`."""
    p = subparsers.add_parser("steer", help="steering by single units, evaluated against equal-strength controls",
                              description=STEER_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--units", type=int, default=8, help="units steered per module (default: 8)")
    p.add_argument("--strength", type=float, default=8.0, help="added constant, in multiples of each unit's peak (default: 8)")
    p.add_argument("--prompts", type=int, default=8, help="neutral prompts used (1..12, default: 8)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (default: 16)")
    p.add_argument("--corpus-rows", type=int, default=64,
                   help="128-token rows of the default corpus's training split read for top contexts (default: 64)")
    p.add_argument("--out", default="steer_out", help="output folder (default: steer_out)")
    p.set_defaults(func=run_steer)
    return p


def load_modules(paths: Sequence[str], run_dir: str | None, layer: int | None, dtype: Any = None) -> tuple[int, dict]:
    """(layer, folder name -> module) of the folders given; all must sit at one layer."""
    from mxd_lens import load
    from mxd_lens.circuits.command import module_folders

    modules, layers = {}, {}
    for folder in module_folders(paths, run_dir):
        module = load(folder, dtype=dtype)
        at = layer if layer is not None else module.cfg.layer
        if at is None:
            raise ValueError(f"{folder}: the module records no layer; pass --layer")
        name = folder.name if folder.name not in modules else str(folder)
        modules[name], layers[name] = module, at
    if len(set(layers.values())) > 1:
        raise ValueError(f"the modules sit at different layers {layers}; probe one layer at a time (or pass --layer)")
    return next(iter(layers.values())), modules


def run_probe(args: argparse.Namespace) -> int:
    """The `probe` subcommand."""
    from mxd_lens.atomic import write_html, write_json, write_text
    from mxd_lens.probing.report import format_table, probe_figure, probe_sources
    from mxd_lens.run_folder import RunFolder
    from mxd_lens.sources import load_model
    from mxd_lens.sources.labelled import TASKS, load_task
    from mxd_lens.validation import check_layer

    for t in args.tasks:
        if t not in TASKS and not (t.endswith((".jsonl", ".csv")) and Path(t).is_file()):
            raise ValueError(f"--tasks: {t!r} is neither one of {sorted(TASKS)} nor an existing .jsonl/.csv file")
    for flag, v in (("--n-train", args.n_train), ("--n-test", args.n_test), ("--top-m", args.top_m),
                    ("--max-tokens", args.max_tokens)):
        if v is not None and v < 1:
            raise ValueError(f"{flag}={v}; expected a positive integer")
    layer, _ = load_modules(args.modules, args.run, args.layer)  # validated before the model loads
    out = RunFolder(args.out, overwrite=args.overwrite)
    out.check()
    tasks = [load_task(t, args.n_train, args.n_test, args.seed) for t in args.tasks]
    for task in tasks:
        print(task.describe())
    model = load_model(args.model)
    check_layer(layer, model.cfg.n_layers)
    _, modules = load_modules(args.modules, args.run, args.layer, dtype=next(model.parameters()).dtype)
    results = probe_sources(model, layer, modules, tasks, baselines=not args.no_baselines, top_m=args.top_m,
                            ks=args.ks, max_tokens=args.max_tokens, seed=args.seed, progress=not args.no_progress)
    table = format_table(results, ks=[k for k in (1, 5) if k in args.ks] or args.ks[:2])
    print(table)
    payload = {
        "layer": layer,
        "tasks": {t.task: {"classes": t.classes, "sizes": t.sizes()} for t in tasks},
        "protocol": {"top_m": args.top_m, "ks": args.ks, "max_tokens": args.max_tokens, "seed": args.seed},
        "results": [r.to_dict() for r in results],
    }
    with out:
        write_text(out.staging / "table.md", table + "\n")
        write_html(probe_figure(results), out.staging / "probing.html")
        write_json(out.staging / "results.json", payload)
        out.commit()
    return 0


def format_steering(results: dict[str, Any]) -> str:
    """Markdown table of `evaluate_steering` results per module."""
    names = ["unit", "unit - random_unit", "unit - random_direction", "mass: unit - random_unit",
             "mass: unit - random_direction"]
    head = ["module"] + [f"{n} (95% CI)" for n in names] + ["direction cosine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for module, r in results.items():
        e = r["effects"]
        cells = [module] + [f"{e[n]['mean']:+.3f} [{e[n]['low']:+.3f}, {e[n]['high']:+.3f}]" for n in names]
        cells.append(f"{r['direction_cosine']['mean']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_steer(args: argparse.Namespace) -> int:
    """The `steer` subcommand."""
    import dataclasses

    from mxd_lens import attach
    from mxd_lens.atomic import write_json, write_text
    from mxd_lens.circuits.steering import NEUTRAL_PROMPTS, evaluate_steering
    from mxd_lens.run_folder import RunFolder
    from mxd_lens.sources import load_default_corpus, load_model, token_rows
    from mxd_lens.validation import check_layer

    if not 1 <= args.prompts <= len(NEUTRAL_PROMPTS):
        raise ValueError(f"--prompts={args.prompts}; expected 1..{len(NEUTRAL_PROMPTS)}")
    for flag, v in (("--units", args.units), ("--new-tokens", args.new_tokens), ("--corpus-rows", args.corpus_rows)):
        if v < 1:
            raise ValueError(f"{flag}={v}; expected a positive integer")
    layer, _ = load_modules(args.modules, args.run, args.layer)
    out = RunFolder(args.out, overwrite=args.overwrite, guard="steering.json", marker="steering.json")
    out.check()
    model = load_model(args.model)
    check_layer(layer, model.cfg.n_layers)
    _, modules = load_modules(args.modules, args.run, args.layer, dtype=next(model.parameters()).dtype)
    # every fifth chapter: all six training books, not only the first
    rows = token_rows(model.tokenizer, load_default_corpus("train")[::5], 128, max_rows=args.corpus_rows)
    results = {}
    for name, module in modules.items():
        with attach(model, {layer: module}, use_error_term=True):
            r = evaluate_steering(model, layer, rows, n_units=args.units, strength=args.strength,
                                  prompts=NEUTRAL_PROMPTS[: args.prompts], n_new=args.new_tokens, seed=args.seed,
                                  progress=not args.no_progress)
        results[name] = dataclasses.asdict(r)
    table = format_steering(results)
    print(table)
    with out:
        write_text(out.staging / "steering.md", table + "\n")
        write_json(out.staging / "steering.json", {"layer": layer, "strength": args.strength, "modules": results})
        out.commit()
    return 0


__all__ = ["add_subcommand", "add_steer_subcommand", "load_modules", "run_probe", "run_steer", "format_steering"]
