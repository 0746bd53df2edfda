"""Training checkpoints: safetensors + JSON, written into a temporary folder renamed into place.

Layout of `checkpoint_dir`:

    step_00000400/            one complete checkpoint
        trainer.json          step, data position, config, history, optimiser hyper-parameters
        rng.safetensors       torch RNG states
        <name>/               each module, as `Replacement.save` writes it
        <name>.train.safetensors   AdamW moments and steps, dead-unit counters, target sums
    LATEST                    the name of the newest complete checkpoint

A checkpoint folder only appears under its final name once every file is written, and
LATEST is replaced atomically after that, so an interrupted write never leaves a
readable-looking but broken latest checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mxd_lens.atomic import write_dir as atomic_write_dir
from mxd_lens.atomic import write_json, write_text
from mxd_lens.storage import load
from mxd_lens.architectures.base import Replacement

FORMAT = 1
LATEST = "LATEST"
TRAINER_FILE = "trainer.json"
RNG_FILE = "rng.safetensors"


@dataclass
class ModuleCheckpoint:
    """What a checkpoint holds for one module besides its weights."""

    optimizer: dict[str, Any]
    """An optimiser `state_dict()` (tensors and hyper-parameters)."""
    tensors: dict[str, Tensor]
    """Trainer-side state: dead-unit counters, target sums..."""


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    """The checkpoint folder."""
    state: dict[str, Any]
    """The JSON trainer state (step, position, config, history...)."""
    modules: dict[str, Replacement]
    """The saved modules, loaded."""
    extra: dict[str, ModuleCheckpoint]
    """Per module: optimiser state and trainer tensors."""
    rng: dict[str, Tensor]
    """RNG states."""


def _optimizer_to_files(opt_state: dict[str, Any]) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    tensors = {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_state["param_groups"]]
    return tensors, groups


def _optimizer_from_files(tensors: Mapping[str, Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Tensor]:
    """torch's CPU (and CUDA, if present) RNG states as tensors."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    return states


def set_rng_state(states: Mapping[str, Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    directory: str | Path,
    step: int,
    state: dict[str, Any],
    modules: Mapping[str, Replacement],
    extra: Mapping[str, ModuleCheckpoint],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step_<step>` atomically, point LATEST at it, prune old ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"

    def write(tmp: Path) -> None:
        groups = {}
        for mod_name, module in modules.items():
            module.save(tmp / mod_name)
            tensors, groups[mod_name] = _optimizer_to_files(extra[mod_name].optimizer)
            tensors.update({f"train.{k}": v.detach().contiguous().cpu() for k, v in extra[mod_name].tensors.items()})
            save_file(tensors, str(tmp / f"{mod_name}.train.safetensors"))
        save_file({k: v.contiguous() for k, v in rng_state().items()}, str(tmp / RNG_FILE))
        payload = {"format": FORMAT, "step": step, **state, "optimizer_groups": groups}
        # trainer.json last: a folder without it is never taken for a checkpoint. NaN
        # (e.g. a loss not yet logged) is written as null; `nan_from_null` reads it back.
        write_json(tmp / TRAINER_FILE, payload)

    path = atomic_write_dir(directory / name, write)
    write_text(directory / LATEST, name + "\n")
    done = sorted(p for p in directory.glob("step_*") if (p / TRAINER_FILE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def nan_from_null(record: Mapping[str, Any]) -> dict[str, Any]:
    """A logged record read back from trainer.json, null numbers as NaN again."""
    return {k: float("nan") if v is None else v for k, v in record.items()}


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The folder LATEST names, or None if there is no checkpoint yet."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / TRAINER_FILE).is_file():
        raise RuntimeError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint` (no unpickling)."""
    path = Path(path)
    state = json.loads((path / TRAINER_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    modules, extra = {}, {}
    for name, groups in state["optimizer_groups"].items():
        modules[name] = load(path / name)
        tensors = load_file(str(path / f"{name}.train.safetensors"))
        extra[name] = ModuleCheckpoint(
            optimizer=_optimizer_from_files(tensors, groups),
            tensors={k.removeprefix("train."): v for k, v in tensors.items() if k.startswith("train.")},
        )
    return Checkpoint(path, state, modules, extra, load_file(str(path / RNG_FILE)))


__all__ = ["Checkpoint", "ModuleCheckpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "nan_from_null"]
