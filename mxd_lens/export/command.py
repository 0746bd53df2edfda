"""`mxd-lens export --format circuit-tracer|sparsify RUN_OR_FOLDERS --out DIR`."""

from __future__ import annotations

import argparse
from typing import Any

FORMATS = ("circuit-tracer", "sparsify")

DESCRIPTION = """Write saved TopK (skip) transcoders in another tool's format.

  circuit-tracer: one transcoder per layer of the model (all layers, one kind, width and
      k): DIR/layer_<i>.safetensors + DIR/config.yaml (transcoder_set, mlp.hook_in ->
      mlp.hook_out, activation topk). Upload DIR as a Hugging Face repo, or load it with
      circuit_tracer's load_transcoder_set.
  sparsify: DIR/layers.<L>.mlp/{cfg.json, sae.safetensors} per module (any layers); load
      with sparsify.SparseCoder.load_from_disk, or back with mxd_lens.load.

Both tools read the Hugging Face MLP input (the norm's output), so the encoder is divided
by the norm weight of the model the modules were trained on (--model; default: the
embedded SmolLM2-135M-Instruct). MxDs have no counterpart in either format.

  mxd-lens export --format circuit-tracer RUN --module skip_transcoder_k32 --out ct/
  mxd-lens export --format sparsify RUN/layer_6/transcoder_k32 --out sp/
"""


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxd-lens export`."""
    p = subparsers.add_parser(
        "export",
        help="write saved transcoders in circuit-tracer's or sparsify's format",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folders", nargs="+", metavar="RUN_OR_FOLDERS",
                   help="module folders, or run folders of `mxd-lens train` (their module folders are used)")
    p.add_argument("--format", required=True, choices=FORMATS, help="the target format")
    p.add_argument("--out", required=True, help="folder to write (must be absent or empty unless --overwrite)")
    p.add_argument("--module", default=None,
                   help="in run folders, use the module folders of this name (e.g. skip_transcoder_k32)")
    p.add_argument("--model", default=None,
                   help="the model the modules were trained on, a Hugging Face folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--min-norm-weight", type=float, default=None,
                   help="smallest |norm weight| relative to the layer's largest that may be divided by (default 1e-6)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Check everything, then write --out in one atomic step."""
    from pathlib import Path

    import mxd_lens
    from mxd_lens.export.circuit_tracer import export_circuit_tracer
    from mxd_lens.export.common import module_folders
    from mxd_lens.export.norms import MIN_NORM_WEIGHT, model_norms
    from mxd_lens.export.sparsify import export_sparsify
    from mxd_lens.sources.model import DEFAULT_MODEL_NAME

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not an empty folder; pass --overwrite to replace it")
    folders = module_folders(args.folders, args.module)
    modules = [mxd_lens.load(folder) for folder in folders]
    if args.model is None:
        others = sorted({m.cfg.model_name for m in modules if m.cfg.model_name not in (None, DEFAULT_MODEL_NAME)})
        if others:
            raise ValueError(
                f"the modules were trained on {others}, not the default {DEFAULT_MODEL_NAME}: pass --model FOLDER "
                "(its Hugging Face folder), whose norm weights the export needs"
            )
    norms = model_norms(args.model)
    export = export_circuit_tracer if args.format == "circuit-tracer" else export_sparsify
    written = export(
        modules, out, norms=norms, overwrite=args.overwrite, names=[str(f) for f in folders],
        min_norm_weight=MIN_NORM_WEIGHT if args.min_norm_weight is None else args.min_norm_weight,
    )
    print(f"wrote {len(modules)} module(s) in {args.format} format to {written}")
    return 0


__all__ = ["DESCRIPTION", "FORMATS", "add_subcommand", "run"]
