"""Circuit analysis through a replacement's units: activation and attribution patching,
faithfulness curves with the error term as a node, tasks, steering, expert inspection
and their figures.

    from mxd_lens.circuits import ioi_task, faithfulness_curve

Files: `patching` (captures, patched runs, attribution), `tasks` (Task, ioi_task),
`curves` (faithfulness curves, attribution-vs-activation agreement), `figures`
(plotly figures and their atomic writers), `command` (the `mxd-lens circuit`
subcommand), `steering`, `experts`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_subcommand": "command", "module_folders": "command", "run": "command",
    "Agreement": "curves", "FaithfulnessCurve": "curves", "Ranking": "curves",
    "attribution_agreement": "curves", "curve_grid": "curves", "faithfulness_curve": "curves",
    "LayerShares": "curves", "layer_shares": "curves",
    "curve_figure": "figures", "patching_heatmap": "figures", "write_html": "figures", "write_json": "figures",
    "IOI_NAMES": "tasks", "IOI_OBJECTS": "tasks", "IOI_PLACES": "tasks", "Task": "tasks", "ioi_task": "tasks",
}
"""Name -> the submodule that defines it: imported on first use, so that the command line
can register `mxd-lens circuit` without importing torch."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mxd_lens.circuits.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mxd_lens.circuits' has no attribute {name!r}")


__all__ = [
    "Task",
    "ioi_task",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "curve_grid",
    "LayerShares",
    "layer_shares",
    "Agreement",
    "attribution_agreement",
    "curve_figure",
    "patching_heatmap",
    "write_html",
    "write_json",
    "add_subcommand",
    "run",
]
