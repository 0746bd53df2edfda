"""A small reader for R's serialisation format and R lazy-load databases.

R packages ship their data sets as a lazy-load database: ``Rdata.rdx`` (a
compressed R-serialised index) and ``Rdata.rdb`` (the objects, one compressed
blob each). This module reads enough of R's XDR serialisation (format versions
2 and 3) to pull character vectors, lists, attributes and data.frames out of
such a database, with no R and no pickle involved.

Public entry points:

* :func:`unserialize` parses one serialised object (already decompressed).
* :func:`read_rds` reads a whole ``.rds`` file (gzip/bzip2/xz/plain).
* :class:`LazyLoadDB` opens an ``.rdx``/``.rdb`` pair and reads objects by name.
* :func:`text_columns` gathers the character vectors of an object (a character
  vector itself, or the character columns of a list/data.frame).

Objects come back as :class:`RObject` (or ``None`` for R's ``NULL``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RObject",
    "LazyLoadDB",
    "unserialize",
    "read_rds",
    "decompress_r_file",
    "text_columns",
]

# SEXP type codes (R's Rinternals.h) that appear as data.
_SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 1, 2, 3, 4, 5, 6
_SPECIALSXP, _BUILTINSXP, _CHARSXP, _LGLSXP = 7, 8, 9, 10
_INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _DOTSXP = 13, 14, 15, 16, 17
_VECSXP, _EXPRSXP, _BCODESXP, _EXTPTRSXP, _WEAKREFSXP, _RAWSXP, _S4SXP = (
    19, 20, 21, 22, 23, 24, 25,
)
# Pseudo-types used only inside serialised streams (serialize.c); the byte-code
# ones (243-246) are not supported and fall through to "unknown type".
_ALTREP_SXP = 238
_ATTRLISTSXP, _ATTRLANGSXP = 239, 240
_BASEENV_SXP, _EMPTYENV_SXP = 241, 242
_PERSISTSXP, _PACKAGESXP, _NAMESPACESXP, _BASENAMESPACE_SXP = 247, 248, 249, 250
_MISSINGARG_SXP, _UNBOUNDVALUE_SXP, _GLOBALENV_SXP, _NILVALUE_SXP, _REFSXP = (
    251, 252, 253, 254, 255,
)

_VECTOR_TYPE_NAMES = {
    _LGLSXP: "logical",
    _INTSXP: "integer",
    _REALSXP: "double",
    _CPLXSXP: "complex",
    _STRSXP: "character",
    _VECSXP: "list",
    _EXPRSXP: "expression",
    _RAWSXP: "raw",
}
_PAIRLIST_TYPE_NAMES = {
    _LISTSXP: "pairlist",
    _LANGSXP: "language",
    _CLOSXP: "closure",
    _PROMSXP: "promise",
    _DOTSXP: "dots",
}
_NA_INTEGER = -(2**31)

# CHARSXP encoding bits (the "levels" field of the flags).
_LATIN1_MASK, _UTF8_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6


@dataclass
class RObject:
    """One R value.

    Attributes:
        type: R's ``typeof`` name: "character", "list", "integer", "double",
            "logical", "complex", "raw", "pairlist", "symbol", "environment", ...
        value: the payload. For vectors a Python list (``None`` marks NA in
            character, integer and logical vectors; NA doubles stay NaN); for a
            pairlist a list of ``(tag, value)``; for a symbol its name.
        attributes: R attributes by name (``names``, ``class``, ``row.names``...).
    """

    type: str
    value: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a Python list, or ``None`` if absent."""
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None

    @property
    def classes(self) -> list[str]:
        """The ``class`` attribute as a list of strings (empty if absent)."""
        cls = self.attributes.get("class")
        return [c for c in cls.value if c is not None] if isinstance(cls, RObject) else []

    def as_dict(self) -> dict[str, Any]:
        """A named list (or pairlist) as ``{name: element}``.

        Raises:
            ValueError: if the object is not a list or lacks names.
        """
        if self.type == "pairlist":
            return {tag: val for tag, val in self.value}
        names = self.names
        if self.type not in ("list", "expression") or names is None:
            raise ValueError(f"expected a named R list, got an R {self.type} without names")
        return dict(zip(names, self.value))


class _Reader:
    """Cursor over one XDR serialisation stream."""

    def __init__(self, data: bytes, source: str):
        self.data = data
        self.pos = 0
        self.source = source
        self.refs: list[Any] = []

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.source}: {problem} (at byte {self.pos} of {len(self.data)})")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated R data: wanted {n} more bytes")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.read_int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) + lower
        if n < 0:
            raise self.fail(f"negative vector length {n}")
        # Every element takes at least one byte: cheaply rejects garbage lengths.
        if n > len(self.data) - self.pos:
            raise self.fail(f"vector length {n} exceeds the remaining data")
        return n

    # -- the stream ---------------------------------------------------------

    def header(self) -> None:
        magic = self.take(2)
        if magic != b"X\n":
            kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(magic)
            if kind:
                raise self.fail(f"R serialisation in {kind} format is not supported, only XDR")
            raise self.fail(f"not R serialised data (starts with {magic!r}, expected b'X\\n')")
        version = self.read_int()
        self.read_int()  # R version that wrote it
        self.read_int()  # minimal R version to read it
        if version == 3:
            self.take(self.read_int())  # native encoding name, e.g. "UTF-8"
        elif version != 2:
            raise self.fail(f"unsupported R serialisation version {version}, expected 2 or 3")

    def item(self) -> Any:
        flags = self.read_int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sexptype == _NILVALUE_SXP:
            return None
        if sexptype in (_EMPTYENV_SXP, _BASEENV_SXP, _GLOBALENV_SXP, _BASENAMESPACE_SXP):
            return RObject("environment", {
                _EMPTYENV_SXP: "empty", _BASEENV_SXP: "base",
                _GLOBALENV_SXP: "global", _BASENAMESPACE_SXP: "base namespace",
            }[sexptype])
        if sexptype in (_UNBOUNDVALUE_SXP, _MISSINGARG_SXP):
            return RObject("symbol", "")
        if sexptype == _REFSXP:
            index = flags >> 8 or self.read_int()
            if not 1 <= index <= len(self.refs):
                raise self.fail(f"reference {index} to an object not yet read")
            return self.refs[index - 1]
        if sexptype in (_PERSISTSXP, _PACKAGESXP, _NAMESPACESXP):
            # A persistent name (string vector) standing for an object kept elsewhere.
            if self.read_int() != 0:
                raise self.fail("malformed persistent-name string vector")
            names = [self.charsxp() for _ in range(self.length())]
            kind = {_PERSISTSXP: "persistent", _PACKAGESXP: "package",
                    _NAMESPACESXP: "namespace"}[sexptype]
            obj = RObject(kind, names)
            self.refs.append(obj)
            return obj
        if sexptype == _SYMSXP:
            name = self.item()
            obj = RObject("symbol", name if isinstance(name, str) else None)
            self.refs.append(obj)
            return obj
        if sexptype == _ENVSXP:
            self.read_int()  # locked flag
            obj = RObject("environment")
            self.refs.append(obj)  # registered before its contents: they may refer to it
            enclos, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
            obj.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            self._set_attributes(obj, attrib)
            return obj
        if sexptype in _PAIRLIST_TYPE_NAMES or sexptype in (_ATTRLISTSXP, _ATTRLANGSXP):
            return self.pairlist(sexptype, has_attr, has_tag)
        if sexptype == _CHARSXP:
            # A bare CHARSXP outside a string vector: rewind and reuse charsxp().
            self.pos -= 4
            return self.charsxp()
        if sexptype == _ALTREP_SXP:
            return self.altrep()
        if sexptype in (_SPECIALSXP, _BUILTINSXP):
            return RObject("builtin", self.take(self.length()).decode("latin-1"))
        if sexptype == _EXTPTRSXP:
            obj = RObject("externalptr")
            self.refs.append(obj)
            obj.value = (self.item(), self.item())  # protected value, tag
            return self._maybe_attributes(obj, has_attr)
        if sexptype == _WEAKREFSXP:
            obj = RObject("weakref")
            self.refs.append(obj)
            return self._maybe_attributes(obj, has_attr)
        if sexptype == _S4SXP:
            return self._maybe_attributes(RObject("S4"), has_attr)
        if sexptype in _VECTOR_TYPE_NAMES:
            obj = RObject(_VECTOR_TYPE_NAMES[sexptype], self.vector(sexptype))
            return self._maybe_attributes(obj, has_attr)
        if sexptype == _BCODESXP:
            raise self.fail("R byte code (compiled functions) is not supported")
        raise self.fail(f"unknown R object type {sexptype} (flags 0x{flags:08x}, levels {levels})")

    def _maybe_attributes(self, obj: RObject, has_attr: bool) -> RObject:
        if has_attr:
            self._set_attributes(obj, self.item())
        return obj

    def _set_attributes(self, obj: RObject, attrib: Any) -> None:
        if attrib is None:
            return
        if not isinstance(attrib, RObject) or attrib.type != "pairlist":
            raise self.fail("attributes are not a pairlist")
        for tag, value in attrib.value:
            obj.attributes[tag if tag is not None else ""] = value

    def pairlist(self, sexptype: int, has_attr: bool, has_tag: bool) -> RObject:
        """Read a chain of CONS cells iteratively (long pairlists would overflow recursion)."""
        kind = _PAIRLIST_TYPE_NAMES.get(sexptype, "pairlist")
        if sexptype == _ATTRLANGSXP:
            kind = "language"
        head = RObject(kind, [])
        if sexptype in (_ATTRLISTSXP, _ATTRLANGSXP):
            has_attr = True  # older streams mark attributed cells by type
        while True:
            attrib = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            if not head.value:  # the first cell's attributes belong to the whole pairlist
                self._set_attributes(head, attrib)
            head.value.append((tag.value if isinstance(tag, RObject) else tag, car))
            # The CDR: continue in the loop while it is another cell of the same kind.
            flags = self.read_int()
            next_type = flags & 0xFF
            if next_type == _NILVALUE_SXP:
                return head
            if next_type != sexptype and next_type not in (_LISTSXP, _ATTRLISTSXP):
                self.pos -= 4
                rest = self.item()
                head.value.append((".tail", rest))
                return head
            has_attr = bool(flags & (1 << 9)) or next_type == _ATTRLISTSXP
            has_tag = bool(flags & (1 << 10))

    def charsxp(self) -> str | None:
        flags = self.read_int()
        if flags & 0xFF != _CHARSXP:
            raise self.fail(f"expected a string (CHARSXP, type 9), got type {flags & 0xFF}")
        n = self.read_int()
        if n == -1:
            return None  # NA_character_
        if n < 0:
            raise self.fail(f"negative string length {n}")
        raw = self.take(n)
        levels = flags >> 12
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & _BYTES_MASK:
            return raw.decode("latin-1")  # arbitrary bytes: keep them one char per byte
        # UTF-8, ASCII or native (the index says UTF-8 in practice); never crash on text.
        return raw.decode("utf-8", errors="replace")

    def vector(self, sexptype: int) -> list[Any]:
        n = self.length()
        if sexptype == _STRSXP:
            return [self.charsxp() for _ in range(n)]
        if sexptype in (_VECSXP, _EXPRSXP):
            return [self.item() for _ in range(n)]
        if sexptype in (_LGLSXP, _INTSXP):
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            if sexptype == _LGLSXP:
                return [None if v == _NA_INTEGER else bool(v) for v in ints]
            return [None if v == _NA_INTEGER else v for v in ints]
        if sexptype == _REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        if sexptype == _CPLXSXP:
            parts = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)]
        if sexptype == _RAWSXP:
            return list(self.take(n))
        raise self.fail(f"type {sexptype} is not a vector")

    def altrep(self) -> RObject:
        """ALTREP objects: expand the classes R writes for plain data."""
        info, state, attrib = self.item(), self.item(), self.item()
        class_name = None
        if isinstance(info, RObject) and info.type == "pairlist" and info.value:
            sym = info.value[0][1]
            class_name = sym.value if isinstance(sym, RObject) else None
        if class_name == "compact_intseq" and isinstance(state, RObject):
            n, start, step = (int(v) for v in state.value[:3])
            obj = RObject("integer", list(range(start, start + n * step, step))[:n])
        elif class_name == "compact_realseq" and isinstance(state, RObject):
            n, start, step = state.value[:3]
            obj = RObject("double", [start + i * step for i in range(int(n))])
        elif class_name and class_name.startswith("wrap_") and isinstance(state, RObject):
            inner = state.value[0]  # list(the wrapped vector, metadata)
            obj = RObject(inner.type, inner.value, dict(inner.attributes))
        elif class_name == "deferred_string" and isinstance(state, RObject):
            # state is a pairlist whose first element is the numeric vector to format.
            numbers = state.value[0][1]
            obj = RObject("character", [None if v is None else _format_number(v)
                                        for v in numbers.value])
        else:
            raise self.fail(f"unsupported ALTREP class {class_name!r}")
        self._set_attributes(obj, attrib)
        return obj


def _format_number(v: float | int) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def unserialize(data: bytes, source: str = "<bytes>") -> RObject | None:
    """Parse one R-serialised object in XDR format (versions 2 and 3).

    Args:
        data: the decompressed stream, starting with ``b"X\\n"``.
        source: a name for error messages (usually the file path).

    Raises:
        ValueError: for malformed or truncated input, or unsupported content.
    """
    reader = _Reader(data, source)
    reader.header()
    try:
        return reader.item()
    except RecursionError:
        raise reader.fail("R object nested too deeply") from None


def decompress_r_file(raw: bytes, source: str = "<bytes>") -> bytes:
    """Undo the whole-file compression R's ``saveRDS`` uses (gzip, bzip2, xz or none)."""
    try:
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
        if raw[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(raw)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as err:
        raise ValueError(f"{source}: corrupt compressed R file ({err})") from None
    if raw[:2] in (b"X\n", b"A\n", b"B\n"):
        return raw
    raise ValueError(f"{source}: not an R data file (unknown leading bytes {raw[:6]!r})")


def read_rds(path: str | Path) -> RObject | None:
    """Read an ``.rds`` file (or a lazy-load ``.rdx`` index)."""
    path = Path(path)
    return unserialize(decompress_r_file(path.read_bytes(), str(path)), str(path))


class LazyLoadDB:
    """An R lazy-load database: ``<prefix>.rdx`` (index) + ``<prefix>.rdb`` (objects).

    Example::

        db = LazyLoadDB("…/janeaustenr/data/Rdata")
        db.names()          # ['emma', 'mansfieldpark', ...]
        db.read("emma")     # RObject(type='character', value=[...lines...])
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
        index = read_rds(self.rdx)
        try:
            entries = index.as_dict()["variables"]
            variables = entries.as_dict() if entries is not None else {}
        except (AttributeError, KeyError, ValueError):
            raise ValueError(
                f"{self.rdx}: not a lazy-load index (expected a list with a 'variables' entry)"
            ) from None
        result: dict[str, tuple[int, int]] = {}
        for name, pos in variables.items():
            if not (isinstance(pos, RObject) and pos.type in ("integer", "double")
                    and len(pos.value) == 2 and None not in pos.value):
                raise ValueError(f"{self.rdx}: entry {name!r} is not an (offset, length) pair")
            result[name] = (int(pos.value[0]), int(pos.value[1]))
        return result

    def names(self) -> list[str]:
        """Object names in the database, in index order."""
        return list(self.index)

    def read(self, name: str) -> RObject | None:
        """Read and parse one object by name."""
        if name not in self.index:
            raise KeyError(f"{self.rdb}: no object {name!r}; it holds {self.names()}")
        offset, length = self.index[name]
        with open(self.rdb, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        if len(blob) != length:
            raise ValueError(
                f"{self.rdb}: object {name!r} at offset {offset} needs {length} bytes "
                f"but the file has only {len(blob)} there (truncated?)"
            )
        return unserialize(_decompress_blob(blob, f"{self.rdb}[{name}]"), f"{self.rdb}[{name}]")

    def read_all(self) -> dict[str, RObject | None]:
        """Every object in the database, by name."""
        return {name: self.read(name) for name in self.index}


def _decompress_blob(blob: bytes, source: str) -> bytes:
    """One ``.rdb`` entry: 4-byte big-endian raw length, then (type byte +) data.

    R writes plain zlib after the length (``compress=TRUE``); with ``compress=2``
    or ``3`` a type byte follows the length: ``Z`` zlib, ``2`` bzip2, ``X`` xz,
    ``0`` stored uncompressed.
    """
    if len(blob) < 5:
        raise ValueError(f"{source}: entry of {len(blob)} bytes is too short")
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    type_bytes = {b"Z": "zlib", b"2": "bzip2", b"X": "xz", b"0": "none"}
    if body[:1] in type_bytes:
        method = type_bytes[body[:1]]
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
            f"{source}: decompressed to {len(data)} bytes but the header says {expected}"
        )
    return data


def text_columns(obj: RObject | None) -> dict[str, list[str | None]]:
    """Character vectors inside an object, by name.

    A character vector gives ``{"": values}``; a list or data.frame gives each
    of its character columns under its name (factor columns are expanded to
    their labels).
    """
    if obj is None:
        return {}
    if obj.type == "character":
        return {"": obj.value}
    if obj.type != "list":
        return {}
    names = obj.names or [f"V{i + 1}" for i in range(len(obj.value))]
    columns: dict[str, list[str | None]] = {}
    for name, col in zip(names, obj.value):
        if not isinstance(col, RObject):
            continue
        if col.type == "character":
            columns[name or ""] = col.value
        elif col.type == "integer" and "factor" in col.classes:
            levels = col.attributes.get("levels")
            labels = levels.value if isinstance(levels, RObject) else []
            columns[name or ""] = [None if v is None else labels[v - 1] for v in col.value]
    return columns
