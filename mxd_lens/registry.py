"""The one table of architectures: name -> module class, config class, SAE-Lens classes,
user-facing method name, display label and colour.

The table itself imports nothing heavy: classes are named as 'module:attribute' and
imported on first use, so the command line can check `--methods` and print labels
without importing torch. It is the only place that relates a method name (`transcoder`)
to its architecture (`topk_transcoder`), and the only place that makes and parses
module folder names (`<method>_k<K>`).

A new architecture is one file (its config, module and SAE-Lens view) plus one call:

    register(Architecture(name="my_arch", module="my_pkg.my_arch:MyModule", ...))

`mxd_lens.architectures.register_with_saelens()` (run on `import mxd_lens` and by
`register` for later entries) makes every registered architecture loadable by SAE-Lens.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any


def _resolve(ref: Any) -> Any:
    """A class given as itself or as 'package.module:Attribute'."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Architecture:
    """One architecture: everything the pipeline needs to know about it."""

    name: str
    """The cfg.json `architecture` (also its SAE-Lens registry name), e.g. 'topk_transcoder'."""
    module: Any
    """The mxd_lens module class (a `Replacement` subclass), or 'package.module:Class'."""
    sae: Any = None
    """Its SAE-Lens class (a `ReplacementSAE` subclass), or a 'module:Class' string; None:
    not loadable by SAE-Lens."""
    sae_config: Any = None
    """Its SAE-Lens config class, or a 'module:Class' string."""
    method: str | None = None
    """The user-facing method name in `--methods`, results.json and folder names (None:
    not a method the frontier trains)."""
    label: str = ""
    """Display name in tables and figures."""
    color: str = "#7f7f7f"
    """Line colour in figures."""

    @property
    def module_class(self) -> Any:
        """The module class (imported on first use)."""
        return _resolve(self.module)

    @property
    def config_class(self) -> Any:
        """The module's config class."""
        return self.module_class.config_class

    @property
    def sae_classes(self) -> tuple[Any, Any] | None:
        """(SAE-Lens class, SAE-Lens config class), or None."""
        if self.sae is None:
            return None
        return _resolve(self.sae), _resolve(self.sae_config)


_ARCH = "mxd_lens.architectures"
_TABLE: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="mxd", module=f"{_ARCH}.mxd:MxD", sae=f"{_ARCH}.mxd:MxDSAE", sae_config=f"{_ARCH}.mxd:MxDSAEConfig",
            method="mxd", label="MxD", color="#d62728",
        ),
        Architecture(
            name="topk_transcoder", module=f"{_ARCH}.transcoder:TopKTranscoder",
            sae=f"{_ARCH}.transcoder:TopKTranscoderSAE", sae_config=f"{_ARCH}.transcoder:TopKTranscoderSAEConfig",
            method="transcoder", label="TopK transcoder", color="#1f77b4",
        ),
        Architecture(
            name="topk_skip_transcoder", module=f"{_ARCH}.transcoder:SkipTranscoder",
            sae=f"{_ARCH}.transcoder:TopKSkipTranscoderSAE",
            sae_config=f"{_ARCH}.transcoder:TopKSkipTranscoderSAEConfig",
            method="skip_transcoder", label="skip transcoder", color="#2ca02c",
        ),
        Architecture(
            name="mlp_out_topk_sae", module=f"{_ARCH}.output_sae:OutputSiteSAE",
            sae=f"{_ARCH}.output_sae:OutputSiteSAEView", sae_config=f"{_ARCH}.output_sae:OutputSiteSAEConfig",
            label="TopK SAE (MLP output)", color="#9467bd",
        ),
    )
}


def register(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Add an architecture to the table (and to SAE-Lens's registry when it has SAE-Lens
    classes and SAE-Lens is imported). Refuses a name or method already taken unless
    `replace`."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", arch.name):
        raise ValueError(f"architecture name {arch.name!r} must be lower_snake_case")
    if arch.method is not None and not re.fullmatch(r"[a-z][a-z0-9_]*", arch.method):
        raise ValueError(f"method name {arch.method!r} must be lower_snake_case")
    if not replace:
        if arch.name in _TABLE:
            raise ValueError(f"architecture {arch.name!r} is already registered")
        methods_taken = {a.method for a in _TABLE.values() if a.method}
        if arch.name in methods_taken:
            raise ValueError(f"architecture name {arch.name!r} is already taken as a method name")
        if arch.method is not None and arch.method in methods_taken | set(_TABLE):
            raise ValueError(f"method name {arch.method!r} is already taken")
    _check_classes(arch)
    previous = _TABLE.get(arch.name)
    _TABLE[arch.name] = arch
    if _architectures_imported() and arch.sae is not None:
        from mxd_lens.architectures import register_with_saelens

        try:
            register_with_saelens([arch])
        except BaseException:  # e.g. another package owns the name in SAE-Lens: leave no half entry
            if previous is None:
                del _TABLE[arch.name]
            else:
                _TABLE[arch.name] = previous
            raise
    return arch


def _check_classes(arch: Architecture) -> None:
    """The entry's classes agree with it and with each other (checked where they are
    given as classes: 'module:Class' strings are not imported here)."""
    if (arch.sae is None) != (arch.sae_config is None):
        raise ValueError(
            f"architecture {arch.name!r}: sae and sae_config go together (the SAE-Lens class and its "
            "config class); give both or neither"
        )
    module = None if isinstance(arch.module, str) else arch.module
    if module is not None:
        own = getattr(module, "architecture", None)
        if own != arch.name:
            raise ValueError(
                f"Architecture(name={arch.name!r}) but {module.__name__}.architecture={own!r}: they must be "
                "equal (cfg.json records the module's architecture name)"
            )
    sae_config = None if isinstance(arch.sae_config, str) else arch.sae_config
    if module is not None and sae_config is not None:
        described = getattr(sae_config, "module_class", None)
        if described is not module:
            raise ValueError(
                f"architecture {arch.name!r}: {sae_config.__name__}.module_class is "
                f"{getattr(described, '__name__', described)!r}, not {module.__name__!r}; the SAE-Lens config "
                "class must describe this module"
            )


def unregister(name: str) -> None:
    """Remove an architecture added with `register` (tests use it to clean up), from this
    table and from SAE-Lens's registry. Unknown names are ignored."""
    if _TABLE.pop(name, None) is not None and _architectures_imported():
        from mxd_lens.architectures import unregister_from_saelens

        unregister_from_saelens(name)


def _architectures_imported() -> bool:
    """Whether `mxd_lens.architectures` (and so SAE-Lens) is imported: only then is there an
    SAE-Lens registry to keep in step (importing it would import torch)."""
    import sys

    return getattr(sys.modules.get("mxd_lens.architectures"), "_READY", False)


def architectures() -> list[Architecture]:
    """Every registered architecture."""
    return list(_TABLE.values())


def methods() -> list[str]:
    """The method names the frontier can train, in table order."""
    return [a.method for a in _TABLE.values() if a.method]


def get(name_or_method: str) -> Architecture:
    """The architecture of an architecture name or a method name (either is accepted)."""
    if name_or_method in _TABLE:
        return _TABLE[name_or_method]
    for a in _TABLE.values():
        if a.method == name_or_method:
            return a
    known = sorted(set(_TABLE) | set(methods()))
    raise ValueError(f"unknown architecture or method {name_or_method!r}; expected one of {known}")


def find(name: str) -> Architecture | None:
    """`get`, or None for an unknown name."""
    try:
        return get(name)
    except ValueError:
        return None


def of_module(module: Any) -> Architecture:
    """The table entry of a module instance (by its `architecture` name)."""
    return get(type(module).architecture)


def method_of(name_or_method: str) -> str:
    """The user-facing name: the method name where there is one, else the architecture name."""
    arch = get(name_or_method)
    return arch.method or arch.name


def canonical_methods(names: list[str]) -> list[str]:
    """Method names (aliases such as 'topk_transcoder' accepted) as method names, with a
    clear error for unknown or untrainable ones."""
    out = []
    for name in names:
        arch = find(name)
        if arch is None or arch.method is None:
            raise ValueError(f"unknown method {name!r}; expected some of {','.join(methods())}")
        out.append(arch.method)
    return out


def label(name_or_method: str) -> str:
    """Display name (the name itself for unknown names)."""
    arch = find(name_or_method)
    return (arch.label or arch.name) if arch else name_or_method


def color(name_or_method: str) -> str | None:
    """Figure colour (None for unknown names)."""
    arch = find(name_or_method)
    return arch.color if arch else None


_FOLDER = re.compile(r"^(?P<method>[a-z][a-z0-9_]*)_k(?P<k>[1-9][0-9]*)$")


def module_folder_name(method: str, k: int) -> str:
    """The folder name of a trained module: '<method>_k<K>' (method names, not aliases)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    return f"{method_of(method)}_k{k}"


def parse_module_folder_name(name: str) -> tuple[str, int]:
    """(method, K) of a folder name made by `module_folder_name` (architecture names are
    accepted for the method and returned as method names)."""
    match = _FOLDER.match(name)
    if not match or find(match["method"]) is None:
        raise ValueError(f"{name!r} is not a module folder name '<method>_k<K>' with a known method")
    return method_of(match["method"]), int(match["k"])


__all__ = [
    "Architecture",
    "architectures",
    "canonical_methods",
    "color",
    "find",
    "get",
    "label",
    "method_of",
    "methods",
    "module_folder_name",
    "of_module",
    "parse_module_folder_name",
    "register",
    "unregister",
]
