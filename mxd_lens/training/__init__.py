"""Training MxDs and transcoders on a language model's MLP activations.

`fit(model, {name: (layer, module)}, tokens, TrainerConfig(...))` trains several modules in
place from one activation stream; `ActivationSource` is that stream. Names are imported on
first use, so the configs (`TrainerConfig`, `ActivationConfig`) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fit": "mxd_lens.training.trainer",
    "TrainSummary": "mxd_lens.training.trainer",
    "TrainerConfig": "mxd_lens.training.config",
    "ActivationConfig": "mxd_lens.training.config",
    "ActivationSource": "mxd_lens.training.activations",
    "DataPosition": "mxd_lens.training.activations",
    "NonFiniteActivationError": "mxd_lens.training.activations",
    "check_servable": "mxd_lens.training.activations",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mxd_lens.training' has no attribute {name!r}")
