"""Register our architectures with SAE-Lens as soon as SAE-Lens is imported.

`import mxd_lens` must leave SAE-Lens able to load our folders, but importing SAE-Lens
(and torch) takes seconds that `mxd-lens --help` must not pay. So: if SAE-Lens is
already imported, register now; otherwise a meta-path finder waits for `import sae_lens`
and registers right after SAE-Lens's own `__init__` has run. The registration imports
`mxd_lens.architectures`, whose last line registers too; when that module is still being
imported (it imports SAE-Lens itself), the finder leaves the work to it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any


def _register() -> None:
    arch = sys.modules.get("mxd_lens.architectures")
    if arch is None:
        import mxd_lens.architectures  # noqa: F401  (registers on import)
    elif getattr(arch, "_READY", False):
        arch.register_with_saelens()
    # else: mxd_lens.architectures is mid-import and registers when it finishes


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:
        # get_resource_reader & co.: without them importlib.resources.files("sae_lens")
        # finds no files (SAE.from_pretrained reads its pretrained_saes.yaml that way)
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `sae_lens` through the other finders and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "sae_lens":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                sys.meta_path.remove(self)  # once is enough
                return spec
        return None


def install() -> None:
    """Register now if SAE-Lens is imported, else when it is."""
    if "sae_lens" in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
