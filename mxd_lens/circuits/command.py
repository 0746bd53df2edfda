"""`mxd-lens circuit`: faithfulness curves of saved modules on the IOI task (the command
line glue; the analysis is in `mxd_lens.circuits.curves`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

DESCRIPTION = """Faithfulness curves of saved modules on the IOI task.

Nodes (units, the error term and architecture-specific nodes such as an MxD's dense
branch) are ranked by attribution; the top n are set to their clean values in the
corrupted run and the fraction of the layer's clean-vs-corrupted metric difference that
comes back is recorded as n grows. Writes curves.html and curves.json into --out.

First it measures each layer's share of the behaviour: the corrupted run with that
layer's MLP output set to its clean value, as a fraction of the clean-vs-corrupted
difference. That is the curves' denominator: where it is near zero the fractions divide
by almost nothing and mean nothing, so a layer whose share is below --min-share is
refused (the message names the layers where it is larger), or with --force only warned
about."""

DEFAULT_MIN_SHARE = 0.1
"""A layer must carry at least this fraction of the behaviour for its curves to be drawn."""


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxd-lens circuit`: faithfulness curves of saved modules on the IOI task."""
    p = subparsers.add_parser(
        "circuit",
        help="faithfulness curves (and patching heatmaps) of saved modules on the IOI task",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("modules", nargs="*", help="module folders (written by module.save / mxd-lens train)")
    p.add_argument("--run", help="a run folder of `mxd-lens demo`: every subfolder holding a cfg.json is used")
    p.add_argument("--layer", type=int, help="layer the modules replace (default: their cfg.layer)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--n-prompts", type=int, default=12, help="IOI prompt pairs (1..12)")
    p.add_argument("--no-error-term", action="store_true", help="attach without the error term")
    p.add_argument("--out", default="circuit_out", help="output folder for curves.html / curves.json")
    p.add_argument(
        "--min-share", type=float, default=DEFAULT_MIN_SHARE,
        help=f"refuse a layer whose MLP carries less than this fraction of the behaviour (default {DEFAULT_MIN_SHARE})",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="draw the curves of a layer below --min-share (with a warning)")
    p.set_defaults(func=run)
    return p


def module_folders(paths: Sequence[str], run_dir: str | None) -> list[Path]:
    """The module folders given, plus every subfolder of `run_dir` holding a cfg.json."""
    folders = [Path(p) for p in paths]
    if run_dir is not None:
        root = Path(run_dir)
        if not root.is_dir():
            raise ValueError(f"--run {run_dir!r} is not a folder")
        folders += sorted(d for d in root.iterdir() if (d / "cfg.json").is_file())
    if not folders:
        raise ValueError("no modules given: pass module folders or --run DIR")
    return folders


def check_share(shares: Any, layer: int, min_share: float, force: bool) -> str | None:
    """None when `layer` carries at least `min_share` of the behaviour; otherwise a
    ValueError naming its share and the layers where it is larger, or (with `force`) the
    same text returned as a warning."""
    share = shares.share[layer]
    if share >= min_share:
        return None
    if not shares.total:
        raise ValueError(
            f"the clean and corrupted prompts give the same metric ({shares.clean_metric:.4f}): there is no "
            "behaviour for any layer to carry"
        )
    larger = shares.larger_than(min_share)
    where = f"layers where it is at least {min_share:g}: {shares.describe(larger)}" if larger else (
        f"no layer reaches {min_share:g} (largest: {shares.describe(shares.larger_than(float('-inf'))[:3])})"
    )  # fmt: skip
    text = (
        f"layer {layer}'s MLP carries {share:.3f} of the behaviour (clean {shares.clean_metric:.3f}, corrupted "
        f"{shares.corrupted_metric:.3f}, corrupted with that MLP output clean {shares.patched_metric[layer]:.3f}); "
        f"below --min-share {min_share:g}, its curves divide by almost nothing; {where}"
    )
    if not force:
        raise ValueError(f"{text}. Pass --layer with one of those, or --force to draw them anyway")
    return text


def run(args: argparse.Namespace) -> int:
    """The `circuit` subcommand: one curve per module, overlaid in one figure."""
    # Heavy imports only once the command runs: `mxd-lens circuit --help` stays fast.
    from mxd_lens import attach, load
    from mxd_lens.circuits.curves import faithfulness_curve, layer_shares
    from mxd_lens.circuits.figures import curve_figure, write_html, write_json
    from mxd_lens.circuits.tasks import ioi_task
    from mxd_lens.model_io import model_dtype
    from mxd_lens.run_folder import RunFolder
    from mxd_lens.sources import load_model
    from mxd_lens.validation import check_layer

    if not args.min_share == args.min_share or args.min_share > 1:  # NaN or more than the whole
        raise ValueError(f"--min-share {args.min_share!r}: expected a fraction of the behaviour at most 1")
    folders = module_folders(args.modules, args.run)
    layers = {}
    for folder in folders:  # every folder read and validated before the model loads
        layer = args.layer if args.layer is not None else load(folder).cfg.layer
        if layer is None:
            raise ValueError(f"{folder}: the module records no layer; pass --layer")
        layers[folder] = layer
    # curves.html / curves.json go in only once every curve is done: a failed run leaves
    # --out as it was, and nothing else in it is touched.
    out = RunFolder(args.out, overwrite=True, guard=None, marker="curves.json")
    out.check()
    model = load_model(args.model)
    for folder, layer in layers.items():
        check_layer(layer, model.cfg.n_layers)
    task = ioi_task(model.tokenizer, args.n_prompts)
    shares = layer_shares(model, task.clean, task.corrupted, task.metric())  # the original model's
    print(f"behaviour: clean metric {shares.clean_metric:.3f}, corrupted {shares.corrupted_metric:.3f}; "
          f"share per layer's MLP (largest first): {shares.describe(shares.larger_than(float('-inf'))[:6])}")  # fmt: skip
    warnings = {}
    for layer in sorted(set(layers.values())):  # refused before any curve is computed
        warning = check_share(shares, layer, args.min_share, args.force)
        if warning is not None:
            warnings[layer] = warning
            print(f"WARNING: {warning}", file=sys.stderr)
    results = []
    for folder in folders:
        module = load(folder, dtype=model_dtype(model))
        layer = layers[folder]
        with attach(model, {layer: module}, use_error_term=not args.no_error_term):
            c = faithfulness_curve(model, task.clean, task.corrupted, task.metric(), layer, label=folder.name)
        results.append(c)
        err = "n/a" if c.error_fraction is None else f"{c.error_fraction:.3f}"
        print(
            f"{folder.name}: layer {layer} (share {shares.share[layer]:.3f}), 80% at {c.nodes_to_recover(0.8)} nodes "
            f"({c.units_to_recover(0.8)} units); units without the error {c.units_fraction:.3f}; error alone {err}"
            + (" [UNRELIABLE: share below --min-share]" if layer in warnings else "")
        )
    records = []
    for folder, c in zip(folders, results):
        layer = layers[folder]
        records.append(c.to_dict() | {"layer": layer, "original_layer_share": shares.share[layer],
                                      "warning": warnings.get(layer)})  # fmt: skip
    title = "IOI circuit faithfulness" + (" (WARNING: a layer below --min-share)" if warnings else "")
    with out:
        write_html(curve_figure(results, title), out.staging / "curves.html")
        write_json(records, out.staging / "curves.json")
        out.commit()
    print(f"wrote {out.out / 'curves.html'} and {out.out / 'curves.json'}")
    return 0


__all__ = ["DEFAULT_MIN_SHARE", "add_subcommand", "check_share", "module_folders", "run"]
