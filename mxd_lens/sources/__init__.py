"""Models and text that run with no hub: the default model and corpus, or your own.

* :func:`load_default_model` / :func:`load_model` -- a processed HookedTransformer.
* :func:`load_default_corpus` / :func:`load_texts` -- documents as strings.
* :func:`token_rows` -- documents to ``[rows, context]`` token tensors.
* :func:`open_dataset` / :func:`dataset_token_rows` -- any dataset format (hub stream,
  ``save_to_disk`` folder, .jsonl/.parquet/.txt, token arrays) to memory-mapped token rows.

* :func:`load_task` / :func:`load_labelled` -- labelled text for probing (languages,
  topics and books from Debian packages and the default corpus, or your own .jsonl/.csv).

``python -m mxd_lens.sources prepare`` fills the caches (see :func:`mxd_lens_cache_dir`).
"""

from mxd_lens.sources.cache import mxd_lens_cache_dir
from mxd_lens.sources.corpus import (
    load_default_corpus,
    load_texts,
    prepare_default_corpus,
    split_chapters,
    token_rows,
)
from mxd_lens.sources.labelled import LabelledTexts, load_labelled, load_task
from mxd_lens.sources.datasets import TokenDataset, dataset_token_rows, open_dataset, token_file_folder
from mxd_lens.sources.model import (
    DEFAULT_MODEL_NAME,
    load_default_model,
    load_model,
    prepare_default_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "load_default_model",
    "load_model",
    "prepare_default_model",
    "load_default_corpus",
    "load_texts",
    "token_rows",
    "split_chapters",
    "prepare_default_corpus",
    "mxd_lens_cache_dir",
    "TokenDataset",
    "open_dataset",
    "dataset_token_rows",
    "token_file_folder",
    "LabelledTexts",
    "load_task",
    "load_labelled",
]
