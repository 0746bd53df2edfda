"""Atomic writes: everything goes into a temporary sibling that is renamed into place,
so a crash never leaves a half-written file or folder where a reader expects a whole one.

Temporary files and folders are created private (0600/0700); what is renamed into
place gets the usual permissions under the process umask, like a plain `open()`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path to `path` (replacing an old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """A UTF-8 text file, atomically."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def jsonable(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None (JSON has no NaN), recursively;
    dict keys become strings, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: str | Path, obj: Any, **dumps_kwargs: Any) -> Path:
    """An indented JSON file, atomically. NaN and inf are written as null: a strict JSON
    reader (and SAE-Lens's) would refuse them."""
    default = dumps_kwargs.pop("default", None)
    if default is not None:  # apply it first so that the NaN check sees the converted values
        obj = json.loads(json.dumps(obj, default=default))
    return write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False, **dumps_kwargs))


def write_html(fig: Any, path: str | Path) -> Path:
    """A standalone plotly HTML file (plotly.js embedded: opens with no network)."""
    return write_file(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs=True, full_html=True))


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy `src` to `dst`, atomically."""
    return write_file(dst, lambda tmp: shutil.copyfile(src, tmp))


def write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` then rename tmp_dir to `path` (replacing an old folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode(0o777))
        for child in tmp.rglob("*"):
            os.chmod(child, _umask_mode(0o777 if child.is_dir() else 0o666))
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
