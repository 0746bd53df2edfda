"""Read the objects of an R lazy-load database with the ``rdata`` package.

R packages ship their data sets as a lazy-load database: ``Rdata.rdx``, a
compressed serialised R list whose ``variables`` entry maps each object name to
an ``(offset, length)`` pair, and ``Rdata.rdb``, where each object is a blob of
a 4-byte big-endian length followed by the compressed serialised object.
``rdata`` parses serialised R objects; this module only finds and decompresses
the blobs (``rdata`` reads neither the index nor the blob layout itself).
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LazyLoadDB", "unserialize", "text_columns"]


def unserialize(data: bytes, source: str) -> Any:
    """One decompressed R-serialised object (``b"X\\n"`` ...) as Python objects.

    ``rdata`` turns character vectors into numpy string arrays (NA as None),
    named lists into dicts, data.frames into pandas DataFrames.

    Raises:
        ValueError: naming ``source``, for anything ``rdata`` cannot parse.
    """
    import rdata

    try:
        # extension=".rds": a bare serialisation, which rdata otherwise
        # parses the same but with an "assumed RDS" warning.
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))
    except Exception as err:  # rdata raises many types (NotImplementedError, AssertionError...)
        raise ValueError(
            f"{source}: not R serialised data that rdata can read "
            f"({type(err).__name__}: {err}; starts with {bytes(data[:6])!r})"
        ) from err


class LazyLoadDB:
    """An R lazy-load database: ``<prefix>.rdx`` (index) + ``<prefix>.rdb`` (objects).

    Example::

        db = LazyLoadDB(".../janeaustenr/data/Rdata")
        db.names()          # ['emma', 'mansfieldpark', ...]
        db.read("emma")     # numpy array of the book's lines
    """

    def __init__(self, prefix: str | Path):
        prefix = Path(prefix)
        if prefix.suffix in (".rdx", ".rdb"):
            prefix = prefix.with_suffix("")
        self.rdx = prefix.with_suffix(".rdx")
        self.rdb = prefix.with_suffix(".rdb")
        for path in (self.rdx, self.rdb):
            if not path.is_file():
                raise ValueError(f"{path}: lazy-load database file not found")
        self.index = self._read_index()

    def _read_index(self) -> dict[str, tuple[int, int]]:
        # The .rdx is a whole-file-compressed (gzip) serialisation, which rdata
        # detects and decompresses itself.
        index = unserialize(self.rdx.read_bytes(), str(self.rdx))
        variables = index.get("variables") if isinstance(index, dict) else None
        if not isinstance(variables, dict):
            raise ValueError(
                f"{self.rdx}: not a lazy-load index (expected a named list with a "
                f"'variables' entry, got {type(index).__name__})"
            )
        result: dict[str, tuple[int, int]] = {}
        for name, position in variables.items():
            values = np.asarray(position).ravel()
            if values.size != 2 or not np.issubdtype(values.dtype, np.number):
                raise ValueError(
                    f"{self.rdx}: entry {str(name)!r} is {position!r}, expected an "
                    "(offset, length) pair"
                )
            result[str(name)] = (int(values[0]), int(values[1]))
        return result

    def names(self) -> list[str]:
        """Object names in the database, in index order."""
        return list(self.index)

    def read(self, name: str) -> Any:
        """One object by name, parsed by ``rdata``.

        Raises:
            KeyError: no object of that name (the message lists those there are).
            ValueError: a truncated or corrupt blob, naming the file and object.
        """
        if name not in self.index:
            raise KeyError(f"{self.rdb}: no object {name!r}; it holds {self.names()}")
        offset, length = self.index[name]
        with open(self.rdb, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        source = f"{self.rdb}[{name}]"
        if len(blob) != length:
            raise ValueError(
                f"{self.rdb}: object {name!r} at offset {offset} needs {length} bytes "
                f"but the file has only {len(blob)} there (truncated?)"
            )
        return unserialize(_decompress_blob(blob, source), source)


# R's makeLazyLoadDB writes plain zlib after the length for compress=TRUE; for
# compress=2 or 3 a type byte comes first (and "0" when compressing did not pay).
_TYPE_BYTES = {b"Z": "zlib", b"2": "bzip2", b"X": "xz", b"0": "none"}


def _decompress_blob(blob: bytes, source: str) -> bytes:
    """One ``.rdb`` entry: 4-byte big-endian raw length, then (type byte +) data.

    The length check matters: rdata does not notice a serialisation cut short
    inside a string, so a damaged blob must be caught here.
    """
    if len(blob) < 5:
        raise ValueError(f"{source}: entry of {len(blob)} bytes is too short (expected 5 or more)")
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    if body[:1] in _TYPE_BYTES:
        method = _TYPE_BYTES[body[:1]]
        body = body[1:]
    elif body[:1] == b"x":  # a zlib header (0x78): R's default compress=TRUE
        method = "zlib"
    else:
        raise ValueError(
            f"{source}: unsupported compression type byte {body[:1]!r}; "
            "expected zlib data or one of b'Z', b'2', b'X', b'0'"
        )
    try:
        if method == "zlib":
            data = zlib.decompress(body)
        elif method == "bzip2":
            data = bz2.decompress(body)
        elif method == "xz":
            data = lzma.decompress(body)
        else:
            data = body
    except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError) as err:
        raise ValueError(f"{source}: corrupt {method} data ({err})") from None
    if len(data) != expected:
        raise ValueError(
            f"{source}: decompressed to {len(data)} bytes but its header says {expected} "
            "(truncated or corrupt)"
        )
    return data


def text_columns(obj: Any) -> dict[str, list[str | None]]:
    """The character vectors of an object read by ``rdata``, by name.

    A character vector gives ``{"": values}``; a named list or data.frame gives
    each character (or factor) column under its name. NA becomes None.
    """
    if _is_text(obj):
        return {"": _strings(obj)}
    if isinstance(obj, dict):
        items = obj.items()
    elif hasattr(obj, "columns") and hasattr(obj, "__getitem__"):  # a pandas DataFrame
        items = ((column, obj[column]) for column in obj.columns)
    else:
        return {}
    return {str(name): _strings(column) for name, column in items if _is_text(column)}


def _is_na(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return False
    import pandas as pd  # rdata depends on pandas

    return bool(pd.isna(value))  # NaN, pd.NA


def _is_text(values: Any) -> bool:
    if getattr(getattr(values, "dtype", None), "name", None) == "category":  # an R factor
        return True
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # a pandas Series
        values = values.to_numpy(dtype=object)
    if not isinstance(values, np.ndarray):
        return False
    if values.dtype.kind == "U":
        return True
    # Object arrays hold strings with None for NA; a numeric vector is not text.
    return values.dtype.kind == "O" and all(isinstance(v, str) or _is_na(v) for v in values.flat)


def _strings(values: Any) -> list[str | None]:
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
        values = values.to_numpy(dtype=object)
    return [None if _is_na(v) else str(v) for v in np.asarray(values, dtype=object).ravel()]
