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

_OURS: set[str] = set()
"""SAE-Lens architecture names this package put into SAE-Lens's registry."""


def register_with_saelens(archs: Iterable[registry.Architecture] | None = None) -> None:
    """Put the SAE-Lens classes of `archs` (default: every registered architecture) into
    SAE-Lens's registry, so `SAE.load_from_disk` / `SAE.from_pretrained` read their
    folders. Safe to call again (a re-registration replaces our own earlier classes);
    refuses to replace another package's class of the same name."""
    from sae_lens.registry import SAE_CLASS_REGISTRY

    for arch in registry.architectures() if archs is None else archs:
        classes = arch.sae_classes
        if classes is None:
            continue
        existing = SAE_CLASS_REGISTRY.get(arch.name)
        if existing is not None and arch.name not in _OURS and existing != classes:
            raise ValueError(
                f"SAE-Lens architecture {arch.name!r} is already registered by {existing[0].__module__}."
                f"{existing[0].__qualname__}; mxd_lens cannot register its own"
            )
        SAE_CLASS_REGISTRY[arch.name] = classes
        _OURS.add(arch.name)


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
]
