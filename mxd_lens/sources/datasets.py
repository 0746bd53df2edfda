"""Datasets bigger than memory: any common format, tokenised once into a memory-mapped file.

:func:`open_dataset` recognises the source and checks it (file exists, column exists,
hub reachable) before any tokenising; :func:`dataset_token_rows` turns it into token rows
``[rows, context]`` that live in a ``.npy`` file on disk and are served as a torch tensor
over ``np.memmap``: indexing ``tokens[rows]`` (what ``ActivationSource`` does) reads only
those rows, so a corpus of any size costs the page cache, not the process's memory.

Formats (``source``):

* a Hugging Face dataset name: streamed (``datasets.load_dataset(..., streaming=True)``);
  with ``HF_HUB_OFFLINE`` set or the hub unreachable it fails at once;
* a folder written by ``datasets`` (``save_to_disk``; a ``DatasetDict`` too: ``split``);
* a ``.jsonl`` or ``.parquet`` file, or a folder of them (sorted by name), with a text
  column (``text_column``) or a token column of int lists (``token_column``);
* a ``.txt`` file or a folder of them: one document per file (as :func:`load_texts`);
* a token array, ``.npy`` or ``.safetensors`` (``token_column`` names the tensor when
  there are several): 2-D ``[rows, context]`` is used as the rows; 1-D is a token stream
  (separator-led, as :func:`token_rows` builds it; a separator is put in front if missing).

Rows are cut exactly as :func:`mxd_lens.sources.token_rows` cuts them: the stream is
``[sep, doc1..., sep, doc2..., ...]`` and every row is ``sep`` followed by the next
``context - 1`` tokens of the stream, so any format gives the same rows as the same text
given as ``.txt`` files. Only one document (or one batch of records) is in memory at once.

The token file is keyed on the dataset's identity (paths, sizes and modification times;
or the hub name and split), the tokenizer (its full vocabulary and rules, hashed), the
context, the separator, the column and the row cap, and written atomically: two processes
tokenising the same data at once each write a private temporary file and rename it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from jaxtyping import Int

from mxd_lens.atomic import write_file, write_json
from mxd_lens.sources.cache import hub_offline, hub_reachable, mxd_lens_cache_dir

__all__ = ["TokenDataset", "open_dataset", "dataset_token_rows", "token_file_folder"]

_TOKENS_FORMAT = 1  # bump when the token files change meaning
_RECORD_BATCH = 1024  # records read per parquet / arrow batch
_DOC_BATCH = 64  # documents per tokenizer call (as token_rows)
_FLUSH_TOKENS = 1 << 20  # body tokens gathered before complete rows are written out
_NPY_HEADER = 128  # bytes reserved for the .npy header (its shape is known only at the end)

_HF_MARKERS = ("dataset_dict.json", "state.json")
_RECORD_SUFFIXES = (".jsonl", ".parquet")
_ARRAY_SUFFIXES = (".npy", ".safetensors")
_LOCAL_HINT = (
    "pass a local dataset instead: a folder written by datasets' save_to_disk, .jsonl/.parquet/.txt "
    "files or a folder of them, or a .npy/.safetensors token array"
)


def token_file_folder() -> Path:
    """Where tokenised datasets are cached: ``<mxd_lens cache>/tokens``."""
    return mxd_lens_cache_dir() / "tokens"


@dataclass(frozen=True)
class TokenDataset:
    """A recognised, checked dataset: what :func:`open_dataset` returns.

    ``kind`` is 'hub', 'hf_folder', 'jsonl', 'parquet', 'txt' or 'array'; ``files`` the
    local files read, in order; ``column`` the text or token column (or tensor name)."""

    source: str
    kind: str
    files: tuple[Path, ...] = ()
    column: str | None = None
    tokens: bool = False
    """The column holds token ids (pre-tokenized), not text."""
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def identity(self) -> dict[str, Any]:
        """What the cache key records about the data: paths, sizes and modification times
        of local files (cheap and changes whenever a file is rewritten); the hub name and
        split of a streamed dataset."""
        files = []
        for path in self.files:
            st = path.stat()
            files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        return {"source": self.source if self.kind == "hub" else None, "kind": self.kind, "files": files,
                "column": self.column, "tokens": self.tokens, "split": self.split}

    # --- reading -------------------------------------------------------------------
    def values(self) -> Iterator[Any]:
        """The column's values, record by record (strings, or int sequences for tokens)."""
        if self.kind == "txt":
            for path in self.files:
                text = path.read_text(encoding="utf-8", errors="replace")
                yield text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
        elif self.kind == "jsonl":
            for path in self.files:
                yield from _jsonl_values(path, self.column)
        elif self.kind == "parquet":
            import pyarrow.parquet as pq

            for path in self.files:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=_RECORD_BATCH, columns=[self.column]):
                    yield from batch.column(0).to_pylist()
        elif self.kind == "hf_folder":
            ds = _load_hf_folder(Path(self.source), self.split).select_columns([self.column])
            for batch in ds.iter(batch_size=_RECORD_BATCH):
                yield from batch[self.column]
        elif self.kind == "hub":
            for record in _stream_hub(self.source, self.split):
                if self.column not in record:
                    raise ValueError(f"a record of {self.source!r} has no column {self.column!r}: {sorted(record)}")
                yield record[self.column]
        else:
            raise ValueError(f"{self.source}: a token array has no records")


def _jsonl_values(path: Path, column: str | None) -> Iterator[Any]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
            if not isinstance(record, dict) or column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{number}: no column {column!r}; the record has {keys}")
            yield record[column]


def _first_jsonl_keys(path: Path) -> list[str] | None:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
                return sorted(record)
    return None


def _load_hf_folder(path: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))  # memory-mapped Arrow files: nothing is read yet
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} holds splits {sorted(loaded)}, not {split!r}")
        return loaded[split]
    return loaded


def _stream_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # the hub client raises many types; one sentence for all
        raise RuntimeError(
            f"could not stream the Hugging Face dataset {name!r} (split {split!r}): "
            f"{type(err).__name__}: {err}; {_LOCAL_HINT}"
        ) from err


def _looks_like_path(name: str) -> bool:
    suffixes = (".txt", ".text", *_RECORD_SUFFIXES, *_ARRAY_SUFFIXES, ".json")
    return name.startswith(("/", ".", "~")) or name.endswith(suffixes) or name.count("/") > 1


def _suffix_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text"):
        return "txt"
    if suffix in _RECORD_SUFFIXES:
        return suffix[1:]
    if suffix in _ARRAY_SUFFIXES:
        return "array"
    return None


def open_dataset(
    source: str | os.PathLike[str],
    *,
    text_column: str = "text",
    token_column: str | None = None,
    split: str = "train",
) -> TokenDataset:
    """Recognise and check a dataset (see the module docstring for the formats).

    Args:
        source: a path (file or folder) or a Hugging Face dataset name.
        text_column: the column holding text (records formats).
        token_column: the column holding pre-tokenized int lists instead (or, for a
            ``.safetensors`` file, the tensor's name); None: text.
        split: the split of a hub dataset or a saved ``DatasetDict``.

    Raises:
        FileNotFoundError: a path that looks local does not exist.
        ValueError: unknown format, mixed folder, missing column (the error names the
            available ones).
        RuntimeError: a hub dataset with ``HF_HUB_OFFLINE`` set, the hub unreachable,
            or no ``datasets`` package.
    """
    text = str(source)
    path = Path(text).expanduser()
    column = token_column if token_column is not None else text_column
    tokens = token_column is not None
    if not column:
        raise ValueError("the text/token column name is empty")
    if path.is_dir():
        if any((path / marker).is_file() for marker in _HF_MARKERS):
            return _open_hf_folder(path, column, tokens, split)
        kinds: dict[str, list[Path]] = {}
        for child in sorted(path.iterdir()):
            kind = _suffix_kind(child) if child.is_file() else None
            if kind is not None:
                kinds.setdefault(kind, []).append(child)
        if not kinds:
            raise ValueError(
                f"no text found in {path}: expected a folder saved by datasets (dataset_dict.json or "
                f"state.json), or .jsonl, .parquet or .txt files"
            )
        if len(kinds) > 1:
            raise ValueError(f"{path} mixes {sorted(kinds)} files; expected files of one format")
        ((kind, files),) = kinds.items()
        if kind == "array":
            raise ValueError(f"{path} holds token arrays ({[f.name for f in files]}); pass one array file")
        return _open_files(text, kind, files, column, tokens)
    if path.is_file():
        kind = _suffix_kind(path)
        if kind is None:
            raise ValueError(
                f"{path}: unknown dataset format {path.suffix!r}; expected .jsonl, .parquet, .txt, .npy, "
                f".safetensors, or a folder"
            )
        return _open_files(text, kind, [path], column, tokens)
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(f"no such dataset file or folder: {text!r}")
    return _open_hub(text, column, tokens, split)


def _check_not_empty(ds: TokenDataset) -> TokenDataset:
    """Read up to the first usable record: a dataset of only empty texts fails here,
    before a model is loaded, not after."""
    if ds.kind == "array":
        return ds
    for value in ds.values():
        if (isinstance(value, str) and value.strip()) if not ds.tokens else (value is not None and len(value) > 0):
            return ds
    what = f"column {ds.column!r} of " if ds.column else ""
    expected = "token ids" if ds.tokens else "text"
    records = "non-empty .txt files" if ds.kind == "txt" else f"non-empty {ds.kind} records"
    raise ValueError(f"no {expected} found in {what}{ds.source} (expected {records})")


def _open_files(source: str, kind: str, files: list[Path], column: str, tokens: bool) -> TokenDataset:
    if kind == "txt":
        if tokens:
            raise ValueError(f"{source}: .txt files hold text; a token column ({column!r}) needs records or arrays")
        return _check_not_empty(TokenDataset(source, "txt", tuple(files)))
    if kind == "array":
        return _open_array(source, files[0], column if tokens else None)
    for path in files:
        if kind == "jsonl":
            keys = _first_jsonl_keys(path)
            if keys is None:
                continue  # an empty file adds nothing
        else:
            import pyarrow.parquet as pq

            keys = list(pq.ParquetFile(path).schema_arrow.names)
        if column not in keys:
            what = "token" if tokens else "text"
            flag = "--token-column" if tokens else "--text-column"
            raise ValueError(f"{path} has no {what} column {column!r} ({flag}); its columns are {keys}")
    return _check_not_empty(TokenDataset(source, kind, tuple(files), column, tokens))


def _open_hf_folder(path: Path, column: str, tokens: bool, split: str) -> TokenDataset:
    try:
        ds = _load_hf_folder(path, split)
    except ImportError:
        raise RuntimeError(f"{path} was saved by `datasets`; reading it needs the datasets package") from None
    if column not in ds.column_names:
        flag = "--token-column" if tokens else "--text-column"
        raise ValueError(f"{path} has no column {column!r} ({flag}); its columns are {ds.column_names}")
    files = tuple(sorted(p for p in path.rglob("*") if p.is_file()))
    return _check_not_empty(TokenDataset(str(path), "hf_folder", files, column, tokens, split))


def _open_hub(name: str, column: str, tokens: bool, split: str) -> TokenDataset:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"{name!r} is not a local file, and streaming it from the Hugging Face hub needs the "
            f"`datasets` package; {_LOCAL_HINT}"
        ) from None
    if hub_offline():
        raise RuntimeError(
            f"{name!r} is not a local file and HF_HUB_OFFLINE is set, so it cannot be streamed from the "
            f"Hugging Face hub; {_LOCAL_HINT}"
        )
    if not hub_reachable():
        raise RuntimeError(f"{name!r} is not a local file and the Hugging Face hub is unreachable; {_LOCAL_HINT}")
    first = next(iter(_stream_hub(name, split)), None)
    if first is None:
        raise ValueError(f"the Hugging Face dataset {name!r} (split {split!r}) is empty")
    if column not in first:
        raise ValueError(f"the Hugging Face dataset {name!r} has no column {column!r}; its columns are {sorted(first)}")
    return TokenDataset(name, "hub", (), column, tokens, split)


def _open_array(source: str, path: Path, key: str | None) -> TokenDataset:
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r")
        shape, dtype = arr.shape, arr.dtype
        key = None
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            if key is None:
                if len(keys) != 1:
                    raise ValueError(f"{path} holds tensors {keys}; name the token tensor (--token-column)")
                key = keys[0]
            if key not in keys:
                raise ValueError(f"{path} has no tensor {key!r}; it holds {keys}")
            part = f.get_slice(key)
            shape, dtype = tuple(part.get_shape()), np.dtype(_SAFETENSORS_DTYPES.get(part.get_dtype(), "float32"))
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {dtype}")
    if len(shape) not in (1, 2) or 0 in shape:
        raise ValueError(f"{path}: expected a token array [rows, context] or a flat token stream, got shape {shape}")
    return TokenDataset(source, "array", (path,), key, True, extra={"shape": tuple(shape), "dtype": str(dtype)})


_SAFETENSORS_DTYPES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "U16": "uint16", "U32": "uint32", "U64": "uint64"}


# --- rows -------------------------------------------------------------------------------


class _RowWriter:
    """Cuts a token stream into rows ``[sep, next context-1 tokens]`` (token_rows's rule:
    the stream's own first token, a separator, is consumed as row 0's) and appends complete
    rows to an open file, keeping at most ``_FLUSH_TOKENS`` tokens pending."""

    def __init__(self, f, context: int, sep: int, max_rows: int | None, bar) -> None:
        self.f, self.context, self.sep, self.max_rows, self.bar = f, context, sep, max_rows, bar
        self.body = context - 1
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.rows = 0
        self.started = False
        self.seen = 0  # stream tokens seen, for the error message

    @property
    def full(self) -> bool:
        """Enough tokens written or pending for max_rows rows: reading can stop."""
        return self.max_rows is not None and self.rows + self.n_pending // self.body >= self.max_rows

    def push(self, stream_part: np.ndarray) -> None:
        self.seen += len(stream_part)
        if not self.started and len(stream_part):
            stream_part, self.started = stream_part[1:], True  # the leading separator
        self.pending.append(stream_part.astype(np.int64, copy=False))
        self.n_pending += len(stream_part)
        if self.n_pending >= _FLUSH_TOKENS:
            self.flush()

    def doc(self, ids) -> None:
        self.push(np.concatenate([np.array([self.sep], dtype=np.int64), np.asarray(ids, dtype=np.int64)]))

    def flush(self) -> None:
        n = self.n_pending // self.body
        if self.max_rows is not None:
            n = min(n, self.max_rows - self.rows)
        if n <= 0:
            return
        flat = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        rows = np.empty((n, self.context), dtype=np.int64)
        rows[:, 0] = self.sep
        rows[:, 1:] = flat[: n * self.body].reshape(n, self.body)
        self.f.write(rows.tobytes())
        rest = flat[n * self.body :]
        self.pending, self.n_pending = [rest], len(rest)
        self.rows += n
        self.bar.update(n)


def _npy_header(rows: int, context: int) -> bytes:
    """A version-1.0 .npy header for int64 [rows, context], padded to _NPY_HEADER bytes
    (the format allows trailing spaces), so the data can be written before the shape is known."""
    text = "{'descr': '<i8', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, context)
    text = text.ljust(_NPY_HEADER - 10 - 1) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")
    assert len(header) == _NPY_HEADER
    return header


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's full definition, hashed: a fast tokenizer's JSON (vocabulary, merges,
    normaliser, pre-tokeniser), else its vocabulary."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return {"class": type(tokenizer).__name__, "name": str(getattr(tokenizer, "name_or_path", "")),
            "size": len(tokenizer), "hash": h.hexdigest()}


def _as_tensor(path: Path) -> Int[torch.Tensor, "rows context"]:
    # mmap_mode="c": copy-on-write pages, so torch gets a writable array (no warning) and a
    # stray in-place write changes this process's view, never the file.
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def dataset_token_rows(
    dataset: TokenDataset | str | os.PathLike[str],
    tokenizer: Any,
    context: int,
    *,
    sep_token_id: int = 0,
    max_rows: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    **open_kwargs: Any,
) -> Int[torch.Tensor, "rows context"]:
    """Token rows ``[rows, context]`` of a dataset, over a memory-mapped file on disk.

    Args:
        dataset: an :func:`open_dataset` result, or a source to open (``open_kwargs``:
            ``text_column``, ``token_column``, ``split``).
        tokenizer: a Hugging Face tokenizer (unused for pre-tokenized data).
        context: tokens per row, at least 2.
        sep_token_id: separator and row-start token (0, ``<|endoftext|>``, for SmolLM2).
        max_rows: stop after this many rows (reads only what it needs).
        cache_dir: folder of token files; None: :func:`token_file_folder`.
        progress: show a tqdm bar of rows written.

    Returns:
        A ``torch.long`` tensor sharing memory with the ``.npy`` file (``np.memmap``):
        the same rows as ``token_rows(tokenizer, docs, context, sep_token_id, max_rows)``
        on the same documents given as ``.txt`` files.
    """
    if context < 2:
        raise ValueError(f"context={context} but a row needs at least 2 tokens")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows={max_rows} but expected at least 1 (or None)")
    ds = dataset if isinstance(dataset, TokenDataset) else open_dataset(dataset, **open_kwargs)
    if ds.kind == "array" and len(ds.extra["shape"]) == 2:
        n, width = ds.extra["shape"]
        if width != context:
            raise ValueError(
                f"{ds.source} holds rows of {width} tokens but context={context}; pass --context {width}, "
                f"or a flat (1-D) token stream to cut into rows of any length"
            )
        if ds.files[0].suffix.lower() == ".npy" and ds.extra["dtype"] == "int64":
            rows = _as_tensor(ds.files[0])  # already rows of the right type: no copy at all
            return rows if max_rows is None else rows[:max_rows]
    key_parts = {"format": _TOKENS_FORMAT, "data": ds.identity(), "context": context, "sep": sep_token_id,
                 "max_rows": max_rows, "tokenizer": None if ds.tokens else _tokenizer_identity(tokenizer)}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir) if cache_dir is not None else token_file_folder()
    path = folder / f"{key}.npy"
    if path.is_file():
        return _as_tensor(path)

    from tqdm.auto import tqdm

    n_rows = 0

    def write(tmp: Path) -> None:
        nonlocal n_rows
        with tmp.open("wb") as f, tqdm(total=max_rows, disable=not progress, desc=f"tokenise {Path(ds.source).name}",
                                        unit="rows", dynamic_ncols=True) as bar:
            f.write(b"\0" * _NPY_HEADER)
            writer = _RowWriter(f, context, sep_token_id, max_rows, bar)
            _feed(ds, writer, tokenizer)
            writer.flush()
            if writer.rows == 0:
                raise ValueError(
                    f"{ds.source} gives {writer.seen} tokens, too few for one row of context={context}"
                )
            n_rows = writer.rows
            f.seek(0)
            f.write(_npy_header(writer.rows, context))

    write_file(path, write)
    write_json(path.with_suffix(".json"), {**key_parts, "rows": n_rows})  # for people: what the file holds
    return _as_tensor(path)


def _feed(ds: TokenDataset, writer: _RowWriter, tokenizer: Any) -> None:
    """Push the dataset's token stream into the writer until it is full."""
    if ds.kind == "array":
        _feed_array(ds, writer)
        return
    if ds.tokens:
        for ids in ds.values():
            if ids is None or len(ids) == 0:
                continue
            arr = np.asarray(ids)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{ds.source}: column {ds.column!r} must hold lists of token ids, got {ids!r:.80}")
            writer.doc(arr)
            if writer.full:
                return
        return
    batch: list[str] = []
    for value in ds.values():
        if isinstance(value, str) and value.strip():  # empty and missing texts are skipped, as load_texts does
            batch.append(value)
        if len(batch) == _DOC_BATCH:
            _tokenise(tokenizer, batch, writer)
            batch = []
            if writer.full:
                return
    if batch:
        _tokenise(tokenizer, batch, writer)


def _tokenise(tokenizer: Any, docs: list[str], writer: _RowWriter) -> None:
    # The call token_rows makes (verbose=False: long documents are expected here).
    for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        writer.doc(ids)


def _feed_array(ds: TokenDataset, writer: _RowWriter) -> None:
    path, shape = ds.files[0], ds.extra["shape"]
    step = max(1, _FLUSH_TOKENS // (shape[1] if len(shape) == 2 else 1))
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r")

        def read(a: int, b: int) -> np.ndarray:
            return np.asarray(arr[a:b])
    else:
        from safetensors import safe_open

        handle = safe_open(str(path), framework="numpy")
        part = handle.get_slice(ds.column)

        def read(a: int, b: int) -> np.ndarray:
            return part[a:b]

    if len(shape) == 2:  # rows already: copy them over in blocks (another dtype, or safetensors)
        for a in range(0, shape[0], step):
            block = read(a, min(a + step, shape[0])).astype(np.int64)
            if writer.max_rows is not None:
                block = block[: writer.max_rows - writer.rows]
            writer.f.write(block.tobytes())
            writer.rows += len(block)
            writer.bar.update(len(block))
            if writer.full:
                return
        return
    for a in range(0, shape[0], step):
        block = read(a, min(a + step, shape[0]))
        if a == 0 and block[0] != writer.sep:
            writer.push(np.array([writer.sep], dtype=np.int64))  # the stream must start with a separator
        writer.push(block)
        if writer.full:
            return
