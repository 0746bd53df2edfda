"""`mxd-lens probe` and `mxd-lens steer` on a saved module: the files they write, and bad
input refused before anything is loaded or written."""

from __future__ import annotations

import json

import pytest
import torch

from mxd_lens import TopKTranscoder, TranscoderConfig
from mxd_lens.cli import main

LAYER = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory, default_model):
    cfg = default_model.cfg
    torch.manual_seed(0)
    tc = TopKTranscoder(TranscoderConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_sae=64, k=4, layer=LAYER,
                                         model_name="SmolLM2-135M-Instruct"))
    folder = tmp_path_factory.mktemp("mods") / "transcoder_k4"
    tc.save(folder)
    labelled = folder.parent / "mine.jsonl"
    lines = [json.dumps({"text": f"{w} number {i} is here", "label": lab})
             for lab, w in (("cat", "The cat"), ("dog", "A dog")) for i in range(9)]
    labelled.write_text("\n".join(lines) + "\n")
    return folder, labelled


def test_probe_writes_table_results_and_figure(saved, tmp_path, capsys):
    folder, labelled = saved
    out = tmp_path / "probe"
    assert main(["probe", str(folder), "--tasks", str(labelled), "--top-m", "5", "--ks", "1,2",
                 "--max-tokens", "8", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["mine.jsonl"]["sizes"] == {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 3}}
    methods = [r["method"] for r in results["results"]]
    assert methods == ["transcoder_k4", "mlp_neurons", "random"]
    # "cat" vs "dog" sits in the first word: the MLP neurons separate them perfectly
    neurons = results["results"][1]
    assert neurons["best_f1"] == 1.0 and neurons["n_units"] == 1536
    assert "| mine.jsonl | transcoder_k4 | 64 |" in (out / "table.md").read_text()
    assert "plotly" in (out / "probing.html").read_text()[:5000].lower()


def test_bad_input_is_refused_first(saved, tmp_path, capsys):
    folder, _ = saved
    out = tmp_path / "never"
    assert main(["probe", str(folder), "--tasks", "sentiment", "--out", str(out)]) != 0
    assert "'sentiment' is neither one of ['book', 'language', 'topic']" in capsys.readouterr().err
    assert main(["steer", str(folder), "--prompts", "40", "--out", str(out)]) != 0
    assert "--prompts=40; expected 1..12" in capsys.readouterr().err
    assert not out.exists()
