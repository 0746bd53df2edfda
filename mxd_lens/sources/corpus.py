"""Text corpora and token rows.

The default corpus is six Jane Austen novels and *Moby Dick* (public domain),
taken from two Debian packages of R data (``r-cran-janeaustenr`` and
``r-cran-tokenizers``) so that it needs no dataset hub. *Persuasion* is held
out whole for evaluation.

Public functions:

* :func:`load_default_corpus` -- the default corpus as chapter documents.
* :func:`load_texts` -- your own text files or a Hugging Face dataset.
* :func:`token_rows` -- documents to fixed-length token rows.
* :func:`split_chapters` -- the chapter/paragraph clean-up used for the books.
* :func:`prepare_default_corpus` -- fetch and cache the books (done on first use).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Int

from mxd_lens.atomic import copy_file, write_text
from mxd_lens.sources.cache import hub_offline, hub_reachable, mxd_lens_cache_dir
from mxd_lens.sources._rdata import LazyLoadDB, text_columns

__all__ = [
    "DEFAULT_SPLITS",
    "HELDOUT_BOOK",
    "DEBS_ENV_VAR",
    "load_default_corpus",
    "load_texts",
    "token_rows",
    "split_chapters",
    "prepare_default_corpus",
    "default_corpus_folder",
]

DEFAULT_SPLITS = ("train", "heldout")
HELDOUT_BOOK = "persuasion"
DEBS_ENV_VAR = "MXD_LENS_CORPUS_DEBS"
_CORPUS_FORMAT = 1  # bump when the cached files change meaning


@dataclass(frozen=True)
class _Book:
    name: str  # object name in the R database, also the cache file stem
    deb: str  # Debian package
    r_package: str  # R package folder inside the .deb


# Train books first, in a fixed order; the held-out book last.
_BOOKS = (
    _Book("emma", "r-cran-janeaustenr", "janeaustenr"),
    _Book("mansfieldpark", "r-cran-janeaustenr", "janeaustenr"),
    _Book("northangerabbey", "r-cran-janeaustenr", "janeaustenr"),
    _Book("prideprejudice", "r-cran-janeaustenr", "janeaustenr"),
    _Book("sensesensibility", "r-cran-janeaustenr", "janeaustenr"),
    _Book("mobydick", "r-cran-tokenizers", "tokenizers"),
    _Book(HELDOUT_BOOK, "r-cran-janeaustenr", "janeaustenr"),
)
_DEBS = tuple(dict.fromkeys(book.deb for book in _BOOKS))
_ALTERNATIVE = "or pass your own text files to mxd_lens.sources.load_texts"


# -- the default corpus -------------------------------------------------------


def default_corpus_folder() -> Path:
    """Where the book texts are cached: one ``.txt`` per book, ``manifest.json``
    and the source packages in ``debs/``."""
    return mxd_lens_cache_dir() / "corpus"


def load_default_corpus(split: str = "train") -> list[str]:
    """The default corpus as a list of chapter documents.

    Args:
        split: ``"train"`` (Emma, Mansfield Park, Northanger Abbey, Pride and
            Prejudice, Sense and Sensibility, Moby Dick, in that order) or
            ``"heldout"`` (the whole of Persuasion, never in "train").

    Each document is one chapter with its heading removed, hard-wrapped lines
    re-joined and paragraphs separated by ``"\\n\\n"``. The first call fetches
    two Debian packages (see :func:`prepare_default_corpus`); later calls read
    the cache.
    """
    if split not in DEFAULT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(DEFAULT_SPLITS)}")
    folder = prepare_default_corpus()
    books = [b for b in _BOOKS if (b.name == HELDOUT_BOOK) == (split == "heldout")]
    docs: list[str] = []
    for book in books:
        docs.extend(split_chapters((folder / f"{book.name}.txt").read_text(encoding="utf-8")))
    return docs


def prepare_default_corpus() -> Path:
    """Fetch, extract and cache the book texts if not cached yet; return the folder.

    Uses the ``.deb`` files in ``$MXD_LENS_CORPUS_DEBS`` if that is set, else
    those kept from an earlier fetch, else ``apt-get download``; unpacks them
    with ``dpkg-deb -x`` and reads the R data with the ``rdata`` package.
    """
    folder = default_corpus_folder()
    if _cache_is_complete(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mxd-corpus-") as tmp:
        work = Path(tmp)
        debs = _obtain_debs(work)
        texts: dict[str, str] = {}
        for deb in _DEBS:
            root = work / f"x-{deb}"
            _run(["dpkg-deb", "-x", str(debs[deb]), str(root)], f"unpacking {debs[deb].name}")
            for book in (b for b in _BOOKS if b.deb == deb):
                texts[book.name] = _book_text(root, book)
        # Keep the packages (2 MB): the cache can then be rebuilt offline
        # (MXD_LENS_CORPUS_DEBS=<cache>/corpus/debs) and the reader re-checked.
        kept = folder / "debs"
        kept.mkdir(exist_ok=True)
        for path in debs.values():
            if path.parent.resolve() != kept.resolve():
                copy_file(path, kept / path.name)
    for name, text in texts.items():
        write_text(folder / f"{name}.txt", text)
    manifest = {
        "format": _CORPUS_FORMAT,
        "packages": {deb: debs[deb].name for deb in _DEBS},
        "books": {name: len(text) for name, text in texts.items()},
    }
    # The manifest goes last: its presence marks a complete cache.
    write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
    return folder


def _cache_is_complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("format") == _CORPUS_FORMAT and all(
        (folder / f"{book.name}.txt").is_file() for book in _BOOKS
    )


def debs_from_env(var: str, packages: Sequence[str], alternative: str) -> dict[str, Path] | None:
    """The newest `<package>_*.deb` of each package in the folder named by $`var` (None when
    unset); a clear error naming the missing packages and `alternative` otherwise."""
    given = os.environ.get(var, "").strip()
    if not given:
        return None
    folder = Path(given).expanduser()
    found = {deb: sorted(folder.glob(f"{deb}_*.deb")) for deb in packages}
    missing = [deb for deb, paths in found.items() if not paths]
    if missing:
        raise RuntimeError(
            f"{var}={given} holds no {', '.join(m + '_*.deb' for m in missing)}; put the .deb files there {alternative}."
        )
    return {deb: paths[-1] for deb, paths in found.items()}


def _obtain_debs(work: Path) -> dict[str, Path]:
    """Paths of the two .deb files: from $MXD_LENS_CORPUS_DEBS, an earlier fetch
    kept in the cache, or ``apt-get download``."""
    given = debs_from_env(DEBS_ENV_VAR, _DEBS, _ALTERNATIVE)
    if given is not None:
        return given
    kept = default_corpus_folder() / "debs"  # packages from an earlier fetch
    if all(list(kept.glob(f"{deb}_*.deb")) for deb in _DEBS):
        return {deb: sorted(kept.glob(f"{deb}_*.deb"))[-1] for deb in _DEBS}
    _apt_download(list(_DEBS), work, "downloading the corpus packages")
    debs = {deb: sorted(work.glob(f"{deb}_*.deb")) for deb in _DEBS}
    missing = [deb for deb, paths in debs.items() if not paths]
    if missing:
        raise RuntimeError(
            f"apt-get download produced no .deb for {missing}; set {DEBS_ENV_VAR} to a folder "
            f"holding {', '.join(_DEBS)} .deb files {_ALTERNATIVE}."
        )
    return {deb: paths[-1] for deb, paths in debs.items()}


def _apt_download(packages: list[str], work: Path, what: str, instead: str | None = None) -> None:
    """`apt-get download packages` into `work`; on a fresh machine the package lists may
    be empty, so as root they are refreshed once and the download retried."""
    try:
        _run(["apt-get", "download", *packages], what, cwd=work, instead=instead)
    except RuntimeError:
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            raise
        _run(["apt-get", "update", "-qq"], "refreshing the package lists", instead=instead)
        _run(["apt-get", "download", *packages], what, cwd=work, instead=instead)


def _run(cmd: list[str], what: str, cwd: Path | None = None, instead: str | None = None) -> None:
    """Run a packaging tool; any failure becomes one clear RuntimeError (`instead`: what
    the user can do instead, for callers other than the default corpus)."""
    # Without apt-get, ready .deb files still work; without dpkg-deb, only own texts do.
    if instead is not None:
        pass
    elif cmd[0] == "apt-get":
        instead = f"set {DEBS_ENV_VAR} to a folder holding the .deb files {_ALTERNATIVE}"
    else:
        instead = _ALTERNATIVE.removeprefix("or ")
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(
            f"The default corpus needs `{cmd[0]}` (Debian/Ubuntu) for {what}, and it is not "
            f"installed; {instead}."
        )
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` timed out while {what}; {instead}.") from None
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise RuntimeError(f"`{' '.join(cmd)}` failed while {what} ({detail}); {instead}.")


def _book_text(root: Path, book: _Book) -> str:
    """One book's full text from the R lazy-load database unpacked under ``root``."""
    candidates = sorted(root.glob(f"**/{book.r_package}/data/Rdata.rdx"))
    if not candidates:
        raise ValueError(f"{root}: no {book.r_package}/data/Rdata.rdx in package {book.deb}")
    db = LazyLoadDB(candidates[0])
    if book.name not in db.index:
        raise ValueError(f"{db.rdx}: no object {book.name!r}; it holds {db.names()}")
    columns = text_columns(db.read(book.name))
    lines = columns.get("") or columns.get("text")
    if lines is None:
        raise ValueError(
            f"{db.rdb}: object {book.name!r} has no text (character columns: {list(columns)})"
        )
    # One element per printed line (Austen) or one element for the book (Moby Dick).
    text = "\n".join(line if line is not None else "" for line in lines)
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


# -- chapters and paragraphs ----------------------------------------------------

_NUMBERED_HEADING = re.compile(
    r"(CHAPTER|Chapter|VOLUME|Volume|BOOK|Book|PART|Part)\s+([IVXLCDM]+|\d+)\b[.:]?(\s.*)?"
)
_NAMED_HEADING = re.compile(
    r"(EPILOGUE|Epilogue|PROLOGUE|Prologue|PREFACE|Preface|ETYMOLOGY|EXTRACTS)\b.*"
)
# Editorial matter after the story ends (Northanger Abbey's Signet note).
_TRAILER = re.compile(r"A NOTE ON THE TEXT")
_END_MARK = re.compile(r"(THE END|The End|FINIS|Finis)\.?")
_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(
    r"(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I
)


def _heading_lines(lines: list[str], i: int) -> int:
    """How many lines the chapter heading starting at ``lines[i]`` spans (0: none).

    A heading is a short chapter-like line standing alone between blank lines;
    a long title may wrap onto one short second line (Moby Dick, chapter 56).
    Requiring blank lines around it keeps prose such as Moby Dick's
    "BOOK I. (FOLIO), CHAPTER I. (SPERM WHALE).--This whale..." out.
    """
    line = lines[i].strip()
    if not line or len(line) > 80:
        return 0
    if not (_NUMBERED_HEADING.fullmatch(line) or _NAMED_HEADING.fullmatch(line)):
        return 0
    if i > 0 and lines[i - 1].strip():
        return 0

    def blank(j: int) -> bool:
        return j >= len(lines) or not lines[j].strip()

    if blank(i + 1):
        return 1
    if len(lines[i + 1].strip()) <= 40 and blank(i + 2):
        return 2
    return 0


def _strip_gutenberg(lines: list[str]) -> list[str]:
    for i, line in enumerate(lines):
        if _GUTENBERG_START.match(line.strip()):
            lines = lines[i + 1 :]
            break
    for i, line in enumerate(lines):
        if _GUTENBERG_END.match(line.strip()):
            return lines[:i]
    return lines


def _paragraphs(lines: list[str]) -> list[str]:
    """Re-join hard-wrapped lines; drop rules ("* * *") and end marks."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        stripped = " ".join(line.split())  # also collapses Austen's double spaces
        if stripped:
            current.append(stripped)
            continue
        if current:
            text = current[0]
            for part in current[1:]:
                # A dash at a line end binds the words; anything else was a space.
                text += part if text.endswith("--") else " " + part
            if re.search(r"[A-Za-z]", text) and not _END_MARK.fullmatch(text):
                paragraphs.append(text)
            current = []
    return paragraphs


def split_chapters(text: str) -> list[str]:
    """Split a book's text into chapter documents.

    Project Gutenberg boilerplate and the front matter before the first
    heading are dropped; each chapter heading starts a new document and is not
    part of it; lines are re-joined within paragraphs; paragraphs are joined
    with ``"\\n\\n"``; empty chapters (e.g. a bare "VOLUME II") disappear.
    A text with no headings gives one document.
    """
    lines = _strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    for i, line in enumerate(lines):
        if _TRAILER.fullmatch(line.strip()):
            lines = lines[:i]
            break
    headings = [(i, n) for i in range(len(lines)) if (n := _heading_lines(lines, i))]
    if headings:
        ends = [i for i, _ in headings[1:]] + [len(lines)]
        sections = [lines[i + n : end] for (i, n), end in zip(headings, ends)]
    else:
        sections = [lines]
    docs = ["\n\n".join(_paragraphs(section)) for section in sections]
    return [doc for doc in docs if doc]


# -- user-supplied text -----------------------------------------------------------


def load_texts(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    split: str | None = None,
    text_column: str = "text",
) -> list[str]:
    """Documents from local text files or a Hugging Face dataset.

    Args:
        source: a ``.txt`` file, a folder (its ``*.txt`` files, sorted by name,
            not recursive), a list of files, or a Hugging Face dataset name.
        split: dataset split (default ``"train"``); ignored for local files.
        text_column: dataset column holding the text.

    Returns:
        One document per non-empty file, or per non-empty dataset row.

    Raises:
        FileNotFoundError: a path that looks local does not exist.
        RuntimeError: a dataset cannot be loaded (no ``datasets``, offline, no network).
        ValueError: no text found.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
            return _read_files(files, where=str(path))
        if path.is_file():
            return _read_files([path], where=str(path))
        if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
            raise FileNotFoundError(f"no such text file or folder: {str(source)!r}")
        return _load_hf_dataset(str(source), split or "train", text_column)
    files = [Path(p).expanduser() for p in source]
    if not files:
        raise ValueError("no text found in an empty list of files")
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"no such text file: {str(p)!r}")
    return _read_files(files, where=f"{len(files)} files")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith((".txt", ".text"))
        or os.sep in name and name.count("/") != 1  # "owner/dataset" is a hub name
    )


def _read_files(files: Sequence[Path], where: str) -> list[str]:
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
        if text.strip():
            docs.append(text)
    if not docs:
        raise ValueError(f"no text found in {where} (expected non-empty .txt files)")
    return docs


def _load_hf_dataset(name: str, split: str, text_column: str) -> list[str]:
    local = "pass local .txt files or a folder of them instead"
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"{name!r} is not a local file, and loading it as a Hugging Face dataset needs "
            f"the `datasets` package; {local}."
        ) from None
    offline = hub_offline()
    if not offline and not hub_reachable():
        raise RuntimeError(
            f"{name!r} is not a local file and the Hugging Face hub is unreachable; {local}."
        )
    try:
        dataset: Any = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; one sentence for all
        why = "HF_HUB_OFFLINE is set and it is not cached" if offline else type(err).__name__
        raise RuntimeError(
            f"Could not load the Hugging Face dataset {name!r} (split {split!r}): {why}; "
            f"{local}."
        ) from err
    if text_column not in dataset.column_names:
        raise ValueError(
            f"dataset {name!r} has no column {text_column!r}; its columns are "
            f"{dataset.column_names}"
        )
    docs = [t for t in dataset[text_column] if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError(f"no text found in dataset {name!r} column {text_column!r}")
    return docs


# -- tokens -------------------------------------------------------------------------


def token_rows(
    tokenizer: Any,
    docs: Sequence[str],
    context: int,
    sep_token_id: int = 0,
    max_rows: int | None = None,
    batch_size: int = 64,
) -> Int[torch.Tensor, "rows context"]:
    """Tokenise documents and cut the token stream into rows of ``context`` tokens.

    The stream is ``[sep, doc1..., sep, doc2..., ...]``. Row ``i`` is ``sep``
    followed by the stream's tokens ``1 + i*(context-1)`` to ``(i+1)*(context-1)``,
    so every row starts with the separator (token 0, ``<|endoftext|>``, for
    SmolLM2) and consecutive rows continue each other. The ragged tail is dropped.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones batch well).
        docs: the documents, in order.
        context: tokens per row, at least 2.
        sep_token_id: separator and row-start token.
        max_rows: stop after this many rows (tokenises only what it needs).
        batch_size: documents per tokenizer call.

    Returns:
        A ``torch.long`` tensor of shape ``[rows, context]``.
    """
    if isinstance(docs, str):
        raise ValueError("docs must be a sequence of documents, got a single string")
    if context < 2:
        raise ValueError(f"context={context} but a row needs at least 2 tokens")
    if not docs:
        raise ValueError("docs is empty; expected at least one document")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows={max_rows} but expected at least 1 (or None)")
    body = context - 1
    needed = None if max_rows is None else max_rows * body + 1
    stream: list[int] = []
    for start in range(0, len(docs), batch_size):
        batch = list(docs[start : start + batch_size])
        # verbose=False: documents longer than the model's window are expected here.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.append(sep_token_id)
            stream.extend(ids)
        if needed is not None and len(stream) >= needed:
            break
    n_rows = (len(stream) - 1) // body
    if max_rows is not None:
        n_rows = min(n_rows, max_rows)
    if n_rows == 0:
        raise ValueError(
            f"the documents give {len(stream)} tokens, too few for one row of context={context}"
        )
    flat = torch.tensor(stream[1 : 1 + n_rows * body], dtype=torch.long).view(n_rows, body)
    sep = torch.full((n_rows, 1), sep_token_id, dtype=torch.long)
    return torch.cat([sep, flat], dim=1)
