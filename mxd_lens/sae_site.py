"""Moved: `OutputSiteSAE` to `mxd_lens.architectures.output_sae`, the SAE-Lens training
runner to `mxd_lens.training.sae_lens_runner`; re-exported here so that existing imports
keep working."""

from mxd_lens.architectures.output_sae import OutputSAEConfig, OutputSiteSAE
from mxd_lens.training.sae_lens_runner import SAETrainConfig, train_output_sae, train_sae_lens

__all__ = ["OutputSAEConfig", "OutputSiteSAE", "SAETrainConfig", "train_output_sae", "train_sae_lens"]
