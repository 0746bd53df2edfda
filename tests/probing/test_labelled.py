"""Labelled text from the real Debian packages and the default corpus: balanced, de-duplicated,
split by document, with the stated sizes; your own files; clear errors."""

from __future__ import annotations

import json

import pytest

from mxd_lens.sources import labelled
from mxd_lens.sources.labelled import (
    LANGUAGES,
    TOPICS,
    balanced_split,
    book_task,
    labelled_folder,
    language_task,
    load_labelled,
    load_task,
    topic_task,
)


def check_balanced_disjoint(data, n_train, n_test):
    sizes = data.sizes()
    assert sizes == {"train": {c: n_train for c in data.classes}, "test": {c: n_test for c in data.classes}}
    for split in ("train", "test"):
        assert len(data.texts[split]) == len(data.labels[split]) == len(data.documents[split])
    assert not set(data.documents["train"]) & set(data.documents["test"]), "a document on both sides"
    every = [t.casefold() for s in ("train", "test") for t in data.texts[s]]
    assert len(every) == len(set(every)), "a text twice"
    assert all(t.strip() for t in every)


def test_language_task_from_the_fortune_packages():
    data = language_task(n_train=24, n_test=12)
    assert data.classes == list(LANGUAGES) and len(data.classes) == 8
    check_balanced_disjoint(data, 24, 12)
    # the labels are the languages: Cyrillic only in Russian, and the German texts look German
    ru = data.classes.index("ru")
    cyrillic = [any("\u0400" <= ch <= "\u04ff" for ch in t) for t in data.texts["train"]]
    is_ru = [y == ru for y in data.labels["train"]]
    assert sum(c and r for c, r in zip(cyrillic, is_ru)) >= 22 and not any(c and not r for c, r in zip(cyrillic, is_ru))
    de = [t for t, y in zip(data.texts["train"], data.labels["train"]) if data.classes[y] == "de"]
    assert sum(any(w in f" {t.lower()} " for w in (" der ", " die ", " und ", " das ", " ist ")) for t in de) >= 12


def test_topic_and_book_tasks():
    topic = topic_task(n_train=16, n_test=8)
    assert topic.classes == list(TOPICS)
    check_balanced_disjoint(topic, 16, 8)
    book = book_task(n_train=16, n_test=8)
    assert len(book.classes) == 7 and "mobydick" in book.classes
    check_balanced_disjoint(book, 16, 8)
    # split by chapter: a book's test chapters hold none of its training paragraphs
    for c in book.classes:
        train_ch = {d for d, y in zip(book.documents["train"], book.labels["train"]) if book.classes[y] == c}
        test_ch = {d for d, y in zip(book.documents["test"], book.labels["test"]) if book.classes[y] == c}
        assert train_ch and test_ch and not train_ch & test_ch
    assert load_task("topic", 16, 8).texts == topic.texts  # deterministic
    assert load_task("topic", 16, 8, seed=1).texts != topic.texts


def test_cache_is_checksummed_and_rebuilt(tmp_path, monkeypatch):
    kept = labelled_folder() / "debs"
    labelled.prepare_fortunes()  # the shared cache, with its packages
    monkeypatch.setenv("MXD_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(labelled.LABELLED_DEBS_ENV_VAR, str(kept))
    folder = labelled.prepare_fortunes()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["packages"]) == {p for ps in LANGUAGES.values() for p in ps}
    assert all(len(v["sha256"]) == 64 for v in manifest["packages"].values())
    n = manifest["fortunes"]
    assert len(labelled.load_fortunes()) == n
    # a damaged cache file fails its checksum and is rebuilt
    data = folder / "fortunes.jsonl"
    data.write_text(data.read_text()[: len(data.read_text()) // 2])
    assert len(labelled.load_fortunes()) == n


def test_unreachable_packages_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MXD_LENS_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(labelled.LABELLED_DEBS_ENV_VAR, str(empty))
    with pytest.raises(RuntimeError, match=r"MXD_LENS_LABELLED_DEBS=.* holds no fortunes_\*\.deb.*load_labelled"):
        labelled.prepare_fortunes()
    monkeypatch.delenv(labelled.LABELLED_DEBS_ENV_VAR)
    monkeypatch.setenv("PATH", str(empty))  # no apt-get: as on a machine that is not Debian
    with pytest.raises(RuntimeError, match=r"needs `apt-get`.*MXD_LENS_LABELLED_DEBS"):
        labelled.prepare_fortunes()


def test_own_labelled_files(tmp_path):
    rows = [{"text": f"text number {i} of class {c}", "label": c, "doc": f"{c}{i // 2}"}
            for c in ("a", "b", "c") for i in range(12)]
    rows.append({"text": "text number 0 of class a", "label": "b", "doc": "x"})  # a duplicate: dropped
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_labelled(jsonl, n_train=6, n_test=4, document_column="doc")
    assert data.classes == ["a", "b", "c"]
    check_balanced_disjoint(data, 6, 4)
    assert "text number 0 of class a" not in data.texts["train"] + data.texts["test"]
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[:-1]))
    auto = load_labelled(csv_file)  # sizes from the smallest class: 12 texts, a third for test
    check_balanced_disjoint(auto, 8, 4)
    assert load_task(str(csv_file)).texts == auto.texts
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello", "lable": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1 has no \['label'\]"):
        load_labelled(bad)
    with pytest.raises(ValueError, match=r"class 'a' has 11 unique texts .* fewer than n_train \+ n_test = 10 \+ 4"):
        load_labelled(jsonl, n_train=10, n_test=4)
    with pytest.raises(ValueError, match="unknown task 'sentiment'"):
        load_task("sentiment")


def test_balanced_split_refuses_a_single_class():
    with pytest.raises(ValueError, match="at least 2"):
        balanced_split("t", [("x", "a", "1"), ("y", "a", "2")], 1, 1)
