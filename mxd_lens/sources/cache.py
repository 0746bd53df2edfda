"""Where mxd_lens keeps downloaded and converted artefacts."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["mxd_lens_cache_dir"]

CACHE_ENV_VAR = "MXD_LENS_CACHE"


def mxd_lens_cache_dir() -> Path:
    """The cache folder: ``$MXD_LENS_CACHE`` if set, else ``~/.cache/mxd_lens``.

    The folder is created on first use.
    """
    configured = os.environ.get(CACHE_ENV_VAR, "").strip()
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "mxd_lens"
    path.mkdir(parents=True, exist_ok=True)
    return path
