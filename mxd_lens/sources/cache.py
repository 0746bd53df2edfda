"""Where mxd_lens keeps downloaded and converted artefacts, and when it may ask the hub."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["mxd_lens_cache_dir", "hub_offline", "hub_reachable"]

CACHE_ENV_VAR = "MXD_LENS_CACHE"


def mxd_lens_cache_dir() -> Path:
    """The cache folder: ``$MXD_LENS_CACHE`` if set, else ``~/.cache/mxd_lens``.

    The folder is created on first use.
    """
    configured = os.environ.get(CACHE_ENV_VAR, "").strip()
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "mxd_lens"
    path.mkdir(parents=True, exist_ok=True)
    return path


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no Hugging Face hub access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub, instead of the hub client's ~20 s of retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
