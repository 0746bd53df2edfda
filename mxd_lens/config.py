"""Configuration dataclasses of the replacement layers.

Every field has a docstring; every config round-trips through JSON (`to_dict` /
`from_dict`) and is saved beside the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mxd_lens.functional import ACT_FNS

InputSite = Literal["mlp_in", "mlp_out"]
INPUT_SITES: tuple[str, ...] = ("mlp_in", "mlp_out")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / torch.float64 ... -> torch.dtype, with a clear error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return resolved


class JsonConfig:
    """`to_dict` / `from_dict` for config dataclasses: every config round-trips through JSON."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from `to_dict` output; unknown keys are an error, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)


@dataclass(kw_only=True)
class ReplacementConfig(JsonConfig):
    """Fields shared by every module that stands in for an MLP."""


    d_in: int
    """Width of the input (the MLP's input: the model's d_model)."""
    d_out: int
    """Width of the output (the MLP's output: the model's d_model)."""
    k: int
    """Number of units (experts or latents) kept active per token by TopK."""
    hook_name: str | None = None
    """TransformerLens hook whose activation is this module's input when trained,
    e.g. 'blocks.12.ln2.hook_normalized'. Recorded for provenance and SAE-Lens."""
    hook_name_out: str | None = None
    """TransformerLens hook whose activation this module reconstructs,
    e.g. 'blocks.12.hook_mlp_out'."""
    layer: int | None = None
    """Transformer block whose MLP this module replaces, when known."""
    model_name: str | None = None
    """Name of the language model the module was trained on."""
    input_site: InputSite = "mlp_in"
    """What the module reads when attached: the MLP's input ('mlp_in': MxDs and
    transcoders) or the MLP's output ('mlp_out': an SAE on the MLP output, which
    `attach` runs after the original MLP)."""
    dtype: str = "float32"
    """Parameter dtype at construction; the module computes in its parameters' dtype."""
    device: str = "cpu"
    """Device of the parameters at construction."""

    def __post_init__(self) -> None:
        _positive("d_in", self.d_in)
        _positive("d_out", self.d_out)
        _positive("k", self.k)
        if self.input_site not in INPUT_SITES:
            raise ValueError(f"input_site={self.input_site!r}; expected one of {INPUT_SITES}")
        parse_dtype(self.dtype)
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")

    @property
    def n_units(self) -> int:
        """Number of sparse units (experts or latents)."""
        raise NotImplementedError



@dataclass(kw_only=True)
class MxDConfig(ReplacementConfig):
    """A Mixture of Decoders: y = (C^T a) * (D^T z) + b with a = TopK_k(ReLU(G^T x + b_G))."""


    d_hidden: int
    """H: width of the dense hidden layer z (the original MLP's d_mlp in the paper)."""
    n_experts: int
    """N: number of experts (rows of C and columns of the gate G)."""
    act_fn: str = "gelu"
    """phi, the activation of the hidden units: 'gelu', 'gelu_new', 'relu' or 'silu'."""
    glu: bool = False
    """Gated hidden layer z = phi(E^T x + b_E) * (E_glu^T x), for gated-MLP models
    (Llama, SmolLM2, Gemma)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("d_hidden", self.d_hidden)
        _positive("n_experts", self.n_experts)
        if self.k > self.n_experts:
            raise ValueError(f"k={self.k} is larger than n_experts={self.n_experts}")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; expected one of {sorted(ACT_FNS)}")

    @property
    def n_units(self) -> int:
        return self.n_experts


@dataclass(kw_only=True)
class TranscoderConfig(ReplacementConfig):
    """A TopK transcoder: y = W_dec^T TopK_k(ReLU(W_enc^T x + b_enc)) + b_dec
    (plus W_skip x for a skip transcoder)."""


    d_sae: int
    """Number of latents (the transcoder's width)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("d_sae", self.d_sae)
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}")

    @property
    def n_units(self) -> int:
        return self.d_sae


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring, read from the class source (for CLI help and docs)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs

__all__ = [
    "JsonConfig",
    "ReplacementConfig",
    "MxDConfig",
    "TranscoderConfig",
    "parse_dtype",
    "field_docs",
    "INPUT_SITES",
]
