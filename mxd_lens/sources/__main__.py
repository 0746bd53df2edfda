"""``python -m mxd_lens.sources prepare``: fill the corpus and model caches.

Idempotent: with warm caches it only checks them (about a second).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mxd_lens.sources.cache import mxd_lens_cache_dir
from mxd_lens.sources.corpus import default_corpus_folder, load_default_corpus, prepare_default_corpus
from mxd_lens.sources.model import (
    DEFAULT_MODEL_NAME,
    default_model_folder,
    prepare_default_model,
    processed_weights_folder,
)


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
    return f"{total / 1e6:,.1f} MB"


def prepare() -> None:
    print(f"cache: {mxd_lens_cache_dir()}")
    start = time.perf_counter()
    was_cached = (default_corpus_folder() / "manifest.json").is_file()
    folder = prepare_default_corpus()
    splits = {split: load_default_corpus(split) for split in ("train", "heldout")}
    counts = "; ".join(
        f"{split}: {len(docs)} documents, {sum(map(len, docs)):,} characters"
        for split, docs in splits.items()
    )
    action = "already cached" if was_cached else "fetched and extracted"
    print(f"corpus: {action} in {folder} ({_size(folder)}, {time.perf_counter() - start:.1f} s)")
    print(f"  {counts}")

    start = time.perf_counter()
    done = prepare_default_model()
    steps = [name for name, did in (("converted the GGUF", done["converted"]),
                                     ("processed the weights", done["processed"])) if did]
    action = " and ".join(steps) if steps else "already cached"
    print(f"model: {DEFAULT_MODEL_NAME} {action} ({time.perf_counter() - start:.1f} s)")
    print(f"  {default_model_folder()} ({_size(default_model_folder())})")
    print(f"  {processed_weights_folder()} ({_size(processed_weights_folder())})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mxd_lens.sources",
        description="Manage the default model and corpus caches of mxd_lens.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="download/convert the default corpus and model once")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            prepare()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
