"""Experiments built on the pipeline: the sparsity-accuracy frontier, its results schema
and figures, and publishing runs to the Hugging Face hub."""
