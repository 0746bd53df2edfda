"""Unit dashboards on the default model and held-out text: ours (an expert's direction is
what it writes, labels, axes, density, dead units) and SAEDashboard 0.8.0 as released."""

from __future__ import annotations

import importlib.metadata
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mxd_lens import MxD, MxDConfig, TopKTranscoder, attach
from mxd_lens.architectures.transcoder import TranscoderConfig
from mxd_lens.experts import collect_activations, logit_effect, most_active_units, token_label, write_dashboard

LAYER = 3


@pytest.fixture(scope="module")
def modules(default_model) -> dict:
    cfg = default_model.cfg
    torch.manual_seed(0)
    mxd = MxD(MxDConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_hidden=128, n_experts=128, k=8, act_fn=cfg.act_fn,
                        glu=cfg.gated_mlp, layer=LAYER))  # fmt: skip
    tc = TopKTranscoder(TranscoderConfig(d_in=cfg.d_model, d_out=cfg.d_model, d_sae=256, k=8, layer=LAYER))
    with torch.no_grad():
        mxd.W_out.normal_(0, 0.05)  # D = 0 at init: every expert would write nothing
        mxd.b_enc[5] = -1e4  # expert 5 can never be selected: a dead unit
    return {"mxd": mxd, "transcoder": tc}


@pytest.fixture(scope="module")
def rows(heldout_rows) -> torch.Tensor:
    return heldout_rows[:4, :64]


def test_expert_direction_is_what_it_writes_on_its_top_contexts(default_model, modules, rows):
    """The dashboard's direction for an MxD expert is the mean over its top contexts of
    a_n c_n * (D^T z), computed here by hand from the MLP input, and differs from c_n."""
    model, mxd = default_model, modules["mxd"]
    with attach(model, {LAYER: mxd}):
        acts = collect_activations(model, LAYER, rows, progress=False)
        unit = most_active_units(acts, 1)[0]
        effect = logit_effect(model, acts, unit, n_contexts=10)
        names = [f"blocks.{LAYER}.mlp.hook_in", f"blocks.{LAYER}.mlp.hook_expert_acts"]
        _, cache = model.run_with_cache(rows, names_filter=names)
    x_all, a_all = cache[names[0]], cache[names[1]][..., unit]
    top = a_all.flatten().argsort(descending=True)[:10]
    with torch.no_grad():
        terms = []
        for i in top.tolist():
            r, p = divmod(i, rows.shape[1])
            x = x_all[r, p]
            z = F.silu(x @ mxd.W_hidden + mxd.b_hidden) * (x @ mxd.W_hidden_lin)  # SmolLM2: a gated SiLU MLP
            terms.append(a_all[r, p] * mxd.W_dec[unit] * (z @ mxd.W_out))
        ref = torch.stack(terms).mean(0)
    assert model.cfg.act_fn == "silu" and model.cfg.gated_mlp
    assert effect.n_contexts == 10
    torch.testing.assert_close(effect.direction, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(effect.logits, ref @ model.W_U, rtol=1e-4, atol=1e-5)
    cos = F.cosine_similarity(ref, mxd.W_dec[unit].detach(), dim=0)
    assert abs(float(cos)) < 0.9  # W_dec[n] alone (SAEDashboard's direction) is another direction


def test_byte_tokens_get_distinct_labels_that_show_their_bytes(default_model):
    tok = default_model.tokenizer
    bad = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert len(bad) > 100  # SmolLM2's byte tokens: all decode to the same '?'
    labels = [token_label(tok, i) for i in bad]
    assert len(set(labels)) == len(labels)
    # the bytes a label shows are the token's: the tokens of "日本" put back together
    ids = tok("日本", add_special_tokens=False)["input_ids"]
    shown = b"".join(eval(token_label(tok, i).rsplit(" #", 1)[0]) if "\ufffd" in tok.decode([i])
                     else tok.decode([i]).encode() for i in ids)  # fmt: skip
    assert shown == "日本".encode()
    assert token_label(tok, 260) == "' the' #260"


def _plotly_specs(page: str) -> list[dict]:
    """The layouts of every plotly figure of a page (Plotly.newPlot's layout argument)."""
    decoder = json.JSONDecoder()
    out = []
    for m in re.finditer(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*", page):
        data, end = decoder.raw_decode(page, m.end())
        rest = page[end:].lstrip()[1:].lstrip()
        layout, _ = decoder.raw_decode(rest)
        out.append({"data": data, "layout": layout})
    return out


def test_dashboard_labels_axes_density_and_dead_unit(default_model, modules, rows, tmp_path):
    model, mxd = default_model, modules["mxd"]
    with attach(model, {LAYER: mxd}):
        acts = collect_activations(model, LAYER, rows, progress=False)
        unit = most_active_units(acts, 1)[0]
        page = write_dashboard(model, acts, unit, tmp_path / "unit.html", n_contexts=6, n_logits=12).read_text()
        assert float(acts.frequency()[5]) == 0.0
        dead = write_dashboard(model, acts, 5, tmp_path / "dead.html").read_text()
    figs = _plotly_specs(page)
    assert len(figs) == 3  # activation histogram, logit effect, density of all units
    for fig in figs:
        for axis in ("xaxis", "yaxis"):
            assert fig["layout"][axis]["title"]["text"], f"untitled {axis} in {fig['layout']['title']['text']!r}"
    hist, logits, density = figs
    y = logits["layout"]["yaxis"]
    assert y["tickmode"] == "array" and y["tickvals"] == list(range(24)) == logits["data"][0]["y"]
    assert len(set(y["ticktext"])) == 24  # every bar its own drawn label, none merged
    assert "log10" in density["layout"]["xaxis"]["title"]["text"]
    assert f"unit {unit}" in json.dumps(density["layout"])  # this unit marked
    assert "not</b> W_dec[n]" in page and "top 6 contexts" in page
    # the dead unit: a message, not a blank page, and the density figure
    assert "never fired" in dead and len(_plotly_specs(dead)) == 1 and "one of the dead" in dead


def test_saedashboard_is_installed_without_its_pins():
    """setup.sh installs sae-dashboard 0.8.0 with --no-deps: it is there, its declared pins
    (transformer-lens < 3...) are not what is installed, and what it imports is."""
    from mxd_lens.circuits.saedashboard import SAE_DASHBOARD_VERSION, import_sae_dashboard

    assert importlib.metadata.version("sae-dashboard") == SAE_DASHBOARD_VERSION == "0.8.0"
    requires = importlib.metadata.requires("sae-dashboard")
    assert any(r.replace(" ", "").startswith("transformer-lens(>=2.2.0,<3.0.0)") for r in requires)
    assert int(importlib.metadata.version("transformer-lens").split(".")[0]) >= 3  # its pin was not followed
    # the packages it needs are the extra's, at its pins, and setup.sh installs both
    root = Path(__file__).resolve().parents[2]
    line = re.search(r"^saedashboard = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M)
    extra = re.findall(r'"([^"]+)"', line.group(1))
    assert len(extra) == 3
    for pin in extra:
        dist, version = pin.split("==")
        assert importlib.metadata.version(dist) == version, pin
    setup = (root / "scripts" / "setup.sh").read_text()
    assert '-e ".[saedashboard]"' in setup and f'--no-deps "sae-dashboard=={SAE_DASHBOARD_VERSION}"' in setup
    module = import_sae_dashboard()
    assert module.__name__ == "sae_dashboard"
    from sae_dashboard.feature_data_generator import FeatureDataGenerator  # noqa: F401
    from sae_dashboard.sae_vis_runner import SaeVisRunner  # noqa: F401


@pytest.mark.parametrize("name", ["mxd", "transcoder"])
def test_saedashboard_renders_our_modules(default_model, modules, rows, tmp_path, name):
    """SaeVisRunner + save_feature_centric_vis on three units: the page is written, the
    activations SAEDashboard found are ours, and its logit table is W_dec[n] @ W_U
    (right for a transcoder latent, c_n alone for an MxD expert). SAEDashboard first folds
    the decoder norms (`fold_W_dec_norm`), so it shows a_n ||W_dec[n]|| and the logits of
    W_dec[n] / ||W_dec[n]|| (an MxD's rows have norm 1: nothing changes)."""
    from mxd_lens.circuits.saedashboard import saedashboard_page

    model, module = default_model, modules[name]
    with attach(model, {LAYER: module}):
        acts = collect_activations(model, LAYER, rows, progress=False)
        units = most_active_units(acts, 3)
        ours = logit_effect(model, acts, units[0], n_contexts=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = saedashboard_page(model, module, rows, units, tmp_path / "sd.html", minibatch_size_tokens=2)
    warned = [w for w in caught if "SAEDashboard takes a unit's output direction from W_dec[n]" in str(w.message)]
    assert bool(warned) == (name == "mxd")
    page = (tmp_path / "sd.html").read_text()
    assert "DASHBOARD_DATA" in page and all(f'"{u}"' in page for u in units)
    assert not list(tmp_path.glob(".*"))  # written atomically
    stats = data.feature_stats
    norms = module.W_dec.detach().norm(dim=-1)
    if name == "mxd":
        torch.testing.assert_close(norms, torch.ones_like(norms))
    for i, u in enumerate(units):
        _, _, vals = acts.unit_entries(u)
        assert stats.max[i] == pytest.approx(float(vals.max() * norms[u]), rel=1e-4)
        assert stats.frac_nonzero[i] == pytest.approx(float(acts.frequency()[u]), abs=1e-6)
    table = data.feature_data_dict[units[0]].logits_table_data
    naive = (module.W_dec[units[0]].detach() / norms[units[0]] @ model.W_U).topk(5)
    assert table.top_token_ids[:5] == naive.indices.tolist()
    assert table.top_logits[:5] == pytest.approx(naive.values.tolist(), rel=1e-4, abs=1e-5)
    mine = ours.logits.topk(5).indices.tolist()
    if name == "transcoder":  # a fixed direction: our mean over contexts ranks tokens the same
        assert mine == naive.indices.tolist()
    else:  # an expert: what it writes is not c_n
        assert mine != naive.indices.tolist()


def test_cli_dashboard_writes_our_pages_and_saedashboards(default_model, modules, tmp_path, capsys):
    """`mxd-lens dashboard DIR --units U,5 --saedashboard`: a page per unit (5 is dead: the
    page says so), SAEDashboard's page for the live one, and an index."""
    from mxd_lens.cli import main

    modules["mxd"].save(tmp_path / "mxd")
    with attach(default_model, {LAYER: modules["mxd"]}):
        from mxd_lens.sources import load_default_corpus, token_rows

        rows = token_rows(default_model.tokenizer, load_default_corpus("heldout"), 32, max_rows=4)
        unit = most_active_units(collect_activations(default_model, LAYER, rows, progress=False), 1)[0]
    argv = ["dashboard", str(tmp_path / "mxd"), "--units", f"{unit},5", "--rows", "4", "--context", "32",
            "--saedashboard", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "out"
    index = json.loads((out / "dashboard.json").read_text())
    assert index["layer"] == LAYER and index["tokens"] == 128 and index["units"]["5"]["density"] == 0.0
    assert index["units"][str(unit)]["density"] > 0
    assert "never fired" in (out / "unit_5.html").read_text()
    assert "not</b> W_dec[n]" in (out / f"unit_{unit}.html").read_text()
    assert f'"{unit}"' in (out / "saedashboard.html").read_text()
    assert main(["dashboard", str(tmp_path / "mxd"), "--units", "128", "--out", str(tmp_path / "o2")]) == 1
    assert "--units [128] out of range" in capsys.readouterr().err and not (tmp_path / "o2").exists()
