"""The architectures: one file each (config, module, SAE-Lens view), all built on `base`.

| file | architectures |
| --- | --- |
| `mxd.py` | `MxD` ("mxd") |
| `transcoder.py` | `TopKTranscoder` ("topk_transcoder"), `SkipTranscoder` ("topk_skip_transcoder") |
| `output_sae.py` | `OutputSiteSAE` ("mlp_out_topk_sae"): a TopK SAE on the MLP output |
| `saelens_adapter.py` | `SAELensModule`: any SAE-Lens SAE or transcoder, as it is |

`mxd_lens.registry` is the table that names them; `register_with_saelens` puts every
registered architecture with SAE-Lens classes into SAE-Lens's registry.
"""

from __future__ import annotations

from typing import Iterable

from mxd_lens import registry
from mxd_lens.architectures.base import (
    Encoding,
    Replacement,
    ReplacementConfig,
    ReplacementSAE,
    ReplacementSAEConfig,
    Sizes,
    Splice,
    StepOutput,
    UnitMath,
)
from mxd_lens.architectures.mxd import MxD, MxDConfig
from mxd_lens.architectures.output_sae import OutputSAEConfig, OutputSiteSAE
from mxd_lens.architectures.transcoder import SkipTranscoder, TopKTranscoder, TranscoderConfig


def _is_ours(cls: type) -> bool:
    """Whether an SAE-Lens class is one of mxd_lens's views (from any import or reload of
    its file: a reloaded file makes new classes that must replace the old ones)."""
    return any(c.__name__ == "ReplacementSAE" and c.__module__ == "mxd_lens.architectures.base" for c in cls.__mro__)


def register_with_saelens(archs: Iterable[registry.Architecture] | None = None) -> None:
    """Put the SAE-Lens classes of `archs` (default: every registered architecture) into
    SAE-Lens's registry, so `SAE.load_from_disk` / `SAE.from_pretrained` read their
    folders. Safe to call again (a re-registration replaces our own earlier classes);
    refuses an architecture missing from `mxd_lens.registry` (mxd_lens could not load
    its folders) and refuses to replace another package's class of the same name."""
    from sae_lens.registry import SAE_CLASS_REGISTRY

    for arch in registry.architectures() if archs is None else archs:
        if registry.find(arch.name) is not arch:
            raise ValueError(
                f"architecture {arch.name!r} is not in mxd_lens.registry (or another entry has its name); "
                "add it with mxd_lens.registry.register(Architecture(...)), which registers it with SAE-Lens"
            )
        classes = arch.sae_classes
        if classes is None:
            continue
        existing = SAE_CLASS_REGISTRY.get(arch.name)
        if existing is not None and existing != classes and not _is_ours(existing[0]):
            raise ValueError(
                f"SAE-Lens architecture {arch.name!r} is already registered by {existing[0].__module__}."
                f"{existing[0].__qualname__}; mxd_lens cannot register its own"
            )
        SAE_CLASS_REGISTRY[arch.name] = classes


def unregister_from_saelens(name: str) -> None:
    """Take architecture `name` out of SAE-Lens's registry when it holds mxd_lens's classes
    there (`mxd_lens.registry.unregister` calls this); another package's class stays."""
    from sae_lens.registry import SAE_CLASS_REGISTRY

    existing = SAE_CLASS_REGISTRY.get(name)
    if existing is not None and _is_ours(existing[0]):
        del SAE_CLASS_REGISTRY[name]


register_with_saelens()
_READY = True
"""Set last: the module is fully imported (see mxd_lens._saelens_hook)."""

__all__ = [
    "Encoding",
    "MxD",
    "MxDConfig",
    "OutputSAEConfig",
    "OutputSiteSAE",
    "Replacement",
    "ReplacementConfig",
    "ReplacementSAE",
    "ReplacementSAEConfig",
    "SkipTranscoder",
    "Sizes",
    "Splice",
    "StepOutput",
    "TopKTranscoder",
    "TranscoderConfig",
    "UnitMath",
    "register_with_saelens",
    "unregister_from_saelens",
]
