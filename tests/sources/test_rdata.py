"""The R serialisation reader, on hand-built XDR bytes and on the real packages."""

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

from mxd_lens.sources.corpus import default_corpus_folder, prepare_default_corpus
from mxd_lens.sources.rdata import LazyLoadDB, read_rds, text_columns, unserialize

# -- a tiny R serialiser, written from the format description (serialize.c) ------

NILVALUE = struct.pack(">i", 254)
UTF8_FLAGS = 9 | (1 << 3) << 12  # CHARSXP marked UTF-8
ASCII_FLAGS = 9 | (1 << 6) << 12


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


def strsxp(values: list[str | None], attrs: bytes = b"") -> bytes:
    flags = 16 | ((1 << 9) if attrs else 0)
    return xint(flags, len(values)) + b"".join(charsxp(v) for v in values) + attrs


def intsxp(values: list[int], attrs: bytes = b"") -> bytes:
    flags = 13 | ((1 << 9) if attrs else 0)
    return xint(flags, len(values)) + xint(*values) + attrs


def vecsxp(items: list[bytes], attrs: bytes = b"") -> bytes:
    flags = 19 | ((1 << 9) if attrs else 0)
    return xint(flags, len(items)) + b"".join(items) + attrs


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


# -- unserialize ------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_character_vector_with_na_round_trips(version):
    data = header(version) + strsxp(["Call me Ishmael.", None, "naïve café", ""])
    obj = unserialize(data, "test.rds")
    assert obj.type == "character"
    assert obj.value == ["Call me Ishmael.", None, "naïve café", ""]


def test_truncated_input_is_rejected_naming_the_source():
    data = header() + strsxp(["a fairly long string", "another"])
    with pytest.raises(ValueError, match=r"books\.rdb.*truncated"):
        unserialize(data[:-5], "books.rdb")


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"RDX2\n" + b"\0" * 20, "not R serialised data"),
        (b"A\n1\n", "ASCII format is not supported"),
        (header()[:2] + xint(7, 0, 0) + strsxp(["x"]), "version 7"),
        (header() + xint(16, 3) + charsxp("a") + xint(13, 1, 5), "expected a string"),
        (header() + xint(99), "unknown R object type 99"),
        (header() + xint(9, -7), "negative string length"),
    ],
)
def test_malformed_input_is_rejected(data, problem):
    with pytest.raises(ValueError, match=problem):
        unserialize(data, "bad.rds")


def test_named_list_attributes_and_symbol_references():
    seen: dict[str, int] = {}
    inner = strsxp(["x", "y"], attributes([("names", strsxp(["first", "second"]))], seen))
    names = attributes([("names", strsxp(["text", "n"]))], seen)  # "names" is now a reference
    data = header() + vecsxp([inner, intsxp([1, -(2**31), 3])], names)
    obj = unserialize(data)
    assert obj.type == "list"
    assert obj.names == ["text", "n"]
    parts = obj.as_dict()
    assert parts["text"].value == ["x", "y"]
    assert parts["text"].names == ["first", "second"]
    assert parts["n"].value == [1, None, 3]  # NA_integer_ -> None


def test_data_frame_text_columns_including_factors():
    seen: dict[str, int] = {}
    factor = intsxp(
        [2, 1, 2],
        attributes([("levels", strsxp(["Emma", "Persuasion"])), ("class", strsxp(["factor"]))],
                   seen),
    )
    frame_attrs = attributes(
        [
            ("names", strsxp(["text", "book", "line"])),
            ("class", strsxp(["tbl_df", "tbl", "data.frame"])),
            ("row.names", intsxp([-(2**31), -3])),  # R's compact row names c(NA, -3)
        ],
        seen,
    )
    frame = vecsxp([strsxp(["a", None, "c"]), factor, intsxp([1, 2, 3])], frame_attrs)
    obj = unserialize(header() + frame)
    assert obj.classes == ["tbl_df", "tbl", "data.frame"]
    assert text_columns(obj) == {"text": ["a", None, "c"], "book": ["Persuasion", "Emma", "Persuasion"]}


def test_compressed_rds_files(tmp_path):
    payload = header() + strsxp(["one", "two"])
    for name, blob in [("gz.rds", gzip.compress(payload)), ("xz.rds", lzma.compress(payload)),
                       ("plain.rds", payload)]:
        (tmp_path / name).write_bytes(blob)
        assert read_rds(tmp_path / name).value == ["one", "two"]
    (tmp_path / "junk.rds").write_bytes(b"\x00\x01junk")
    with pytest.raises(ValueError, match=r"junk\.rds.*not an R data file"):
        read_rds(tmp_path / "junk.rds")


# -- lazy-load databases ------------------------------------------------------------


def write_lazyload_db(folder: Path, objects: dict[str, bytes], type_byte: bytes | None = None):
    """Write Rdata.rdx/.rdb like R's makeLazyLoadDB (compress=TRUE, or a type byte)."""
    rdb = b""
    offsets: dict[str, tuple[int, int]] = {}
    for name, payload in objects.items():
        compress = {None: zlib.compress, b"Z": zlib.compress, b"2": bz2.compress,
                    b"X": lzma.compress}.get(type_byte, lambda raw: raw)
        blob = (type_byte or b"") + compress(payload)
        blob = struct.pack(">I", len(payload)) + blob
        offsets[name] = (len(rdb), len(blob))
        rdb += blob
    seen: dict[str, int] = {}
    variables = vecsxp(
        [intsxp(list(pos)) for pos in offsets.values()],
        attributes([("names", strsxp(list(offsets)))], seen),
    )
    index = vecsxp(
        [variables, vecsxp([]), xint(10, 1, 1)],
        attributes([("names", strsxp(["variables", "references", "compressed"]))], seen),
    )
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(header() + index))


@pytest.mark.parametrize("type_byte", [None, b"Z", b"2", b"X", b"0"])
def test_lazyload_db_reads_each_object(tmp_path, type_byte):
    objects = {
        "emma": header() + strsxp(["EMMA", "", "CHAPTER I"]),
        "mobydick": header(2) + strsxp(["Call me Ishmael."]),
    }
    write_lazyload_db(tmp_path, objects, type_byte)
    db = LazyLoadDB(tmp_path / "Rdata.rdx")
    assert db.names() == ["emma", "mobydick"]
    assert db.read("mobydick").value == ["Call me Ishmael."]
    assert db.read("emma").value == ["EMMA", "", "CHAPTER I"]
    with pytest.raises(KeyError, match="persuasion"):
        db.read("persuasion")


def test_lazyload_db_rejects_unknown_compression_and_truncation(tmp_path):
    write_lazyload_db(tmp_path, {"emma": header() + strsxp(["EMMA"])}, type_byte=b"?")
    with pytest.raises(ValueError, match=r"Rdata\.rdb\[emma\].*unsupported compression type"):
        LazyLoadDB(tmp_path / "Rdata").read("emma")

    write_lazyload_db(tmp_path, {"emma": header() + strsxp(["EMMA"] * 50)})
    rdb = tmp_path / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"Rdata\.rdb.*truncated"):
        LazyLoadDB(tmp_path / "Rdata").read("emma")


def test_lazyload_index_must_name_variables(tmp_path):
    (tmp_path / "Rdata.rdb").write_bytes(b"")
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header() + strsxp(["not an index"])))
    with pytest.raises(ValueError, match=r"Rdata\.rdx.*'variables'"):
        LazyLoadDB(tmp_path / "Rdata")


# -- the real packages ----------------------------------------------------------------


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
    assert sorted(austen.names()) == [
        "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
        "sensesensibility",
    ]
    persuasion = austen.read("persuasion")
    assert persuasion.type == "character" and len(persuasion.value) > 8000  # one line each
    cached = (default_corpus_folder() / "persuasion.txt").read_text(encoding="utf-8")
    assert "\n".join(persuasion.value) == cached

    moby = LazyLoadDB(data / "tokenizers/data/Rdata").read("mobydick")
    (text,) = moby.value  # the whole book in one string
    assert "Call me Ishmael." in text
    assert text.replace("\r\n", "\n").lstrip("\ufeff") == (
        default_corpus_folder() / "mobydick.txt"
    ).read_text(encoding="utf-8")
