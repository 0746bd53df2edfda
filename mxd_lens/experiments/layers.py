"""Per-layer summaries of a frontier run: what each layer's numbers are made of (its
ablation cost, the share of its MLP output energy and ablation effect at special
positions, remaining massive activations) and where MxD helps (the delta CE ratios
MxD / transcoder and MxD / skip transcoder with per-row bootstrap intervals).

`layer_summary` turns one layer's `EvalReport` into a JSON-ready dict; `run_frontier`
writes one for the main layer into evaluation.json and, with `sweep_layers`, one per
layer into layers.json (figure: `plots.write_layers_html`).
"""

from __future__ import annotations

from typing import Any, Mapping

from mxd_lens import registry
from mxd_lens.atomic import jsonable

LAYERS_FILE = "layers.json"
EVALUATION_FILE = "evaluation.json"
RATIO_PAIRS = (("mxd", "transcoder"), ("mxd", "skip_transcoder"))
"""The delta CE ratios reported: (numerator method, denominator method)."""


def ratios(report: Any, names: Mapping[str, tuple[str, int]]) -> list[dict[str, Any]]:
    """Per K and pair of `RATIO_PAIRS` present in `report`: {'numerator', 'denominator',
    'k', 'ratio', 'low', 'high'} of delta CE (95% percentile bootstrap over rows)."""
    from mxd_lens.evals.metrics import ratio_interval

    by_key = {key: name for name, key in names.items()}
    out = []
    ks = sorted({k for _, k in names.values()})
    for k in ks:
        for num, den in RATIO_PAIRS:
            a, b = by_key.get((num, k)), by_key.get((den, k))
            if a is None or b is None:
                continue
            ra, rb = report.results[a], report.results[b]
            if len(ra.row_delta_ce) < 2:
                continue
            ratio, lo, hi = ratio_interval(ra.row_delta_ce, rb.row_delta_ce)
            out.append({"numerator": num, "denominator": den, "k": k, "ratio": ratio, "low": lo, "high": hi})
    return out


def layer_summary(layer: int, report: Any, names: Mapping[str, tuple[str, int]]) -> dict[str, Any]:
    """One layer's baselines (all `CEBaselines` fields, plus the zero-ablation cost),
    rows (method, K, NMSE, delta CE and its stderr, CE recovered, KL) and `ratios`."""
    b = report.baselines.to_dict()
    rows = []
    for name, (method, k) in names.items():
        r = report.results[name]
        rows.append({
            "method": method, "k": k, "nmse": r.nmse, "delta_ce": r.delta_ce,
            "delta_ce_stderr": r.delta_ce_stderr, "ce_recovered": r.ce_recovered, "kl": r.kl,
        })
    return jsonable({
        "layer": layer,
        "ablation_cost": report.baselines.ce_zero_ablation - report.baselines.ce_clean,
        "baselines": b,
        "rows": rows,
        "ratios": ratios(report, names),
        "row_delta_ce": {name: report.results[name].row_delta_ce for name in names},
    })


def names_of(folders: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """{folder: (method, K)} from module folder paths ('<method>_k<K>' or 'layer_L/<method>_k<K>')."""
    return {f: registry.parse_module_folder_name(f.rsplit("/", 1)[-1]) for f in folders}


def format_layers(summaries: list[dict[str, Any]]) -> str:
    """A text table: per layer the ablation cost, the special positions' shares and the ratios."""
    head = f"{'layer':>5}{'abl. cost':>10}{'E@special':>10}{'abl@special':>12}{'massive':>8}  ratios (MxD/TC, MxD/skip per K)"
    lines = [head, "-" * len(head)]

    def f(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    for s in summaries:
        b = s["baselines"]
        layer = str(s["layer"])
        ratio_text = "  ".join(
            f"{r['denominator'][:4]}K{r['k']} {f(r['ratio'], '.2f')} [{f(r['low'], '.2f')},{f(r['high'], '.2f')}]"
            for r in s["ratios"]
        )
        lines.append(
            f"{s['layer']:>5}{f(s['ablation_cost'], '.4f'):>10}{f(b['excluded_energy_share'].get(layer), '.1%'):>10}"
            f"{f(b['excluded_ablation_share'], '.1%'):>12}{b['massive_positions'].get(layer, 0):>8}  {ratio_text}"
        )
    return "\n".join(lines)


__all__ = ["EVALUATION_FILE", "LAYERS_FILE", "RATIO_PAIRS", "format_layers", "layer_summary", "names_of", "ratios"]
