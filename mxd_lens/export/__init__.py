"""Interchange with other tools' file formats: circuit-tracer's transcoder sets and
EleutherAI sparsify's transcoder folders (`mxd-lens export`).

    from mxd_lens.export import export_circuit_tracer, export_sparsify, load_sparsify

Both tools hook the Hugging Face MLP's input (the norm's output), where mxd_lens modules
read `ln2.hook_normalized` of a fold_ln=True model: `norms` holds the map between the
two. Files: `circuit_tracer`, `sparsify` (export and reader), `norms`, `common` (module
folders, what can be represented), `command` (the `mxd-lens export` subcommand). MxDs
have no counterpart in either format and are refused.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_subcommand": "command", "run": "command",
    "export_circuit_tracer": "circuit_tracer",
    "export_sparsify": "sparsify", "is_sparsify_folder": "sparsify", "load_sparsify": "sparsify",
    "MlpInputNorm": "norms", "ModelNorms": "norms", "model_norms": "norms",
    "check_representable": "common", "module_folders": "common",
}
"""Name -> the submodule that defines it: imported on first use, so that the command line
can register `mxd-lens export` without importing torch."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mxd_lens.export.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mxd_lens.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
