"""The package's exported names stay what they are whatever was imported first."""

from __future__ import annotations

import importlib


def test_attach_stays_the_function_after_its_module_is_imported() -> None:
    # `mxd_lens.attach` names the function and its submodule. Python's import system binds a
    # freshly loaded submodule on its package with setattr (as when mxd_lens.evals imports
    # mxd_lens.attach before anyone touched mxd_lens.attach); the function must survive it.
    import mxd_lens

    submodule = importlib.import_module("mxd_lens.attach")
    setattr(mxd_lens, "attach", submodule)  # noqa: B010  (exactly what the import system does)
    from mxd_lens import attach

    assert callable(attach) and attach is submodule.attach and mxd_lens.attach is submodule.attach
    assert importlib.import_module("mxd_lens.attach") is submodule  # the module itself stays importable
