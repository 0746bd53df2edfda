"""What both exporters share: finding the module folders, and which modules other tools
can represent at all."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mxd_lens.architectures.base import Replacement
from mxd_lens.architectures.transcoder import SkipTranscoder, TopKTranscoder


def module_folders(paths: Sequence[str | Path], module: str | None = None) -> list[Path]:
    """The module folders among `paths`: a folder holding cfg.json is one; any other folder
    is a run (`mxd-lens train` writes `RUN/<method>_k<K>` or `RUN/layer_<L>/<method>_k<K>`)
    whose module folders are found one or two levels down. `module` keeps only the
    folders of that name (e.g. 'skip_transcoder_k32'); a run holding several names needs it."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder (expected a module folder or a run folder)")
        if (path / "cfg.json").is_file():
            found.append(path)
            continue
        inside = sorted({p.parent for pattern in ("*/cfg.json", "*/*/cfg.json") for p in path.glob(pattern)})
        if module is not None:
            inside = [p for p in inside if p.name == module]
        names = sorted({p.name for p in inside})
        if not inside:
            what = f" named {module!r}" if module is not None else ""
            raise FileNotFoundError(f"{path} holds no module folders{what} (folders with a cfg.json)")
        if len(names) > 1:
            raise ValueError(f"{path} holds modules of several kinds {names}; pick one with --module NAME")
        found.extend(inside)
    if not found:
        raise ValueError("no module folders given")
    return found


def check_representable(module: Replacement, where: str, tool: str) -> TopKTranscoder:
    """`module` as a TopK (skip) transcoder reading the MLP input, or a ValueError saying
    in one sentence why `tool` cannot hold it."""
    if isinstance(module, TopKTranscoder) and module.cfg.input_site == "mlp_in":
        return module
    if module.cfg.input_site != "mlp_in":
        raise ValueError(
            f"{where}: this {type(module).__name__} reads the MLP's output, while {tool} transcoders map the "
            "MLP's input to its output, so it has no counterpart there"
        )
    if _units_depend_on_input(module):
        raise ValueError(
            f"{where}: a {type(module).__name__} cannot be represented in {tool}: each unit writes a_n times "
            f"a direction that depends on the input through {module.context_doc or 'the input itself'}, while "
            f"{tool} stores one "
            "fixed decoder row per feature (plus an optional linear skip), and only TopK (skip) transcoders "
            "have that form"
        )
    raise ValueError(
        f"{where}: only mxd_lens TopK transcoders and skip transcoders can be exported to {tool}; got a "
        f"{type(module).__name__}"
    )


def _units_depend_on_input(module: Replacement) -> bool:
    """Whether what a unit writes depends on the input besides its activation (an MxD's
    expert output a_n c_n * D^T z): asked of the module's own `mix_output` with the same
    mixture and two different contexts (random ones, so that untrained weights still tell)."""
    from mxd_lens.architectures.base import bypass

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, module.cfg.d_in, generator=gen).to(module.device, module.dtype)
    with torch.no_grad():
        context = module.context(x, bypass)
        if context is None:
            return False
        mix = torch.randn(1, module.cfg.d_out, generator=gen).to(module.device, module.dtype)
        c1, c2 = (torch.randn(context.shape, generator=gen).to(context) for _ in range(2))
        return not torch.allclose(module.mix_output(mix, c1), module.mix_output(mix, c2))


def skip_matrix(module: TopKTranscoder):
    """W_skip [d_out, d_in] of a skip transcoder, None for a plain one."""
    return module.W_skip.detach() if isinstance(module, SkipTranscoder) else None


__all__ = ["check_representable", "module_folders", "skip_matrix"]
