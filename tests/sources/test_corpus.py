"""The default corpus, user texts and token rows, on the real books."""

from __future__ import annotations

import re
import time

import pytest
import torch

from mxd_lens.sources import cache as cache_module
from mxd_lens.sources.corpus import (
    DEBS_ENV_VAR,
    default_corpus_folder,
    load_default_corpus,
    load_texts,
    prepare_default_corpus,
    split_chapters,
    token_rows,
)
from mxd_lens.sources.model import default_model_folder, prepare_default_model


@pytest.fixture(scope="module")
def train():
    return load_default_corpus("train")


@pytest.fixture(scope="module")
def heldout():
    return load_default_corpus("heldout")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    prepare_default_model()
    return AutoTokenizer.from_pretrained(str(default_model_folder()))


def paragraphs(docs):
    return [p for doc in docs for p in doc.split("\n\n")]


# -- the default corpus ------------------------------------------------------------


def test_books_open_with_their_famous_first_sentences(train, heldout):
    assert any(doc.startswith("Call me Ishmael.") for doc in train)
    assert any(doc.startswith("It is a truth universally acknowledged, that a single man in "
                              "possession of a good fortune, must be in want of a wife.")
               for doc in train)
    assert any(doc.startswith("Emma Woodhouse, handsome, clever, and rich") for doc in train)
    assert heldout[0].startswith("Sir Walter Elliot, of Kellynch Hall, in Somersetshire")


def test_heldout_is_persuasion_and_never_in_train(train, heldout):
    assert len(heldout) == 24  # Persuasion has 24 chapters
    held = set(paragraphs(heldout))
    assert not held & set(paragraphs(train))
    train_text, heldout_text = "\n".join(train), "\n".join(heldout)
    for name in ("Kellynch", "Wentworth", "Uppercross"):  # places and people of Persuasion only
        assert name in heldout_text
        assert name not in train_text


def test_train_holds_five_austen_novels_and_moby_dick(train):
    # 55 + 48 + 31 + 61 + 50 Austen chapters; Moby Dick's 135 chapters, Epilogue,
    # Etymology and two Extracts sections.
    assert len(train) == 55 + 48 + 31 + 61 + 50 + 139
    text = "\n".join(train)
    assert 4_500_000 < len(text) < 5_000_000
    assert "Loomings" not in text  # chapter titles are headings, not text
    assert "Project Gutenberg" not in text and "*** START" not in text
    assert "A NOTE ON THE TEXT" not in text  # Northanger Abbey's editorial note
    assert not any(p in {"FINIS", "THE END", "Finis"} for p in paragraphs(train))


def test_documents_are_chapters_with_rejoined_paragraphs(train, heldout):
    for doc in train + heldout:
        assert doc == doc.strip() and doc
        # Every newline belongs to a paragraph break: no hard-wrapped lines left.
        assert re.search(r"(?<!\n)\n(?!\n)", doc) is None
        assert "\n\n\n" not in doc
        assert not re.match(r"(CHAPTER|Chapter|VOLUME)\s+[IVXLC\d]+\b", doc)
    paras = paragraphs(train)
    # The source wraps at ~70 columns; re-joined, most paragraphs are longer.
    assert sum(len(p) > 80 for p in paras) > 0.6 * len(paras)
    assert not any("  " in p for p in paras)  # double spaces collapsed


def test_unknown_split_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'test'.*'train', 'heldout'"):
        load_default_corpus("test")


def test_split_chapters_on_a_small_book():
    text = "\n".join([
        "A TITLE", "", "By Someone", "", "VOLUME I", "", "", "CHAPTER I", "",
        "First line of a paragraph that", "continues here.", "", "  * * *  ", "",
        "A dash at the end--", "joins.", "", "Chapter 2. A Title That Runs", "Onto Two Lines.",
        "", "Second  chapter   text.", "", "THE END", "",
    ])
    assert split_chapters(text) == [
        "First line of a paragraph that continues here.\n\nA dash at the end--joins.",
        "Second chapter text.",
    ]
    assert split_chapters("no headings\nat all\n\nhere") == ["no headings at all\n\nhere"]


# -- the cache --------------------------------------------------------------------------


def test_cache_rebuilds_offline_from_kept_debs(tmp_path, monkeypatch, heldout):
    prepare_default_corpus()
    kept = default_corpus_folder() / "debs"
    monkeypatch.setenv(cache_module.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(DEBS_ENV_VAR, str(kept))
    start = time.perf_counter()
    assert load_default_corpus("heldout") == heldout
    assert time.perf_counter() - start < 60
    folder = tmp_path / "cache" / "corpus"
    assert (folder / "manifest.json").is_file()
    assert sorted(p.name for p in folder.glob("*.txt")) == [
        "emma.txt", "mansfieldpark.txt", "mobydick.txt", "northangerabbey.txt",
        "persuasion.txt", "prideprejudice.txt", "sensesensibility.txt",
    ]
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_missing_debs_or_tools_fail_with_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_module.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(DEBS_ENV_VAR, str(tmp_path))  # an empty folder
    with pytest.raises(RuntimeError, match=r"r-cran-janeaustenr_\*\.deb.*load_texts"):
        load_default_corpus()
    monkeypatch.delenv(DEBS_ENV_VAR)
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(RuntimeError, match=r"apt-get.*load_texts"):
        load_default_corpus()
    assert not (tmp_path / "cache" / "corpus" / "manifest.json").exists()


# -- your own texts -----------------------------------------------------------------------


def test_load_texts_from_files_folders_and_lists(tmp_path):
    (tmp_path / "b.txt").write_text("second\r\nfile", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufefffirst file", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a .txt", encoding="utf-8")
    assert load_texts(tmp_path) == ["first file", "second\nfile"]
    assert load_texts(tmp_path / "b.txt") == ["second\nfile"]
    assert load_texts([tmp_path / "b.txt", str(tmp_path / "a.txt")]) == ["second\nfile", "first file"]


def test_load_texts_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text found in .*empty"):
        load_texts(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        load_texts([tmp_path / "gone.txt"])


def test_hub_dataset_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="local .txt files"):
        load_texts("some-user/some-dataset-that-is-not-cached")
    assert time.perf_counter() - start < 15


# -- token rows --------------------------------------------------------------------------------


def test_token_rows_cut_a_continuous_stream(tokenizer, heldout):
    docs = heldout[:3]
    context = 64
    rows = token_rows(tokenizer, docs, context)
    stream = []
    for doc in docs:
        stream += [0] + tokenizer(doc, add_special_tokens=False)["input_ids"]
    n = (len(stream) - 1) // (context - 1)
    assert rows.dtype == torch.long and rows.shape == (n, context)
    assert (rows[:, 0] == 0).all()
    assert rows[:, 1:].flatten().tolist() == stream[1 : 1 + n * (context - 1)]
    # Document boundaries inside rows carry the separator too.
    assert (rows[:, 1:] == 0).sum() == stream[1 : 1 + n * (context - 1)].count(0) >= 1
    assert tokenizer.decode(rows[0, 1:20]).startswith("Sir Walter Elliot")


def test_token_rows_max_rows_is_a_deterministic_prefix(tokenizer, heldout):
    full = token_rows(tokenizer, heldout[:4], 33)
    assert torch.equal(token_rows(tokenizer, heldout[:4], 33), full)
    few = token_rows(tokenizer, heldout, 33, max_rows=5)
    assert torch.equal(few, full[:5])
    other_sep = token_rows(tokenizer, heldout[:2], 33, sep_token_id=7)
    assert (other_sep[:, 0] == 7).all()


def test_token_rows_validation(tokenizer):
    with pytest.raises(ValueError, match="context=1"):
        token_rows(tokenizer, ["some text"], 1)
    with pytest.raises(ValueError, match="docs is empty"):
        token_rows(tokenizer, [], 8)
    with pytest.raises(ValueError, match="too few for one row of context=512"):
        token_rows(tokenizer, ["a short document"], 512)
    with pytest.raises(ValueError, match="single string"):
        token_rows(tokenizer, "not a list", 8)
