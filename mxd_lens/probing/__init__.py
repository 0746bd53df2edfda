"""Sparse probing of replacement units (MxD experts, transcoder latents, SAE-Lens SAEs)
against the MLP's own neurons and random directions, on labelled text with no hub.

    from mxd_lens.probing import probe_sources, format_table
    from mxd_lens.sources.labelled import load_task

Files: `features` (mean-pooled unit activations of texts), `probes` (top units by
class-mean difference, one-feature and k-sparse logistic regressions, F1), `report`
(several sources and tasks at once, the table and the figure), `command` (the
`mxd-lens probe` and `mxd-lens steer` subcommands).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_subcommand": "command", "add_steer_subcommand": "command",
    "MLPActivations": "features", "FeatureSource": "features", "module_source": "features",
    "neuron_source": "features", "random_source": "features", "random_directions": "features",
    "text_tokens": "features", "pooled_features": "features",
    "DEFAULT_KS": "probes", "BinaryResult": "probes", "TaskResult": "probes", "f1_score": "probes",
    "accuracy": "probes", "mean_diff_ranking": "probes", "one_vs_rest": "probes", "probe_binary": "probes",
    "probe_task": "probes",
    "NEURONS": "report", "RANDOM": "report", "baseline_sources": "report", "probe_sources": "report",
    "format_table": "report", "probe_figure": "report",
}
"""Name -> the submodule that defines it: imported on first use, so that the command line
can register `mxd-lens probe` without importing torch."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mxd_lens.probing.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mxd_lens.probing' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
