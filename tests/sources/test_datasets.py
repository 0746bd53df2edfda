"""Every dataset format gives the rows `token_rows` gives for the same text as .txt files,
from a memory-mapped file; bad input fails with the reason. Real tokenizer, real books."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from mxd_lens.sources import datasets as ds_module
from mxd_lens.sources import load_default_corpus, load_texts, token_rows
from mxd_lens.sources.datasets import dataset_token_rows, open_dataset
from mxd_lens.sources.model import default_model_folder, prepare_default_model

CONTEXT = 48


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    prepare_default_model()
    return AutoTokenizer.from_pretrained(str(default_model_folder()))


@pytest.fixture(scope="module")
def docs():
    """Twelve chapters of Persuasion, cut to a few hundred characters each (quick to tokenise),
    plus one with a non-ASCII character."""
    chapters = [d[:700] for d in load_default_corpus("heldout")[:11]]
    return chapters + ["Anne’s café — naïve façade.\n\nA second paragraph."]


@pytest.fixture(scope="module")
def txt_folder(tmp_path_factory, docs):
    folder = tmp_path_factory.mktemp("txt")
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference(tokenizer, txt_folder):
    """The rows of the same text given as .txt files, the way they were always built."""
    return token_rows(tokenizer, load_texts(txt_folder), CONTEXT)


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "tokens"


def _rows(source, tokenizer, cache, **kw):
    rows = dataset_token_rows(source, tokenizer, CONTEXT, cache_dir=cache, **kw)
    assert rows.dtype == torch.long and rows.shape[1] == CONTEXT
    return rows


def _is_memmapped(rows: torch.Tensor) -> bool:
    """The tensor's memory is a mapping of a .npy file (Linux: /proc/self/maps), not a copy."""
    ptr = rows.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[-1].endswith(".npy"):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_txt_rows_equal_token_rows_and_are_memory_mapped(tokenizer, txt_folder, reference, cache):
    rows = _rows(txt_folder, tokenizer, cache)
    assert torch.equal(rows, reference)
    assert (rows[:, 0] == 0).all()  # every row starts with the separator
    assert _is_memmapped(rows)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and np.load(files[0], mmap_mode="r").shape == tuple(reference.shape)
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["rows"] == reference.shape[0] and meta["context"] == CONTEXT
    # a single .txt file is one document, as load_texts reads it
    single = _rows(txt_folder / "doc_000.txt", tokenizer, cache)
    assert torch.equal(single, token_rows(tokenizer, load_texts(txt_folder / "doc_000.txt"), CONTEXT))


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl_folder", "parquet", "parquet_folder", "hf_folder", "hf_dict"])
def test_text_formats_equal_the_txt_rows(fmt, tokenizer, docs, reference, tmp_path, cache):
    records = [{"id": i, "text": d} for i, d in enumerate(docs)]
    records.insert(3, {"id": -1, "text": ""})  # empty texts are skipped, like empty .txt files
    if fmt.startswith("jsonl"):
        parts = [records] if fmt == "jsonl" else [records[:5], records[5:]]
        for i, part in enumerate(parts):
            (tmp_path / f"part_{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        source = tmp_path / "part_0.jsonl" if fmt == "jsonl" else tmp_path
    elif fmt.startswith("parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = [records] if fmt == "parquet" else [records[:7], records[7:]]
        for i, part in enumerate(parts):
            pq.write_table(pa.Table.from_pylist(part), tmp_path / f"part_{i}.parquet", row_group_size=4)
        source = tmp_path / "part_0.parquet" if fmt == "parquet" else tmp_path
    else:
        import datasets

        dataset = datasets.Dataset.from_list(records)
        source = tmp_path / "saved"
        if fmt == "hf_dict":
            datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(str(source))
        else:
            dataset.save_to_disk(str(source))
    rows = _rows(source, tokenizer, cache)
    assert torch.equal(rows, reference)
    assert _is_memmapped(rows)


def test_token_column_and_token_arrays_equal_the_txt_rows(tokenizer, docs, reference, tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
    assert torch.equal(_rows(tmp_path / "ids.jsonl", tokenizer, cache, token_column="input_ids"), reference)
    pq.write_table(pa.Table.from_pylist([{"input_ids": i, "text": "x"} for i in ids]), tmp_path / "ids.parquet")
    assert torch.equal(_rows(tmp_path / "ids.parquet", tokenizer, cache, token_column="input_ids"), reference)

    # a flat stream, separator-led as token_rows builds it (and without the leading separator)
    stream = np.concatenate([np.concatenate([[0], i]) for i in ids]).astype(np.int32)
    np.save(tmp_path / "stream.npy", stream)
    np.save(tmp_path / "stream_nosep.npy", stream[1:])
    save_file({"tokens": stream.astype(np.int64), "other": np.zeros(3, np.int64)}, str(tmp_path / "stream.safetensors"))
    for name, kw in [("stream.npy", {}), ("stream_nosep.npy", {}), ("stream.safetensors", {"token_column": "tokens"})]:
        assert torch.equal(_rows(tmp_path / name, tokenizer, cache, **kw), reference), name

    # rows [rows, context]: served as they are; int64 .npy without any copy
    np.save(tmp_path / "rows.npy", reference.numpy())
    direct = _rows(tmp_path / "rows.npy", tokenizer, cache, max_rows=3)
    assert torch.equal(direct, reference[:3]) and _is_memmapped(direct)
    save_file({"rows": reference.numpy().astype(np.uint16)}, str(tmp_path / "rows.safetensors"))
    assert torch.equal(_rows(tmp_path / "rows.safetensors", tokenizer, cache), reference)


def test_max_rows_is_the_prefix_and_the_file_is_reused(tokenizer, txt_folder, reference, cache, monkeypatch):
    for n in (1, 3, reference.shape[0] + 5):
        rows = _rows(txt_folder, tokenizer, cache, max_rows=n)
        assert torch.equal(rows, reference[:n])
    n_files = len(list(cache.glob("*.npy")))
    # a second call reads the cached file: the tokenizer is not called again
    monkeypatch.setattr(ds_module, "_tokenise", lambda *a: pytest.fail("tokenised again"))
    assert torch.equal(_rows(txt_folder, tokenizer, cache, max_rows=3), reference[:3])
    assert len(list(cache.glob("*.npy"))) == n_files
    # another context is another file
    monkeypatch.undo()
    other = dataset_token_rows(txt_folder, tokenizer, 20, cache_dir=cache)
    assert torch.equal(other, token_rows(tokenizer, load_texts(txt_folder), 20))


def test_rewritten_file_is_tokenised_again(tokenizer, tmp_path, cache):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "The first text, long enough for a row or two of tokens. " * 4}) + "\n")
    first = _rows(path, tokenizer, cache)
    time.sleep(0.01)
    path.write_text(json.dumps({"text": "Another text entirely, also long enough for rows of tokens. " * 4}) + "\n")
    second = _rows(path, tokenizer, cache)
    assert not torch.equal(first[:, 1:5], second[:, 1:5])


def test_bad_input_names_what_was_expected(tokenizer, tmp_path, cache):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no text column 'text' \(--text-column\); its columns are \['body', 'id'\]"):
        open_dataset(tmp_path / "a.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"content": "x"}]), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"no token column 'ids' \(--token-column\); its columns are \['content'\]"):
        open_dataset(tmp_path / "b.parquet", token_column="ids")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        open_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"unknown dataset format '\.csv'"):
        open_dataset(tmp_path / "c.csv")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x")
    (mixed / "b.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"mixes \['jsonl', 'txt'\]"):
        open_dataset(mixed)
    np.save(tmp_path / "f.npy", np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="must be integers"):
        open_dataset(tmp_path / "f.npy")
    np.save(tmp_path / "r.npy", np.zeros((2, 5), np.int64))
    with pytest.raises(ValueError, match="rows of 5 tokens but context=48"):
        _rows(tmp_path / "r.npy", tokenizer, cache)
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "Too short."}) + "\n")
    with pytest.raises(ValueError, match="too few for one row of context=48"):
        _rows(tmp_path / "short.jsonl", tokenizer, cache)
    assert not list(cache.glob("*.npy"))  # nothing half-written is left behind
    assert not list(cache.glob(".*.tmp"))


def test_hub_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set, so it cannot be streamed"):
        open_dataset("some-user/some-dataset-that-is-not-cached")
    assert time.perf_counter() - start < 5


def test_rows_are_written_in_small_blocks_with_the_same_result(tokenizer, docs, reference, tmp_path, cache, monkeypatch):
    """With a tiny flush size every path cuts rows across many blocks (what a corpus bigger
    than memory does), and the rows are still exactly the .txt rows."""
    from safetensors.numpy import save_file

    monkeypatch.setattr(ds_module, "_FLUSH_TOKENS", 37)
    monkeypatch.setattr(ds_module, "_DOC_BATCH", 5)
    for i, doc in enumerate(docs):
        (tmp_path / f"d{i:02d}.txt").write_text(doc, encoding="utf-8")
    assert torch.equal(_rows(tmp_path, tokenizer, cache), reference)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.concatenate([[0], i]) for i in ids]).astype(np.int64)
    save_file({"tokens": stream}, str(tmp_path / "s.safetensors"))
    assert torch.equal(_rows(tmp_path / "s.safetensors", tokenizer, cache), reference)
    save_file({"rows": reference.numpy().astype(np.int32)}, str(tmp_path / "r.safetensors"))
    assert torch.equal(_rows(tmp_path / "r.safetensors", tokenizer, cache, max_rows=7), reference[:7])


def test_only_empty_texts_fail_when_opened(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text found in .* non-empty .txt files"):
        open_dataset(tmp_path)
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match="no text found in column 'text' of"):
        open_dataset(tmp_path / "e.jsonl")


def test_frontier_holds_out_the_rows_after_the_training_rows(tokenizer, txt_folder, reference, tmp_path, monkeypatch):
    """`--dataset` without `--eval-dataset`: training rows first, held-out rows after them;
    with too little data for both, `eval_fraction` of the rows (the last ones)."""
    from mxd_lens.experiments.config import FrontierConfig
    from mxd_lens.experiments.frontier import load_docs, tokenize_docs

    monkeypatch.setenv("MXD_LENS_CACHE", str(tmp_path / "cache"))  # token files go there, not into ~/.cache

    n = reference.shape[0]
    cfg = FrontierConfig(dataset=str(txt_folder), context=CONTEXT, collect_tokens=CONTEXT * 10,
                         eval_tokens=CONTEXT * 4, progress=False)
    train, heldout = tokenize_docs(cfg, tokenizer, *load_docs(cfg))
    assert torch.equal(train, reference[:10]) and torch.equal(heldout, reference[10:14])
    small = FrontierConfig(dataset=str(txt_folder), context=CONTEXT, collect_tokens=CONTEXT * 1000,
                           eval_tokens=CONTEXT * 1000, eval_fraction=0.25, progress=False)
    train, heldout = tokenize_docs(small, tokenizer, *load_docs(small))
    assert list((tmp_path / "cache" / "tokens").glob("*.npy"))  # memory-mapped token files, in the cache
    n_eval = round(n * 0.25)
    assert torch.equal(train, reference[: n - n_eval]) and torch.equal(heldout, reference[n - n_eval :])
    # a separate held-out dataset in another format, by its text column
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in load_texts(txt_folder)))
    cfg = FrontierConfig(dataset=str(txt_folder), eval_dataset=str(tmp_path / "eval.jsonl"), text_column="body",
                         context=CONTEXT, collect_tokens=CONTEXT * 3, eval_tokens=CONTEXT * 2, progress=False)
    train, heldout = tokenize_docs(cfg, tokenizer, *load_docs(cfg))
    assert torch.equal(train, reference[:3]) and torch.equal(heldout, reference[:2])
    bad = FrontierConfig(dataset=str(txt_folder), eval_dataset=str(tmp_path / "eval.jsonl"), text_column="content")
    with pytest.raises(ValueError, match=r"no text column 'content' \(--text-column\); its columns are \['body'\]"):
        load_docs(bad)


def test_command_line_column_flags_fail_before_the_model_loads(tmp_path, capsys):
    from mxd_lens.cli import main

    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "Some text."}) + "\n")
    out = tmp_path / "run"
    start = time.perf_counter()
    assert main(["train", "--dataset", str(tmp_path / "d.jsonl"), "--text-column", "content", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "no text column 'content' (--text-column); its columns are ['body']" in err
    assert main(["train", "--dataset", str(tmp_path / "d.jsonl"), "--token-column", "ids", "--out", str(out)]) != 0
    assert "no token column 'ids' (--token-column)" in capsys.readouterr().err
    assert time.perf_counter() - start < 20 and not out.exists()
