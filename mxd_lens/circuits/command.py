"""`mxd-lens circuit`: faithfulness curves of saved modules on the IOI task (the command
line glue; the analysis is in `mxd_lens.circuits.curves`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

DESCRIPTION = """Faithfulness curves of saved modules on the IOI task.

Nodes (units, the error term and architecture-specific nodes such as an MxD's dense
branch) are ranked by attribution; the top n are set to their clean values in the
corrupted run and the fraction of the layer's clean-vs-corrupted metric difference that
comes back is recorded as n grows. Writes curves.html and curves.json into --out."""


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


def run(args: argparse.Namespace) -> int:
    """The `circuit` subcommand: one curve per module, overlaid in one figure."""
    # Heavy imports only once the command runs: `mxd-lens circuit --help` stays fast.
    from mxd_lens import attach, load
    from mxd_lens.circuits.curves import faithfulness_curve
    from mxd_lens.circuits.figures import curve_figure, write_html, write_json
    from mxd_lens.circuits.tasks import ioi_task
    from mxd_lens.model_io import model_dtype
    from mxd_lens.run_folder import RunFolder
    from mxd_lens.sources import load_model

    folders = module_folders(args.modules, args.run)
    for folder in folders:  # every folder read and validated before the model loads
        if args.layer is None and load(folder).cfg.layer is None:
            raise ValueError(f"{folder}: the module records no layer; pass --layer")
    # curves.html / curves.json go in only once every curve is done: a failed run leaves
    # --out as it was, and nothing else in it is touched.
    out = RunFolder(args.out, overwrite=True, guard=None, marker="curves.json")
    out.check()
    model = load_model(args.model)
    task = ioi_task(model.tokenizer, args.n_prompts)
    results = []
    for folder in folders:
        module = load(folder, dtype=model_dtype(model))
        layer = args.layer if args.layer is not None else module.cfg.layer
        if layer is None:
            raise ValueError(f"{folder}: the module records no layer; pass --layer")
        with attach(model, {layer: module}, use_error_term=not args.no_error_term):
            c = faithfulness_curve(model, task.clean, task.corrupted, task.metric(), layer, label=folder.name)
        results.append(c)
        print(
            f"{folder.name}: layer {layer}, 80% at {c.nodes_to_recover(0.8)} nodes "
            f"({c.units_to_recover(0.8)} units); error alone {c.error_fraction}; layer share {c.layer_share:.3f}"
        )
    with out:
        write_html(curve_figure(results, "IOI circuit faithfulness"), out.staging / "curves.html")
        write_json([c.to_dict() for c in results], out.staging / "curves.json")
        out.commit()
    print(f"wrote {out.out / 'curves.html'} and {out.out / 'curves.json'}")
    return 0


__all__ = ["add_subcommand", "module_folders", "run"]
