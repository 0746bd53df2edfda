"""The lazy-load glue around `rdata`, on hand-built databases and on the real packages."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from mxd_lens.sources._rdata import LazyLoadDB, text_columns, unserialize
from mxd_lens.sources.corpus import default_corpus_folder, prepare_default_corpus

# -- a tiny R serialiser, written from the format description (serialize.c) ------
# Independent of rdata, so the bytes the glue is tested on are not rdata's own.

NILVALUE = struct.pack(">i", 254)
UTF8_FLAGS = 9 | (1 << 3) << 12  # CHARSXP marked UTF-8
ASCII_FLAGS = 9 | (1 << 6) << 12
HAS_ATTR, IS_OBJECT = 1 << 9, 1 << 8  # R sets IS_OBJECT on anything with a class


def xint(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3) -> bytes:
    out = b"X\n" + xint(version, 0x040201, 0x030500)
    if version == 3:
        out += xint(5) + b"UTF-8"
    return out


def charsxp(s: str | None) -> bytes:
    if s is None:
        return xint(9, -1)  # NA_character_
    raw = s.encode("utf-8")
    flags = ASCII_FLAGS if raw.isascii() else UTF8_FLAGS
    return xint(flags, len(raw)) + raw


def vector(sexptype: int, body: bytes, n: int, attrs: bytes = b"", is_object: bool = False) -> bytes:
    flags = sexptype | (HAS_ATTR if attrs else 0) | (IS_OBJECT if is_object else 0)
    return xint(flags, n) + body + attrs


def strsxp(values: list[str | None], attrs: bytes = b"", is_object: bool = False) -> bytes:
    return vector(16, b"".join(charsxp(v) for v in values), len(values), attrs, is_object)


def intsxp(values: list[int], attrs: bytes = b"", is_object: bool = False) -> bytes:
    return vector(13, xint(*values), len(values), attrs, is_object)


def vecsxp(items: list[bytes], attrs: bytes = b"", is_object: bool = False) -> bytes:
    return vector(19, b"".join(items), len(items), attrs, is_object)


def symbol(name: str, seen: dict[str, int]) -> bytes:
    """A SYMSXP, or a back-reference if this symbol was written before (as R does)."""
    if name in seen:
        return xint(255 | (seen[name] << 8))
    seen[name] = len(seen) + 1
    return xint(1) + charsxp(name)


def attributes(pairs: list[tuple[str, bytes]], seen: dict[str, int]) -> bytes:
    """A tagged pairlist of attributes, terminated by NILVALUE."""
    out = b""
    for tag, value in pairs:
        out += xint(2 | (1 << 10)) + symbol(tag, seen) + value
    return out + NILVALUE


def write_lazyload_db(folder: Path, objects: dict[str, bytes], type_byte: bytes | None = None):
    """Write Rdata.rdx/.rdb like R's makeLazyLoadDB (compress=TRUE, or a type byte)."""
    compress = {None: zlib.compress, b"Z": zlib.compress, b"2": bz2.compress,
                b"X": lzma.compress}.get(type_byte, lambda raw: raw)
    rdb = b""
    offsets: dict[str, tuple[int, int]] = {}
    for name, payload in objects.items():
        blob = struct.pack(">I", len(payload)) + (type_byte or b"") + compress(payload)
        offsets[name] = (len(rdb), len(blob))
        rdb += blob
    (folder / "Rdata.rdb").write_bytes(rdb)
    write_rdx(folder, offsets)


def write_rdx(folder: Path, offsets: dict[str, tuple[int, int]]):
    """The gzip-compressed index: list(variables = list(name = c(offset, length)), ...)."""
    seen: dict[str, int] = {}
    variables = vecsxp(
        [intsxp(list(pos)) for pos in offsets.values()],
        attributes([("names", strsxp(list(offsets)))], seen),
    )
    index = vecsxp(
        [variables, vecsxp([]), xint(10, 1, 1)],
        attributes([("names", strsxp(["variables", "references", "compressed"]))], seen),
    )
    (folder / "Rdata.rdx").write_bytes(gzip.compress(header() + index))


# -- objects ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_character_vector_with_na(version):
    obj = unserialize(header(version) + strsxp(["Call me Ishmael.", None, "naïve café", ""]), "x.rds")
    assert text_columns(obj) == {"": ["Call me Ishmael.", None, "naïve café", ""]}


def test_non_r_data_is_rejected_naming_the_source():
    with pytest.raises(ValueError, match=r"books\.rdb\[emma\].*not R serialised data.*b'PK"):
        unserialize(b"PK\x03\x04 a zip file", "books.rdb[emma]")


def test_text_columns_of_lists_and_data_frames():
    seen: dict[str, int] = {}
    named = vecsxp([strsxp(["x", "y"]), intsxp([1, 2])],
                   attributes([("names", strsxp(["text", "n"]))], seen))
    assert text_columns(unserialize(header() + named, "list")) == {"text": ["x", "y"]}

    seen = {}
    factor = intsxp(
        [2, 1, 2],
        attributes([("levels", strsxp(["Emma", "Persuasion"])), ("class", strsxp(["factor"]))], seen),
        is_object=True,
    )
    frame_attrs = attributes(
        [
            ("names", strsxp(["text", "book", "line"])),
            ("class", strsxp(["data.frame"])),
            ("row.names", intsxp([-(2**31), -3])),  # R's compact row names c(NA, -3)
        ],
        seen,
    )
    frame = vecsxp([strsxp(["a", None, "c"]), factor, intsxp([1, 2, 3])], frame_attrs, is_object=True)
    assert text_columns(unserialize(header() + frame, "frame")) == {
        "text": ["a", None, "c"], "book": ["Persuasion", "Emma", "Persuasion"],
    }
    assert text_columns(unserialize(header() + intsxp([1, 2]), "ints")) == {}


# -- lazy-load databases ------------------------------------------------------------


@pytest.mark.parametrize("type_byte", [None, b"Z", b"2", b"X", b"0"])
def test_lazyload_db_reads_each_object(tmp_path, type_byte):
    objects = {
        "emma": header() + strsxp(["EMMA", "", "CHAPTER I"]),
        "mobydick": header(2) + strsxp(["Call me Ishmael."]),
    }
    write_lazyload_db(tmp_path, objects, type_byte)
    db = LazyLoadDB(tmp_path / "Rdata.rdx")
    assert db.names() == ["emma", "mobydick"]
    assert text_columns(db.read("mobydick")) == {"": ["Call me Ishmael."]}
    assert text_columns(db.read("emma")) == {"": ["EMMA", "", "CHAPTER I"]}
    with pytest.raises(KeyError, match=r"no object 'persuasion'.*\['emma', 'mobydick'\]"):
        db.read("persuasion")


def test_damaged_databases_are_rejected(tmp_path):
    write_lazyload_db(tmp_path, {"emma": header() + strsxp(["EMMA"])}, type_byte=b"?")
    with pytest.raises(ValueError, match=r"Rdata\.rdb\[emma\].*unsupported compression type byte b'\?'"):
        LazyLoadDB(tmp_path / "Rdata").read("emma")

    write_lazyload_db(tmp_path, {"emma": header() + strsxp(["EMMA"] * 50)})
    rdb = tmp_path / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"Rdata\.rdb: object 'emma' at offset 0 needs \d+ bytes.*only \d+.*truncated"):
        LazyLoadDB(tmp_path / "Rdata").read("emma")

    # A blob cut short inside a string, recompressed: rdata alone would return
    # the shortened string, the length header gives it away.
    payload = header() + strsxp(["a fairly long line of text"])
    rdb.write_bytes(struct.pack(">I", len(payload)) + zlib.compress(payload[:-5]))
    write_rdx(tmp_path, {"emma": (0, rdb.stat().st_size)})
    with pytest.raises(ValueError, match=r"decompressed to \d+ bytes but its header says \d+"):
        LazyLoadDB(tmp_path / "Rdata").read("emma")


def test_lazyload_index_must_name_variables(tmp_path):
    (tmp_path / "Rdata.rdb").write_bytes(b"")
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header() + strsxp(["not an index"])))
    with pytest.raises(ValueError, match=r"Rdata\.rdx.*'variables'"):
        LazyLoadDB(tmp_path / "Rdata")
    (tmp_path / "Rdata.rdx").unlink()
    with pytest.raises(ValueError, match=r"Rdata\.rdx: lazy-load database file not found"):
        LazyLoadDB(tmp_path / "Rdata")


# -- the real packages ----------------------------------------------------------------

# Printed lines per book in janeaustenr 1.0.0 (one character-vector element each).
AUSTEN_LINES = {
    "emma": 16235, "mansfieldpark": 15349, "northangerabbey": 7856, "persuasion": 8328,
    "prideprejudice": 13030, "sensesensibility": 12624,
}


def test_reader_on_the_real_debian_packages(tmp_path):
    """Parse the kept .deb files from scratch and match the cached book texts."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    prepare_default_corpus()
    debs = default_corpus_folder() / "debs"
    (janeausten,) = debs.glob("r-cran-janeaustenr_*.deb")
    (tokenizers,) = debs.glob("r-cran-tokenizers_*.deb")
    for deb in (janeausten, tokenizers):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    data = tmp_path / "usr/lib/R/site-library"

    austen = LazyLoadDB(data / "janeaustenr/data/Rdata")
    assert sorted(austen.names()) == sorted(AUSTEN_LINES)
    lines = {name: text_columns(austen.read(name))[""] for name in AUSTEN_LINES}
    assert {name: len(book) for name, book in lines.items()} == AUSTEN_LINES
    assert lines["emma"][:3] == ["EMMA", "", "By Jane Austen"]
    assert lines["prideprejudice"][9:11] == [
        "It is a truth universally acknowledged, that a single man in possession",
        "of a good fortune, must be in want of a wife.",
    ]
    cached = (default_corpus_folder() / "persuasion.txt").read_text(encoding="utf-8")
    assert "\n".join(lines["persuasion"]) == cached

    (text,) = text_columns(LazyLoadDB(data / "tokenizers/data/Rdata").read("mobydick"))[""]
    assert "Call me Ishmael." in text  # the whole book in one string
    assert text.replace("\r\n", "\n").lstrip("\ufeff") == (
        default_corpus_folder() / "mobydick.txt"
    ).read_text(encoding="utf-8")
