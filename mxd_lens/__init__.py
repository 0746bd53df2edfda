"""mxd_lens: Mixture of Decoders (Oldfield et al. 2025) for TransformerLens.

Sparse, faithful replacements for a transformer's MLP layers whose experts are full-rank
linear maps, with TopK transcoder baselines, splicing into HookedTransformer models,
training, evaluation and SAE-Lens interop.

Importing the package is light (no torch): every public name below is imported on first
use, so `mxd-lens --help` answers at once. SAE-Lens still learns our architectures on
`import mxd_lens`: they are registered right away when SAE-Lens is already imported, else
the moment it is (see `mxd_lens._saelens_hook`), so `SAE.load_from_disk` works after
`import mxd_lens` either way.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from mxd_lens._saelens_hook import install as _install_saelens_hook

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "MxD": "mxd_lens.architectures.mxd",
    "MxDConfig": "mxd_lens.architectures.mxd",
    "TopKTranscoder": "mxd_lens.architectures.transcoder",
    "SkipTranscoder": "mxd_lens.architectures.transcoder",
    "TranscoderConfig": "mxd_lens.architectures.transcoder",
    "ReplacementConfig": "mxd_lens.architectures.base",
    "Replacement": "mxd_lens.architectures.base",
    "OutputSiteSAE": "mxd_lens.architectures.output_sae",
    "SAELensModule": "mxd_lens.architectures.saelens_adapter",
    "attach": "mxd_lens.attach",
    "load": "mxd_lens.storage",
    "save": "mxd_lens.storage",
    "match_n_experts": "mxd_lens.params",
    "mxd_n_params": "mxd_lens.params",
    "transcoder_n_params": "mxd_lens.params",
    "load_default_model": "mxd_lens.sources",
    "load_default_corpus": "mxd_lens.sources",
    "load_model": "mxd_lens.sources",
    "load_texts": "mxd_lens.sources",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mxd_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`mxd_lens.attach` is both an exported function and the submodule that defines it.
    Importing the submodule binds it on the package (Python's import system does), which
    would make `mxd_lens.attach(...)` and `from mxd_lens import attach` the module once
    anything imported `mxd_lens.attach` first; the exported name keeps the function (the
    submodule stays importable as `mxd_lens.attach` through sys.modules)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


_install_saelens_hook()
