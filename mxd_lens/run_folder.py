"""The one protocol by which a command writes into its `--out` folder.

A failed command must never delete or overwrite a finished run's files, and `--out` may
hold files that are none of our business (a log the user is writing there, say). So:

* `RunFolder.check()` (no side effects) refuses `--out` when it is not a folder, or when
  it holds a finished run (`guard`, i.e. results.json) and `overwrite` was not given.
* Entering the context creates `--out` if needed (remembering that it did) and a hidden
  staging folder inside it; the command writes everything into `staging`.
* `commit()` moves the staged entries into `--out`, each replacing its namesake in one
  rename, the `marker` file (results.json) last: its presence marks a finished run. Only
  then is an old finished run's `guard` replaced or (for commands that invalidate it)
  removed, together with the `stale` entries the caller names (the old run's modules).
* Leaving the context without a commit (any exception) removes the staging folder, any
  `keep_on_failure` entry this run created that stayed empty, and `--out` itself (and the
  parents it made) when this run created it and nothing else was put there. Files that
  were in `--out` before are never touched.

`keep_on_failure` names entries written into `--out` directly rather than staged:
training checkpoints, which exist precisely so that a failed or interrupted run can be
resumed, survive a failure once they hold something.

Torch-free, so that the command line can use it before anything heavy is imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

STAGING_PREFIX = ".mxd-lens-partial-"
"""Name prefix of the staging folder inside `--out` (followed by the writer's pid)."""


class RunFolder:
    """A command's `--out` folder, written all at once or not at all (see the module doc).

        folder = RunFolder(out, overwrite=args.overwrite)
        folder.check()                 # before any expensive work
        with folder:
            write_things(folder.staging)
            folder.commit()
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        guard: str | None = "results.json",
        marker: str | None = "results.json",
        keep_on_failure: Iterable[str] = (),
        label: str = "--out",
    ) -> None:
        """
        Args:
            out: the output folder.
            overwrite: allow replacing a finished run (`guard` present in `out`).
            guard: the file whose presence marks a finished run this command would replace
                or invalidate (None: the command leaves finished runs valid, e.g. `eval`).
            marker: the staged file moved in last (None: no particular order).
            keep_on_failure: entries written straight into `out` (not staged) that a
                failed run keeps when they hold something (checkpoints).
            label: how errors name the folder (the flag it came from).
        """
        self.out = Path(out)
        self.overwrite = bool(overwrite)
        self.guard = guard
        self.marker = marker
        self.keep_on_failure = tuple(keep_on_failure)
        self.label = label
        self._staging: Path | None = None
        self._created: list[Path] = []  # folders this run made, outermost first
        self._kept_before: set[str] = set()
        self._committed = False

    # --- before any work -------------------------------------------------------------------
    def check(self) -> None:
        """Refuse an `out` that cannot hold this run, touching nothing."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"{self.label} {str(out)!r} exists and is not a folder")
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"{self.label} {str(out)!r} is not writable ({parent} is a file, not a folder)")
                break
        if self.guard and (out / self.guard).exists() and not self.overwrite:
            raise ValueError(
                f"{self.label} {str(out)!r} already holds {self.guard}; pass --overwrite or choose another folder"
            )

    @property
    def staging(self) -> Path:
        """The folder the run writes into (inside `out`, hidden)."""
        if self._staging is None:
            raise RuntimeError("RunFolder.staging is only available inside `with folder:`")
        return self._staging

    def __enter__(self) -> "RunFolder":
        self.check()
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            for folder in reversed(missing):  # outermost first
                folder.mkdir()
                self._created.append(folder)
            self._kept_before = {n for n in self.keep_on_failure if (self.out / n).exists()}
            _remove_orphaned_staging(self.out)
            self._staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out))
        except OSError as err:
            self._clean_up()
            raise ValueError(f"{self.label} {str(self.out)!r} is not writable ({err.strerror or err})") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self._clean_up()

    # --- at the end ------------------------------------------------------------------------
    def commit(self, stale: Iterable[str] = ()) -> None:
        """Move every staged entry into `out` (the marker last); then remove the `stale`
        entries of the run this one replaces that it did not rewrite. An old `guard` that
        this run did not stage is removed first when overwriting (it no longer describes
        the folder)."""
        staging = self.staging
        trash = staging / ".replaced"
        trash.mkdir()
        names = sorted(p.name for p in staging.iterdir() if p != trash)
        if self.marker in names:
            names.remove(self.marker)
            names.append(self.marker)
        if self.overwrite and self.guard and self.guard not in names and (self.out / self.guard).exists():
            os.replace(self.out / self.guard, trash / self.guard)
        for name in names:
            _replace(staging / name, self.out / name, trash)
        for name in stale:
            target = self.out / name
            if name not in names and name and "/" not in name and (target.exists() or target.is_symlink()):
                os.replace(target, trash / f"stale-{name}")
        self._committed = True
        shutil.rmtree(staging, ignore_errors=True)
        self._staging = None

    def _clean_up(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        for name in self.keep_on_failure:
            if name not in self._kept_before:
                _remove_empty_tree(self.out / name)
        for folder in reversed(self._created):  # innermost first; only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _replace(src: Path, dst: Path, trash: Path) -> None:
    """Put `src` at `dst` in one rename; an old `dst` goes to `trash` (removed with it)."""
    if dst.is_dir() and not dst.is_symlink():
        os.replace(dst, trash / dst.name)
    elif (dst.exists() or dst.is_symlink()) and src.is_dir():
        os.replace(dst, trash / dst.name)
    os.replace(src, dst)  # a file over a file: atomic


def _remove_empty_tree(path: Path) -> None:
    """Remove `path` if it is a folder tree holding no files."""
    if not path.is_dir() or path.is_symlink():
        return
    for child in path.iterdir():
        _remove_empty_tree(child)
    try:
        path.rmdir()
    except OSError:
        pass  # something is in it: keep it


def _remove_orphaned_staging(out: Path) -> None:
    """Staging folders left in `out` by killed writers (their pid is gone)."""
    for path in out.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int(path.name[len(STAGING_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive (or not ours to signal): leave it


__all__ = ["STAGING_PREFIX", "RunFolder"]
