"""Config plumbing shared by every config dataclass: JSON round trips, dtype names and
field docstrings (which the command line turns into flag help). Imports no torch, so the
command line can build its parser from the config dataclasses in well under a second.

The architectures' configs live beside their modules (`mxd_lens.architectures`);
`MxDConfig`, `TranscoderConfig` and `ReplacementConfig` stay importable from here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

FLOAT_DTYPES: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16")
"""The floating-point dtypes modules, models and activations may have."""


def dtype_name(dtype: Any) -> str:
    """'float32' / 'torch.bfloat16' / torch.float64 ... -> 'float32', 'bfloat16', 'float64'
    (a ValueError for anything else)."""
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; expected one of {list(FLOAT_DTYPES)}")
    return name


def parse_dtype(dtype: Any):
    """'float32' / 'bfloat16' / torch.float64 ... -> torch.dtype, with a clear error."""
    import torch

    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return getattr(torch, dtype_name(dtype))


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


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring, read from the class source (for CLI help and docs)."""
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


_MOVED = {
    "ReplacementConfig": "mxd_lens.architectures.base",
    "INPUT_SITES": "mxd_lens.architectures.base",
    "MxDConfig": "mxd_lens.architectures.mxd",
    "TranscoderConfig": "mxd_lens.architectures.transcoder",
}


def __getattr__(name: str) -> Any:
    # The architecture configs moved beside their modules; still importable from here.
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'mxd_lens.config' has no attribute {name!r}")


__all__ = ["FLOAT_DTYPES", "JsonConfig", "dtype_name", "field_docs", "parse_dtype", *_MOVED]
