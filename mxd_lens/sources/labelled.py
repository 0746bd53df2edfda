"""Labelled text with no dataset hub, for probing: built from Debian packages, or your own.

Tasks (names for :func:`load_task`):

| task | classes | texts | document (the unit of the train/test split) |
| --- | --- | --- | --- |
| ``language`` | en de es it pt pl cs ru | fortune cookies of the ``fortunes`` packages in eight languages | one fortune |
| ``topic`` | computers science politics law food sports | English fortunes, labelled by the file they come from | one fortune |
| ``book`` | the default corpus's seven books | paragraphs of the books | one chapter |

Every task is balanced (``n_train`` and ``n_test`` texts per class, exactly), de-duplicated
(a text that occurs twice, under any label, is dropped everywhere) and split by document,
so no document has texts on both sides. The choice is deterministic: texts are ordered by
a hash of their content and ``seed``.

The fortune packages (about 5 MB) are fetched once with ``apt-get download``, like the
default corpus (``$MXD_LENS_LABELLED_DEBS``: a folder holding the ``.deb`` files instead),
and the extracted fortunes cached in ``<cache>/labelled/`` with SHA-256 sums of the
packages and of the extracted file in its ``manifest.json``, checked on every load.

Your own labelled text: :func:`load_labelled` reads a ``.jsonl`` or ``.csv`` file with a
text and a label column (and optionally a document column).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from mxd_lens.atomic import copy_file, write_text
from mxd_lens.sources.cache import mxd_lens_cache_dir
from mxd_lens.sources.corpus import (
    _BOOKS, _apt_download, _paragraphs, _run, debs_from_env, prepare_default_corpus, split_chapters,
)

__all__ = [
    "LABELLED_DEBS_ENV_VAR",
    "LANGUAGES",
    "TOPICS",
    "TASKS",
    "LabelledTexts",
    "labelled_folder",
    "prepare_fortunes",
    "load_fortunes",
    "language_task",
    "topic_task",
    "book_task",
    "load_task",
    "load_labelled",
    "balanced_split",
]

LABELLED_DEBS_ENV_VAR = "MXD_LENS_LABELLED_DEBS"
_FORMAT = 1  # bump when the cached file changes meaning
_DATA_FILE = "fortunes.jsonl"

LANGUAGES: dict[str, tuple[str, ...]] = {
    "en": ("fortunes", "fortunes-min"),
    "de": ("fortunes-de",),
    "es": ("fortunes-es",),
    "it": ("fortunes-it",),
    "pt": ("fortunes-br",),  # Brazilian Portuguese
    "pl": ("fortunes-pl",),
    "cs": ("fortunes-cs",),
    "ru": ("fortunes-ru",),
}
"""Language code -> the Debian packages holding its fortunes."""
_PACKAGES = tuple(p for packages in LANGUAGES.values() for p in packages)

TOPICS: tuple[str, ...] = ("computers", "science", "politics", "law", "food", "sports")
"""Files of the English ``fortunes`` package used as topics: the distinct subjects with
more than 96 fortunes of usable length (other files are people, styles or grab-bags)."""

# Files that are not prose of the package's language: ASCII art, translation exercises,
# the offensive sections some packages carry, and fortunes-cs's Slovak classics.
_SKIP_FILE = re.compile(r"(^|/)(off/|ascii-?art|asciiart|translate-me|klasik-sk|banner)")
_MIN_CHARS, _MAX_CHARS = 40, 400
"""Fortunes shorter than this say too little, longer ones are mostly ASCII art or lists."""
_BOOK_MIN_CHARS, _BOOK_MAX_CHARS = 150, 500
"""Book paragraphs shorter than this are dialogue fragments; longer ones are cut here
(at a word boundary): the probe reads the first few dozen tokens anyway."""
_ALTERNATIVE = "or pass your own labelled text to mxd_lens.sources.load_labelled (a .jsonl or .csv file)"


@dataclass
class LabelledTexts:
    """A balanced labelled dataset split into train and test by document."""

    task: str
    """Name of the task (e.g. 'language', or the file it was read from)."""
    classes: list[str]
    """Class names; a label is an index into this list."""
    texts: dict[str, list[str]]
    """Split ('train', 'test') -> texts."""
    labels: dict[str, list[int]]
    """Split -> class index of each text."""
    documents: dict[str, list[str]] = field(default_factory=dict)
    """Split -> the document each text comes from (no document is in both splits)."""

    def sizes(self) -> dict[str, dict[str, int]]:
        """Split -> class -> number of texts."""
        return {
            split: {c: sum(1 for y in ys if y == i) for i, c in enumerate(self.classes)}
            for split, ys in self.labels.items()
        }

    def describe(self) -> str:
        """One line: the task, its classes and the per-class sizes."""
        sizes = self.sizes()
        per = ", ".join(f"{split} {next(iter(set(s.values())), 0)}" for split, s in sizes.items())
        return f"{self.task}: {len(self.classes)} classes ({', '.join(self.classes)}), per class {per}"


# -- the fortune packages ----------------------------------------------------------------


def labelled_folder() -> Path:
    """Where the fortunes are cached: ``fortunes.jsonl``, ``manifest.json`` and the source
    packages in ``debs/``."""
    return mxd_lens_cache_dir() / "labelled"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        return None
    return manifest


def prepare_fortunes() -> Path:
    """Fetch, extract and cache the fortunes if not cached (or if the cached file's
    SHA-256 does not match its manifest); return the folder."""
    folder = labelled_folder()
    manifest = _manifest(folder)
    data = folder / _DATA_FILE
    if manifest is not None and data.is_file() and _sha256(data) == manifest.get("sha256"):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mxd-labelled-") as tmp:
        work = Path(tmp)
        debs = _obtain_debs(work, manifest)
        records: list[dict[str, str]] = []
        for package in _PACKAGES:
            root = work / f"x-{package}"
            _run(["dpkg-deb", "-x", str(debs[package]), str(root)], f"unpacking {debs[package].name}",
                 instead=_ALTERNATIVE.removeprefix("or "))
            records.extend(_fortunes_of(root, package))
        kept = folder / "debs"
        kept.mkdir(exist_ok=True)
        for package, path in debs.items():
            if path.parent.resolve() != kept.resolve():
                copy_file(path, kept / path.name)
            debs[package] = kept / path.name
    write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    new = {
        "format": _FORMAT,
        "packages": {p: {"file": debs[p].name, "sha256": _sha256(debs[p])} for p in _PACKAGES},
        "fortunes": len(records),
        "sha256": _sha256(data),
    }
    # The manifest goes last: its checksum marks a complete cache.
    write_text(folder / "manifest.json", json.dumps(new, indent=1))
    return folder


def _obtain_debs(work: Path, manifest: dict | None) -> dict[str, Path]:
    """The fortune packages: from $MXD_LENS_LABELLED_DEBS, those kept from an earlier
    fetch (if their SHA-256 matches the manifest), or ``apt-get download``."""
    given = debs_from_env(LABELLED_DEBS_ENV_VAR, _PACKAGES, _ALTERNATIVE)
    if given is not None:
        return given
    kept = labelled_folder() / "debs"
    known = (manifest or {}).get("packages", {})
    found = {p: sorted(kept.glob(f"{p}_*.deb")) for p in _PACKAGES}
    if all(found.values()) and all(
        known.get(p, {}).get("sha256") in (None, _sha256(paths[-1])) for p, paths in found.items()
    ):
        return {p: paths[-1] for p, paths in found.items()}
    instead = f"set {LABELLED_DEBS_ENV_VAR} to a folder holding the .deb files {_ALTERNATIVE}"
    _apt_download(list(_PACKAGES), work, "downloading the fortune packages", instead=instead)
    debs = {p: sorted(work.glob(f"{p}_*.deb")) for p in _PACKAGES}
    missing = [p for p, paths in debs.items() if not paths]
    if missing:
        raise RuntimeError(f"apt-get download produced no .deb for {missing}; {instead}.")
    return {p: paths[-1] for p, paths in debs.items()}


def _fortunes_of(root: Path, package: str) -> Iterable[dict[str, str]]:
    """Every fortune of one unpacked package: {package, file, text}. A fortune file is
    plain text with fortunes separated by lines holding only '%'; `.dat` index files and
    the `.u8` links to the same files are skipped."""
    base = root / "usr" / "share" / "games" / "fortunes"
    for path in sorted(base.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        rel = path.relative_to(base).as_posix()
        if _SKIP_FILE.search(rel):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # a legacy-encoded file: its language's other files suffice
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        for part in re.split(r"(?m)^%[ \t]*$", text):
            if part.strip():
                yield {"package": package, "file": rel, "text": part.strip("\n")}


_LOADED: dict[tuple[str, int, int], list[dict[str, str]]] = {}
"""The parsed cache file, by (path, mtime, size): several tasks read it in one process."""


def load_fortunes() -> list[dict[str, str]]:
    """All cached fortunes as {package, file, text} records (fetched on first use)."""
    data = prepare_fortunes() / _DATA_FILE
    stat = data.stat()
    key = (str(data), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        with open(data, encoding="utf-8") as f:
            _LOADED.clear()
            _LOADED[key] = [json.loads(line) for line in f if line.strip()]
    return [dict(r) for r in _LOADED[key]]


def _clean(text: str, max_chars: int | None = None) -> str:
    """Whitespace collapsed to single spaces; cut at a word boundary past `max_chars`."""
    text = " ".join(text.split())
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


def _usable(text: str) -> bool:
    return _MIN_CHARS <= len(text) <= _MAX_CHARS and sum(c.isalpha() for c in text) >= 0.6 * len(text.replace(" ", ""))


# -- balancing and splitting ------------------------------------------------------------------


def _order_key(text: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}\0{text}".encode("utf-8")).hexdigest()


def balanced_split(
    task: str,
    items: Sequence[tuple[str, str, str]],
    n_train: int,
    n_test: int,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> LabelledTexts:
    """Balance and split (text, label, document) triples.

    De-duplicates first (a text seen twice is dropped everywhere: under two labels it
    would be contradictory, under one it could land in both splits). Per class, documents
    are taken in a seeded hash order into the test split until it holds `n_test` texts,
    the rest go to train; then exactly `n_train` and `n_test` texts per class are kept.
    A class with too few texts or documents is a ValueError naming it and its counts.
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}={n!r}; expected a positive integer")
    counts: dict[str, int] = defaultdict(int)
    for text, _, _ in items:
        counts[text.casefold()] += 1
    by_class: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for text, label, doc in items:
        if counts[text.casefold()] == 1:
            by_class[label][doc].append(text)
    names = list(classes) if classes is not None else sorted(by_class)
    if len(names) < 2:
        raise ValueError(f"{task}: found classes {names}; a probing task needs at least 2")
    texts: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    documents: dict[str, list[str]] = {"train": [], "test": []}
    for index, label in enumerate(names):
        docs = by_class.get(label, {})
        total = sum(len(v) for v in docs.values())
        if total < n_train + n_test:
            raise ValueError(
                f"{task}: class {label!r} has {total} unique texts in {len(docs)} documents, fewer than "
                f"n_train + n_test = {n_train} + {n_test}; lower them"
            )
        order = sorted(docs, key=lambda d: _order_key(d, seed))
        test_docs, train_docs, in_test = [], [], 0
        for doc in order:
            if in_test < n_test:
                test_docs.append(doc)
                in_test += len(docs[doc])
            else:
                train_docs.append(doc)
        for split, chosen, n in (("test", test_docs, n_test), ("train", train_docs, n_train)):
            pool = [(t, d) for d in chosen for t in docs[d]]
            pool.sort(key=lambda td: _order_key(td[0], seed))
            if len(pool) < n:
                raise ValueError(
                    f"{task}: class {label!r} has {len(pool)} texts left for {split} after splitting its "
                    f"{len(docs)} documents by document, fewer than {n}; lower n_train/n_test"
                )
            for t, d in pool[:n]:
                texts[split].append(t)
                labels[split].append(index)
                documents[split].append(f"{label}/{d}")
    return LabelledTexts(task, names, texts, labels, documents)


# -- the built-in tasks ---------------------------------------------------------------------------


def language_task(n_train: int = 64, n_test: int = 32, seed: int = 0) -> LabelledTexts:
    """Language identification over the fortunes of eight languages (see `LANGUAGES`)."""
    lang_of = {p: lang for lang, packages in LANGUAGES.items() for p in packages}
    items = []
    for r in load_fortunes():
        text = _clean(r["text"])
        if _usable(text):
            items.append((text, lang_of[r["package"]], f"{r['package']}/{r['file']}#{_order_key(text, 0)[:12]}"))
    return balanced_split("language", items, n_train, n_test, seed, classes=list(LANGUAGES))


def topic_task(n_train: int = 64, n_test: int = 32, seed: int = 0) -> LabelledTexts:
    """Topic of an English fortune: the file of the ``fortunes`` package it is in (`TOPICS`)."""
    items = []
    for r in load_fortunes():
        if r["package"] != "fortunes" or r["file"] not in TOPICS:
            continue
        text = _clean(r["text"])
        if _usable(text):
            items.append((text, r["file"], _order_key(text, 0)[:12]))
    return balanced_split("topic", items, n_train, n_test, seed, classes=list(TOPICS))


def book_task(n_train: int = 64, n_test: int = 32, seed: int = 0) -> LabelledTexts:
    """Which of the default corpus's seven books a paragraph is from; split by chapter."""
    folder = prepare_default_corpus()
    items = []
    for book in _BOOKS:
        chapters = split_chapters((folder / f"{book.name}.txt").read_text(encoding="utf-8"))
        for c, chapter in enumerate(chapters):
            for paragraph in _paragraphs(chapter.split("\n")):
                text = _clean(paragraph, _BOOK_MAX_CHARS)
                if len(text) >= _BOOK_MIN_CHARS:
                    items.append((text, book.name, f"chapter{c:03d}"))
    return balanced_split("book", items, n_train, n_test, seed, classes=[b.name for b in _BOOKS])


TASKS: dict[str, Callable[..., LabelledTexts]] = {
    "language": language_task,
    "topic": topic_task,
    "book": book_task,
}
"""Built-in task name -> builder(n_train, n_test, seed)."""


def load_task(task: str, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> LabelledTexts:
    """A built-in task by name (`TASKS`; None sizes: 64 and 32 per class), or your own
    labelled file (a path ending in .jsonl or .csv, read by `load_labelled`; None sizes:
    from its smallest class)."""
    if task in TASKS:
        return TASKS[task](n_train=n_train or 64, n_test=n_test or 32, seed=seed)
    if task.endswith((".jsonl", ".csv")):
        return load_labelled(task, n_train=n_train, n_test=n_test, seed=seed)
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)} or a .jsonl/.csv file")


def load_labelled(
    path: str | os.PathLike[str],
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
    document_column: str | None = None,
    test_fraction: float = 1 / 3,
) -> LabelledTexts:
    """Your own labelled text: a ``.jsonl`` (one JSON object per line) or ``.csv`` file
    (with a header) holding a text and a label column.

    Args:
        path: the file.
        n_train, n_test: texts per class in each split; None: as many as the smallest
            class allows, `test_fraction` of them for test.
        seed: the order texts are chosen in.
        text_column, label_column: the columns to read (labels are compared as strings).
        document_column: the column naming each text's document, so that no document is
            in both splits; None: every row is its own document.
        test_fraction: share of each class for test when n_train/n_test are None.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no such labelled file: {str(path)!r}")
    if file.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{file}: expected a .jsonl or .csv file, got {file.suffix!r}")
    rows: list[dict] = []
    with open(file, encoding="utf-8", newline="") as f:
        if file.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{file}:{i}: not a JSON object ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{file}:{i}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    if not rows:
        raise ValueError(f"{file}: no rows")
    wanted = [text_column, label_column] + ([document_column] if document_column else [])
    for i, row in enumerate(rows, 1):
        missing = [c for c in wanted if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"{file}: row {i} has no {missing} (its columns: {sorted(row)})")
    items = [
        (_clean(str(r[text_column])), str(r[label_column]), str(r[document_column]) if document_column else f"row{i}")
        for i, r in enumerate(rows)
    ]
    if n_train is None or n_test is None:
        per_class: dict[str, int] = defaultdict(int)
        seen: dict[str, int] = defaultdict(int)
        for t, _, _ in items:
            seen[t.casefold()] += 1
        for t, label, _ in items:
            if seen[t.casefold()] == 1:
                per_class[label] += 1
        smallest = min(per_class.values()) if per_class else 0
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction={test_fraction}; expected a number in (0, 1)")
        n_test = n_test or max(1, int(smallest * test_fraction))
        n_train = n_train or smallest - n_test
    return balanced_split(file.name, items, n_train, n_test, seed)
