"""`mxd-lens eval RUN_DIR`: evaluate a finished frontier run again from its folder.

The settings come from its results.json (model, conversion, dtype, device, batch size,
special-position choice), the held-out token rows and the mean-ablation vectors from its
eval_inputs.safetensors, and the modules from its `<method>_k<K>` folders, so the
numbers are the run's own (bit for bit on a CPU with the same versions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mxd_lens import registry
from mxd_lens.experiments.config import FrontierConfig
from mxd_lens.experiments.results import RESULTS_FILE, ROW_KEYS, read_results

COMPARED = ("nmse", "ce", "delta_ce", "delta_ce_stderr", "ce_recovered", "kl", "l0", "dead_fraction", "usage_entropy")
"""The row figures `reevaluate_run` compares with the recorded ones."""


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a finished frontier run (a folder holding results.json)."""
    return (Path(path) / RESULTS_FILE).is_file()


def run_config(results: dict[str, Any]) -> FrontierConfig:
    """The FrontierConfig recorded in a results.json (without its 'resolved' sizes)."""
    return FrontierConfig.from_dict({k: v for k, v in results["config"].items() if k != "resolved"})


def reevaluate_run(run_dir: str | Path, echo=print, model=None) -> dict[str, Any]:
    """Evaluate RUN_DIR's modules on its held-out rows with its settings; returns
    {'rows': [row dicts as in results.json], 'baselines': {...}, 'max_abs_difference':
    {key: largest |new - recorded| over the rows}, 'report': EvalReport}."""
    from safetensors import safe_open

    from mxd_lens.evals import evaluate_many
    from mxd_lens.experiments.frontier import EVAL_INPUTS, format_table, load_run_model
    from mxd_lens.storage import load

    run_dir = Path(run_dir)
    results = read_results(run_dir)
    cfg = run_config(results)
    inputs = run_dir / EVAL_INPUTS
    if not inputs.is_file():
        raise FileNotFoundError(
            f"{inputs} is missing: the run predates saved evaluation inputs; evaluate its module folders "
            f"instead (`mxd-lens eval {run_dir}/<method>_k<K> ...`) or rerun it"
        )
    with safe_open(str(inputs), framework="pt") as f:
        tokens = f.get_tensor("heldout_tokens")
        layer = int(results["layer"])
        key = f"mean_output.{layer}"
        if key not in f.keys():
            raise ValueError(f"{inputs} has no {key!r}: expected the mean MLP output of the run's layer {layer}")
        mean = f.get_tensor(key)
    folders = {registry.module_folder_name(row["method"], row["k"]): row for row in results["rows"]}
    missing = [name for name in folders if not (run_dir / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{run_dir} lacks the module folders {missing} listed in its results.json")
    modules = {name: load(run_dir / name) for name in folders}  # every module validated before the model loads
    if model is None:
        model = load_run_model(cfg.model, cfg.model_name, cfg.device, cfg.dtype, echo=echo, fold_ln=cfg.fold_ln)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    report = evaluate_many(
        model, {name: {layer: m.to(device, dtype)} for name, m in modules.items()}, tokens,
        batch_size=cfg.eval_batch_size, mean_outputs={layer: mean.to(device, dtype)}, progress=cfg.progress,
        exclude_special_tokens=cfg.exclude_special_tokens, stack_candidates=cfg.eval_stack,
    )
    rows, diff = [], {k: 0.0 for k in COMPARED}
    for name, old in folders.items():
        r = report.results[name].to_dict()
        row = {**{k: old[k] for k in ("method", "k", "n_params")}, **{k: r[k] for k in ROW_KEYS if k in r}}
        rows.append(row)
        for k in COMPARED:
            if old.get(k) is not None and row.get(k) is not None:
                diff[k] = max(diff[k], abs(float(row[k]) - float(old[k])))
    echo(format_table(rows))
    b = report.baselines
    echo(f"clean CE {b.ce_clean:.4f} (recorded {results['ce_clean']:.4f}), zero-ablated {b.ce_zero_ablation:.4f} "
         f"(recorded {results['ce_zero_ablation']:.4f}) on {b.n_tokens:,} held-out predictions")
    echo("largest difference from the recorded rows: " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
    return {"rows": rows, "baselines": b.to_dict(), "max_abs_difference": diff, "report": report}


__all__ = ["COMPARED", "is_run_dir", "reevaluate_run", "run_config"]
