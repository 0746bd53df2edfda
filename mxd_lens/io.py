"""Saving and loading replacement modules: SAE-Lens's folder layout, safetensors + JSON.

A module folder holds `cfg.json` (with `architecture` and our `mxd_lens_format`) and
`sae_weights.safetensors`. Folders are written into a temporary sibling and renamed
into place, so a crash never leaves a half-written module. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from mxd_lens.config import MxDConfig, ReplacementConfig, TranscoderConfig
from mxd_lens.mxd import MxD
from mxd_lens.replacement import Replacement
from mxd_lens.transcoder import SkipTranscoder, TopKTranscoder

FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

ARCHITECTURES: dict[str, tuple[type[Replacement], type[ReplacementConfig]]] = {
    MxD.architecture: (MxD, MxDConfig),
    TopKTranscoder.architecture: (TopKTranscoder, TranscoderConfig),
    SkipTranscoder.architecture: (SkipTranscoder, TranscoderConfig),
}


def atomic_write_dir(path: str | Path, write: Any) -> Path:
    """Call `write(tmp_dir)` then rename tmp_dir to `path` (replacing an old folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save(module: Replacement, path: str | Path) -> Path:
    """Write `module` to the folder `path` (created or replaced atomically)."""

    def write(tmp: Path) -> None:
        cfg = {"architecture": module.architecture, "mxd_lens_format": FORMAT_VERSION, **module.cfg.to_dict()}
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))

    return atomic_write_dir(path, write)


def load(path: str | Path, device: str | None = None) -> Replacement:
    """Read a module folder written by `save` back as an mxd_lens module."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no module folder at {path}")
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing")
    raw = json.loads(cfg_path.read_text())
    arch = raw.pop("architecture", None)
    raw.pop("mxd_lens_format", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    module_cls, cfg_cls = ARCHITECTURES[arch]
    if device is not None:
        raw["device"] = device
    module = module_cls(cfg_cls.from_dict(raw))
    state = load_file(str(path / WEIGHTS_FILE), device=str(module.device))
    module.load_state_dict(state)
    return module
