"""Training MxDs and transcoders on a language model's MLP activations.

`fit(model, {name: (layer, module)}, tokens, TrainerConfig(...))` trains several modules in
place from one activation stream; `ActivationSource` is that stream.
"""

from mxd_lens.training.activations import ActivationSource, DataPosition, NonFiniteActivationError, check_servable
from mxd_lens.training.config import ActivationConfig, TrainerConfig
from mxd_lens.training.trainer import TrainSummary, fit

__all__ = [
    "fit",
    "TrainerConfig",
    "ActivationConfig",
    "TrainSummary",
    "ActivationSource",
    "DataPosition",
    "NonFiniteActivationError",
    "check_servable",
]
