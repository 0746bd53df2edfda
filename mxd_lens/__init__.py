"""mxd_lens: Mixture of Decoders (Oldfield et al. 2025) for TransformerLens.

Sparse, faithful replacements for a transformer's MLP layers whose experts are full-rank
linear maps, with TopK transcoder baselines, splicing into HookedTransformer models,
training, evaluation and SAE-Lens interop.
"""

from mxd_lens.attach import attach
from mxd_lens.config import MxDConfig, ReplacementConfig, TranscoderConfig
from mxd_lens.io import load, save
from mxd_lens.mxd import MxD
from mxd_lens.params import match_n_experts, mxd_n_params, transcoder_n_params
from mxd_lens.replacement import Replacement
from mxd_lens.transcoder import SkipTranscoder, TopKTranscoder
from mxd_lens import saelens as _saelens  # registers the SAE-Lens architectures
from mxd_lens.sae_site import OutputSiteSAE  # registers the output-site SAE architecture

__version__ = "0.1.0"

__all__ = [
    "MxD",
    "MxDConfig",
    "TopKTranscoder",
    "SkipTranscoder",
    "TranscoderConfig",
    "ReplacementConfig",
    "Replacement",
    "OutputSiteSAE",
    "attach",
    "load",
    "save",
    "match_n_experts",
    "mxd_n_params",
    "transcoder_n_params",
    "load_default_model",
    "load_default_corpus",
    "load_model",
    "load_texts",
    "__version__",
]


def __getattr__(name: str):
    # The data sources pull in transformers/gguf; import them only when asked for.
    if name in {"load_default_model", "load_default_corpus", "load_model", "load_texts"}:
        from mxd_lens import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'mxd_lens' has no attribute {name!r}")
