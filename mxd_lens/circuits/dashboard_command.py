"""`mxd-lens dashboard`: one page per unit of a saved module, over held-out text (the
command line glue; the pages are `mxd_lens.experts.write_dashboard` and, with
--saedashboard, SAEDashboard's own through `mxd_lens.circuits.saedashboard`)."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """One standalone HTML page per unit of a saved module, over the default held-out
text: top-activating contexts, activation histogram, the density of all units and the
unit's logit effect. For an MxD expert the output direction is what the expert wrote on
its top contexts (a_n c_n * D^T z, averaged), not W_dec[n]; the page says how.
--saedashboard also writes SAEDashboard's page for the same units (it reads W_dec[n] as
the output direction, which is wrong for an MxD expert). Writes unit_N.html,
[saedashboard.html] and dashboard.json into --out."""


def _units(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of unit indices, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one unit index, got {text!r}")
    return values


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxd-lens dashboard`."""
    p = subparsers.add_parser(
        "dashboard", help="one HTML page per unit of a saved module (and SAEDashboard's page)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("module", help="a module folder (written by module.save / mxd-lens train)")
    p.add_argument("--units", type=_units, help="comma-separated unit indices (default: the --top most active)")
    p.add_argument("--top", type=int, default=5, help="with no --units: this many of the most active units")
    p.add_argument("--layer", type=int, help="layer the module replaces (default: its cfg.layer)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--rows", type=int, default=64, help="held-out rows to record activations on")
    p.add_argument("--context", type=int, default=128, help="tokens per row")
    p.add_argument("--saedashboard", action="store_true", help="also write SAEDashboard's page (saedashboard.html)")
    p.add_argument("--out", default="dashboard_out", help="output folder")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The `dashboard` subcommand."""
    from mxd_lens import attach, load
    from mxd_lens.circuits.experts import collect_activations, most_active_units, write_dashboard
    from mxd_lens.circuits.figures import write_json
    from mxd_lens.model_io import model_dtype
    from mxd_lens.run_folder import RunFolder
    from mxd_lens.sources import load_default_corpus, load_model, token_rows
    from mxd_lens.validation import check_layer, check_positive_int

    for name in ("top", "rows", "context"):
        check_positive_int(f"--{name}", getattr(args, name))
    module = load(args.module)
    layer = args.layer if args.layer is not None else module.cfg.layer
    if layer is None:
        raise ValueError(f"{args.module}: the module records no layer; pass --layer")
    if args.units is not None:
        bad = [u for u in args.units if not 0 <= u < module.n_units]
        if bad:
            raise ValueError(f"--units {bad} out of range: the module has units 0..{module.n_units - 1}")
    if args.saedashboard:
        from mxd_lens.circuits.saedashboard import import_sae_dashboard

        import_sae_dashboard()  # before any work: a clear error when it is not installed
    out = RunFolder(args.out, overwrite=True, guard=None, marker="dashboard.json")
    out.check()
    model = load_model(args.model)
    check_layer(layer, model.cfg.n_layers)
    module = load(args.module, dtype=model_dtype(model))
    rows = token_rows(model.tokenizer, load_default_corpus("heldout"), args.context, max_rows=args.rows)
    with out:
        with attach(model, {layer: module}):
            acts = collect_activations(model, layer, rows)
            units = args.units if args.units is not None else most_active_units(acts, args.top)
            freq = acts.frequency()
            for u in units:
                write_dashboard(model, acts, u, out.staging / f"unit_{u}.html")
        if args.saedashboard:
            from mxd_lens.circuits.saedashboard import saedashboard_page

            live = [u for u in units if freq[u] > 0]  # SAEDashboard has nothing to show of a dead unit
            if live:
                saedashboard_page(model, module, rows, live, out.staging / "saedashboard.html")
        index = {"module": str(args.module), "layer": layer, "tokens": rows.numel(),
                 "units": {str(u): {"density": float(freq[u]), "page": f"unit_{u}.html"} for u in units}}  # fmt: skip
        write_json(index, out.staging / "dashboard.json")
        out.commit()
    print(f"wrote {len(units)} unit pages to {out.out}" + (" and saedashboard.html" if args.saedashboard else ""))
    return 0


__all__ = ["add_subcommand", "run"]
