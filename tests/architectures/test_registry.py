"""`mxd_lens.registry` is the only vocabulary: architecture and method names, their aliases,
module folder names, labels and colours all come from its one table."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mxd_lens
from mxd_lens import registry

PACKAGE = Path(mxd_lens.__file__).parent
BUILT_IN = {  # architecture name -> method name (None: not a frontier method)
    "mxd": "mxd",
    "topk_transcoder": "transcoder",
    "topk_skip_transcoder": "skip_transcoder",
    "mlp_out_topk_sae": None,
}


def test_the_built_in_table() -> None:
    table = {a.name: a for a in registry.architectures()}
    assert set(BUILT_IN) <= set(table)
    for name, method in BUILT_IN.items():
        assert table[name].method == method
        assert registry.get(name) is table[name]
        if method is not None:
            assert registry.get(method) is table[name]  # the method name is an alias
            assert registry.method_of(name) == registry.method_of(method) == method
    assert [m for m in registry.methods() if m in BUILT_IN.values()] == ["mxd", "transcoder", "skip_transcoder"]
    assert registry.canonical_methods(["topk_transcoder", "mxd", "topk_skip_transcoder"]) == [
        "transcoder",
        "mxd",
        "skip_transcoder",
    ]
    with pytest.raises(ValueError, match="unknown method 'mlp_out_topk_sae'; expected some of mxd,transcoder"):
        registry.canonical_methods(["mlp_out_topk_sae"])  # known, but not trained by the frontier
    with pytest.raises(ValueError, match=r"unknown architecture or method 'moe'; expected one of \[.*'mxd'"):
        registry.get("moe")
    assert registry.find("moe") is None


def test_module_folder_names() -> None:
    assert registry.module_folder_name("topk_transcoder", 32) == "transcoder_k32"
    assert registry.module_folder_name("transcoder", 32) == "transcoder_k32"
    assert registry.module_folder_name("topk_skip_transcoder", 8) == "skip_transcoder_k8"
    assert registry.module_folder_name("mxd", 1) == "mxd_k1"
    assert registry.module_folder_name("mlp_out_topk_sae", 4) == "mlp_out_topk_sae_k4"  # no method: its name
    for k in (0, -3, True, 2.0, "8"):
        with pytest.raises(ValueError, match=f"k={k!r} must be a positive integer"):
            registry.module_folder_name("mxd", k)
    with pytest.raises(ValueError, match="unknown architecture or method 'moe'"):
        registry.module_folder_name("moe", 8)


def test_parse_module_folder_name_accepts_aliases() -> None:
    assert registry.parse_module_folder_name("transcoder_k32") == ("transcoder", 32)
    assert registry.parse_module_folder_name("topk_transcoder_k32") == ("transcoder", 32)
    assert registry.parse_module_folder_name("topk_skip_transcoder_k4") == ("skip_transcoder", 4)
    assert registry.parse_module_folder_name("skip_transcoder_k4") == ("skip_transcoder", 4)
    assert registry.parse_module_folder_name("mxd_k128") == ("mxd", 128)
    assert registry.parse_module_folder_name("mlp_out_topk_sae_k16") == ("mlp_out_topk_sae", 16)
    for name in (*BUILT_IN, *registry.methods()):
        for k in (1, 7, 32, 1024):
            assert registry.parse_module_folder_name(registry.module_folder_name(name, k)) == (
                registry.method_of(name),
                k,
            )


@pytest.mark.parametrize(
    "name",
    ["mxd", "mxd_k", "mxd_k0", "mxd_k07", "mxd_k-1", "mxd_k8_extra", "moe_k8", "MXD_k8", "mxd_k8/", "", "_k8", "k8",
     "transcoder_K8", "mxd_k 8", "topk_k8"],
)
def test_parse_module_folder_name_rejects_garbage(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{name!r} is not a module folder name '<method>_k<K>' with a known method")):
        registry.parse_module_folder_name(name)


def test_labels_and_colours_come_from_the_table() -> None:
    for arch in registry.architectures():
        assert registry.label(arch.name) == (arch.label or arch.name)
        assert registry.color(arch.name) == arch.color
        if arch.method:
            assert registry.label(arch.method) == registry.label(arch.name)
            assert registry.color(arch.method) == arch.color
    assert (registry.label("mxd"), registry.color("mxd")) == ("MxD", "#d62728")
    assert registry.label("topk_transcoder") == registry.label("transcoder") == "TopK transcoder"
    assert registry.label("not_a_method") == "not_a_method" and registry.color("not_a_method") is None
    labels = [a.label for a in registry.architectures()]
    assert len(set(labels)) == len(labels)  # figures can tell every architecture apart


def test_a_registered_method_gets_its_label_and_colour_in_figures() -> None:
    pytest.importorskip("plotly")
    from mxd_lens.architectures.transcoder import TopKTranscoder
    from mxd_lens.experiments.plots import frontier_figure

    class VocabTranscoder(TopKTranscoder):
        architecture = "test_vocab_arch"

    class Other(TopKTranscoder):
        architecture = "other_arch"

    entry = registry.Architecture(
        name="test_vocab_arch", module=VocabTranscoder, method="test_vocab", label="Vocabulary test", color="#abcdef"
    )
    registry.register(entry)
    try:
        assert registry.module_folder_name("test_vocab_arch", 3) == "test_vocab_k3"
        assert registry.parse_module_folder_name("test_vocab_arch_k3") == ("test_vocab", 3)
        assert "test_vocab" in registry.methods()
        with pytest.raises(ValueError, match="'test_vocab_arch' is already registered"):
            registry.register(entry)
        with pytest.raises(ValueError, match="method name 'transcoder' is already taken"):
            registry.register(registry.Architecture(name="other_arch", module=Other, method="transcoder"))
        with pytest.raises(ValueError, match="method name 'topk_transcoder' is already taken"):
            registry.register(registry.Architecture(name="other_arch", module=Other, method="topk_transcoder"))
        with pytest.raises(ValueError, match="architecture name 'Bad-Name' must be lower_snake_case"):
            registry.register(registry.Architecture(name="Bad-Name", module=TopKTranscoder))
        with pytest.raises(ValueError, match="architecture name 'skip_transcoder' is already taken as a method name"):
            registry.register(registry.Architecture(name="skip_transcoder", module=TopKTranscoder))
        # The classes must agree with the entry: cfg.json records the module's own name.
        with pytest.raises(ValueError, match=r"name='other_arch'\) but TopKTranscoder.architecture='topk_transcoder'"):
            registry.register(registry.Architecture(name="other_arch", module=TopKTranscoder))
        from mxd_lens.architectures.mxd import MxDSAE, MxDSAEConfig

        with pytest.raises(ValueError, match="MxDSAEConfig.module_class is 'MxD', not 'TopKTranscoder'"):
            registry.register(
                registry.Architecture(name="topk_transcoder", module=TopKTranscoder, sae=MxDSAE, sae_config=MxDSAEConfig),
                replace=True,
            )
        with pytest.raises(ValueError, match="sae and sae_config go together"):
            registry.register(registry.Architecture(name="topk_transcoder", module=TopKTranscoder, sae=MxDSAE), replace=True)
        assert registry.get("topk_transcoder").sae_classes[0].__name__ == "TopKTranscoderSAE"  # refusals change nothing
        rows = [
            {"method": m, "k": k, "delta_ce": 0.1 / k, "delta_ce_stderr": 0.01, "nmse": 0.5 / k}
            for m in ("test_vocab", "mxd")
            for k in (4, 8)
        ]
        fig = frontier_figure({"model": "m", "layer": 1, "train_tokens": 10, "eval_tokens": 10, "rows": rows})
        legend = {t.name: t.line.color for t in fig.data if t.showlegend is not False}
        assert legend == {"Vocabulary test": "#abcdef", "MxD": "#d62728"}
        assert registry.find("other_arch") is None  # every refusal left the table as it was
    finally:
        registry.unregister("test_vocab_arch")
    assert registry.find("test_vocab") is None and "test_vocab" not in registry.methods()
    with pytest.raises(ValueError, match="'test_vocab_k3' is not a module folder name"):
        registry.parse_module_folder_name("test_vocab_k3")


def _string_constants(path: Path) -> set[str]:
    """Every string literal of a source file except docstrings (f-string pieces included)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.add(node.value)
    return out


def test_no_other_module_keeps_its_own_labels_colours_or_folder_names() -> None:
    """Labels and colours are written only in the table; no module outside it formats or
    parses '<method>_k<K>' folder names itself."""
    words = {a.label for a in registry.architectures() if a.label} | {a.color for a in registry.architectures()}
    words -= set(mxd_lens.__all__)  # the label 'MxD' is also the class name in export lists
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "registry.py" and path.parent == PACKAGE:
            continue
        source = path.read_text()
        found = words & _string_constants(path)
        if found:
            offenders.append(f"{path.relative_to(PACKAGE)}: {sorted(found)}")
        if re.search(r"\}_k\{|_k\(\?P<|_k\(\\d|_k\[0-9\]|\"_k\"|'_k'", source):
            offenders.append(f"{path.relative_to(PACKAGE)}: builds or parses '<method>_k<K>' itself")
    assert not offenders, offenders


def test_the_table_is_torch_free() -> None:
    code = "import sys, mxd_lens.registry as r; r.methods(); r.label('mxd'); r.module_folder_name('mxd', 8); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
